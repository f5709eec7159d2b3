"""The cross-backend numbers: every public entry point run on one tiny model, as plain lists.

`reference(model)` is computed by the TransformerLens 3 leg into tests/data/bridge_reference.json
(`python tests/_bridge_ref.py` in the 3.x venv) and recomputed by tests/test_bridge.py on
whichever line is installed; the same weights (tests/_hf_tiny.py) make the two comparable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REFERENCE = Path(__file__).parent / "data" / "bridge_reference.json"
GEMMA_REFERENCE = Path(__file__).parent / "data" / "gemma_bridge_reference.json"

POS = ["good movie", "great film", "nice plot", "happy story", "the best acting", "love it"]
NEG = ["bad movie", "awful film", "poor plot", "sad story", "the worst acting", "hate it"]
OPS = ["the movie was", "it is a very", "the plot is not", "a film and the story", "acting was"]
GEN = ["the movie was", "the plot is", "it was a very good"]
# long enough to cross the tiny Gemma's 6-token sliding window
LONG = ["the movie was very good and the plot was great and the acting was fine ."]


def reference(model) -> dict:
    """capture, inject, directions, Surrogate.fit, exact/scan gains, calibrate and a steered
    generation of `model`, float64 lists (generation: token ids)."""
    from steerlin import (
        ConceptDirections,
        Controller,
        Surrogate,
        calibrate,
        capture,
        exact_gains,
        inject,
        scan_gains,
    )
    from steerlin.regime import generate

    H = model.cfg.d_model
    out: dict = {}
    f64 = lambda t: torch.as_tensor(t).detach().to(torch.float64).cpu()
    out["capture"] = f64(capture(model, OPS + LONG).states).tolist()
    g = torch.Generator().manual_seed(3)
    vec = torch.randn(H, generator=g, dtype=torch.float64).to(model.cfg.dtype)
    with inject(model, {1: vec}):
        out["inject"] = f64(capture(model, OPS).states[:, -1]).tolist()
    dirs = ConceptDirections.fit(model, POS + NEG, [1] * len(POS) + [0] * len(NEG))
    out["directions"] = f64(dirs.unit).tolist()
    sur = Surrogate.fit(model, OPS + LONG, dirs, d=4)
    out["surrogate_gains"] = f64(sur.gains).tolist()
    out["surrogate_A_trace"] = [float(torch.as_tensor(a).diagonal().sum()) for a in sur.A]
    out["exact_gains"] = f64(exact_gains(model, OPS + LONG, dirs)).tolist()
    out["scan_gains"] = f64(scan_gains(model, OPS, dirs)).tolist()
    ctrl = Controller(sur, 1.0)
    cal = calibrate(model, OPS, ctrl.schedule, target=float(ctrl.target[0]))
    out["calibrate_multiplier"] = float(cal.multiplier)
    out["calibrate_shift"] = float(cal.measured_shift)
    plain = generate(model, GEN, 4)
    steered = generate(model, GEN, 4, Controller(sur, 30.0))
    out["generate_plain"] = plain.new_ids.tolist()
    out["generate_steered"] = steered.new_ids.tolist()
    return out


# the offline Gemma-3-270m on both lines (`python tests/_bridge_ref.py --gemma` in the 3.x venv)
G_POS = ["I loved this film.", "A wonderful, moving story.", "Great acting, clever plot."]
G_NEG = ["I hated this film.", "A dull, tedious story.", "Terrible acting, silly plot."]
G_OPS = ["The movie was", "I think this film", "Overall, the acting"]


def gemma_reference(model) -> dict:
    """capture, directions, Surrogate.fit, exact gains and a steered greedy generation of the
    real Gemma-3-270m, float64 lists (generation: token ids)."""
    from steerlin import ConceptDirections, Controller, Surrogate, capture, exact_gains
    from steerlin.regime import generate

    f64 = lambda t: torch.as_tensor(t).detach().to(torch.float64).cpu()
    dirs = ConceptDirections.fit(model, G_POS + G_NEG, [1, 1, 1, 0, 0, 0])
    sur = Surrogate.fit(model, G_OPS, dirs, d=4)
    return {
        "capture": f64(capture(model, G_OPS).states[:, -1]).tolist(),
        "directions": f64(dirs.unit).tolist(),
        "surrogate_gains": f64(sur.gains).tolist(),
        "exact_gains": f64(exact_gains(model, G_OPS, dirs)).tolist(),
        "generate_steered": generate(model, G_OPS, 6, Controller(sur, 1.0)).new_ids.tolist(),
    }


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import _hf_tiny

    from steerlin.backend.common import tl_major

    torch.set_num_threads(1)
    if tl_major() >= 4:
        raise SystemExit("run this in the TransformerLens 3 venv (it writes the 3.x reference)")
    if "--gemma" in sys.argv:
        from steerlin import load_model

        GEMMA_REFERENCE.write_text(json.dumps(gemma_reference(load_model("gemma-3-270m"))))
        print(f"wrote {GEMMA_REFERENCE}")
        return
    data = {arch: reference(_hf_tiny.wrap(arch)) for arch in _hf_tiny.ARCHS}
    import transformer_lens

    data["_meta"] = {
        "transformer_lens": transformer_lens.__version__
        if hasattr(transformer_lens, "__version__")
        else "3.x"
    }
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(data))
    print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    main()
