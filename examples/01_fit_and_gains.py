"""Fit the LLV surrogate and check its per-layer steering gains against the full model.

    python examples/01_fit_and_gains.py            # 100/50/50 prompts per class, d = 8
    python examples/01_fit_and_gains.py --fast     # 16/8/8 per class, d = 8 (about a minute)

Offline: Gemma-3-270m from steerlin's cache and the SST-2 sample shipped with steerlin.
Writes gains.png, directions.safetensors and surrogate.safetensors to --out (default: a new
temporary folder).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from steerlin import (
    ConceptDirections,
    Surrogate,
    exact_gains,
    fidelity,
    load_demo_task,
    load_model,
    scan_gains,
)
from steerlin.plots import plot_gains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="tiny sizes: 16/8/8 per class, d = 8")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # scripts set threads; the library never does
    n_concept, n_operating, n_eval, d = (16, 8, 8, 8) if args.fast else (100, 50, 50, 8)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="steerlin-ex01-"))
    out.mkdir(parents=True, exist_ok=True)

    # 1. Model and three disjoint, balanced splits (sizes are per class).
    model = load_model(args.model)
    splits = load_demo_task().split(n_concept, n_operating, n_eval, seed=0)

    # 2. Concept directions from class means on the concept split: v_l = mean(x_l|1) - mean(x_l|0).
    #    Injection amplitudes are norm-relative: u = 0.1 adds 10% of a typical ‖x_l‖ along unit_l.
    dirs = ConceptDirections.fit(model, splits.concept.texts, splits.concept.labels)

    # 3. The LLV surrogate, identified from JVPs on the operating split: predicted gains h_l,
    #    the readout change <unit_L, x_L> per unit injection at layer l.
    sur = Surrogate.fit(model, splits.operating.texts, dirs, d=d, progress=True)

    # 4. Ground truth on held-out prompts: a ±ε scan of the full model, and exact first-order
    #    gains from one backward pass.
    measured = scan_gains(model, splits.eval.texts, dirs, eps=0.1, progress=True)
    exact = exact_gains(model, splits.eval.texts, dirs)

    print(f"\n{sur!r}\n")
    print(f"{'layer':>5} {'predicted':>11} {'measured':>11} {'exact':>11}")
    for layer in range(sur.n_layers):
        g = (sur.gains[layer], measured[layer], exact[layer])
        print(f"{layer:>5} " + " ".join(f"{float(v):>11.4g}" for v in g))
    print(f"\nsurrogate vs measured: {fidelity(sur.gains, measured)}")
    print(f"paper variant vs measured: {fidelity(sur.gains_paper, measured)}")
    print(f"exact gains vs measured: {fidelity(exact, measured)}")

    # 5. Save: safetensors + JSON metadata (never pickles), and a figure.
    dirs.save(out / "directions.safetensors")
    sur.save(out / "surrogate.safetensors")
    plot_gains(sur.gains, measured, out / "gains.png", exact=exact, title="Gemma-3-270m, SST-2")
    print(f"\nwrote {out}/gains.png, directions.safetensors, surrogate.safetensors")


if __name__ == "__main__":
    main()
