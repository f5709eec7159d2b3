"""Steer generation with the minimum-energy schedule u* = Δy · h / ‖h‖², calibrated on the model.

    python examples/02_steer_generation.py            # 100/50/50 per class, d = 8
    python examples/02_steer_generation.py --fast     # 16/8/8 per class, d = 8

Fits the surrogate on the shipped SST-2 sample, asks the Controller for the least-energy
schedule that moves the sentiment readout <unit_L, x_L> one class separation toward NEGATIVE,
rescales it on the full model in the generation regime (`Controller.calibrate`), and compares
greedy generations with and without it. Also saves the schedule and a llama.cpp control
vector to --out.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from steerlin import (
    ConceptDirections,
    Controller,
    Surrogate,
    load_demo_task,
    load_model,
)
from steerlin.steer_eval import neutral_stems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="tiny sizes: 16/8/8 per class, d = 8")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    ap.add_argument(
        "--target",
        type=float,
        default=-1.0,
        help="target in class separations (+ = positive; default -1: toward negative)",
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_concept, n_operating, n_eval, d = (16, 8, 8, 8) if args.fast else (100, 50, 50, 8)
    prompts = ["I think this film"] if args.fast else ["The movie was", "I think this film"]
    max_new = 12 if args.fast else 24
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="steerlin-ex02-"))
    out.mkdir(parents=True, exist_ok=True)

    model = load_model(args.model)
    L = model.cfg.n_layers
    splits = load_demo_task().split(n_concept, n_operating, n_eval, seed=0)
    dirs = ConceptDirections.fit(model, splits.concept.texts, splits.concept.labels)
    sur = Surrogate.fit(model, splits.operating.texts, dirs, d=d, progress=True)

    # Target in class separations (one = the concept split's class-mean difference of the
    # readout, stored in the surrogate). Least-norm schedule restricted to blocks 2..L-1 so that
    # it can also be exported as a llama.cpp control vector; then calibrated on the full model
    # in the regime it is used in (last prompt token + every generated token).
    ctrl = Controller(sur, args.target, layers=range(2, L))
    print(f"sign convention: {ctrl.sign_convention}; {ctrl.targets[0].describe()}")
    ctrl = ctrl.calibrate(model, neutral_stems()["calibration"], n_tokens=8)
    cal = ctrl.calibration
    schedule = cal.schedule
    print(
        f"calibrated: multiplier {cal.multiplier:.3g}, measured shift {cal.measured_shift:+.4g}"
        f" in {cal.evaluations} full-model evaluations; {schedule!r}"
    )
    for kind in ("uniform", "last"):
        print(
            f"  {kind:>7} baseline, same target under the surrogate: energy "
            f"{ctrl.baseline(kind).energy:.4g} vs LLV {ctrl.schedule.energy:.4g}"
        )

    # Steered vs unsteered greedy generation. The hooks live only inside the `with` block.
    for p in prompts:
        plain = model.generate(p, max_new_tokens=max_new, do_sample=False, verbose=False)
        with ctrl.apply(model):
            steered = model.generate(p, max_new_tokens=max_new, do_sample=False, verbose=False)
        print(f"\nprompt   : {p}\nunsteered: {plain}\nsteered  : {steered}")

    schedule.save(out / "schedule.safetensors")
    schedule.to_llama_cpp(out / "control_vector.gguf")
    print(
        f"\nwrote {out}/schedule.safetensors and control_vector.gguf "
        "(llama-cli --control-vector control_vector.gguf)"
    )


if __name__ == "__main__":
    main()
