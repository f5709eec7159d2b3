"""The cross-backend numbers: every public entry point run on one model, as plain lists.

`reference(model)` (tiny float64 models, tests/_hf_tiny.py) and `gemma_reference(model)` (the
offline Gemma-3-270m) are recomputed by tests/test_bridge.py on whichever TransformerLens line is
installed. Two kinds of reference, because float32 kernels round differently on different CPUs
(AVX2 vs AVX-512/AMX: the Gemma numbers differ by ~2e-5 of their largest value between the two
on one machine):

- **Same run, same CPU** (`fresh_path`): under `make test` the 3.x leg writes what it computed to
  `$STEERLIN_REF_DIR/<isa>/` and the 4.x leg, run next on the same machine and instruction set,
  compares against that at 2e-5 and token ids exactly. This is the cross-backend check.
- **Committed** (tests/data/*.json, documentation and a drift check): the tiny models are float64
  end to end on the 3.x leg, so their file is machine-independent to ~1e-15. The Gemma file holds
  the float64 model's numbers (`python tests/_bridge_ref.py --gemma`), and float32 results are
  checked against it at a tolerance derived from float32 error growth through the 18 layers: the
  measured |float32 - float64| of each quantity on each instruction set, stored in the file's
  `_meta` (`--gemma-error`, run once natively and once under the AVX2 pin), times
  `F32_MARGIN`. Two float32 runs each within e of float64 are within 2e of each other, so the
  margin covers any CPU whose float32 error is at most twice the largest one measured.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

REFERENCE = Path(__file__).parent / "data" / "bridge_reference.json"
GEMMA_REFERENCE = Path(__file__).parent / "data" / "gemma_bridge_reference.json"
#: float32 vs the float64 reference: allowed error = F32_MARGIN x the largest |f32 - f64|
#: measured over the instruction sets in the file's _meta (see the module docstring).
F32_MARGIN = 4.0
#: environment variables that pin the float32 kernels to AVX2 (the second pass of `make test`)
AVX2_PIN = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def isa_tag() -> str:
    """The float32 kernel family this process runs: 'avx2' under the AVX2 pin, else 'native'."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "native").lower()


def fresh_path(name: str) -> Path | None:
    """Where this run's 3.x leg leaves its numbers for the 4.x leg (None outside `make test`)."""
    root = os.environ.get("STEERLIN_REF_DIR")
    return Path(root) / isa_tag() / name if root else None


def rel_errors(got: dict, want: dict) -> dict[str, float]:
    """max |got - want| / max |want| per numeric quantity (token ids and multipliers left out)."""
    out = {}
    for key, ref in want.items():
        if key.startswith(("generate", "_")) or key == "calibrate_multiplier":
            continue
        a = torch.tensor(got[key], dtype=torch.float64)
        b = torch.tensor(ref, dtype=torch.float64)
        out[key] = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)
    return out


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
        # the float64 model's numbers: machine-independent to ~1e-12 (this resets the _meta)
        from steerlin import load_model

        ref = gemma_reference(load_model("gemma-3-270m", dtype=torch.float64))
        ref["_meta"] = {"dtype": "float64", "f32_error": {}}
        GEMMA_REFERENCE.write_text(json.dumps(ref))
        print(f"wrote {GEMMA_REFERENCE}")
        return
    if "--gemma-error" in sys.argv:
        # this instruction set's float32 error against the float64 reference, into the _meta
        from steerlin import load_model

        ref = json.loads(GEMMA_REFERENCE.read_text())
        err = rel_errors(gemma_reference(load_model("gemma-3-270m")), ref)
        ref["_meta"]["f32_error"][isa_tag()] = err
        GEMMA_REFERENCE.write_text(json.dumps(ref))
        print(f"{isa_tag()}: " + ", ".join(f"{k} {v:.2e}" for k, v in err.items()))
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
