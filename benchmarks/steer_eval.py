"""Behavioural steering evaluation (issue 16) on Gemma-3-270m: SST-2 sentiment and TweetEval hate.

    python benchmarks/steer_eval.py                       # both tasks, 6 strategies, t = 0.5,1,2
    python benchmarks/steer_eval.py --quick               # 2 strategies, t = 1, 8 tokens

Per task: directions on the concept split, surrogate (d = 32) on the operating split, the KL
metric F on the 12 neutral calibration stems; every strategy's schedule calibrated in the
regime of use (teacher-forced 8-token greedy continuations of the calibration stems, steering
the last prompt token and every generated token) to ±t class separations of the concept
readout; greedy 30-token continuations of 36 held-out neutral stems (3 seeds of 12), judged by
VADER (sst2) or alt-profanity-check (hate). Writes benchmarks/results/steer_eval.json,
docs/img/steer_eval_<task>.png and prints the tables and a side-by-side of texts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common as C
import torch

import steerlin
from steerlin.cli.steer_eval import add_eval_options, apply_quick
from steerlin.steer_eval import run_task

ROOT = Path(__file__).resolve().parents[1]


def run(model, task: str, args, checkpoint=None) -> dict:
    return run_task(
        model,
        task,
        args,
        img_dir=ROOT / "docs" / "img",
        log=lambda m: print(m, flush=True),
        checkpoint=checkpoint,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="sst2,hate")
    ap.add_argument("--model", default="gemma-3-270m", help="e.g. smollm2-135m (offline)")
    add_eval_options(ap)  # the CLI's: sizes, d, basis, strategies, strengths, tokens, seeds...
    ap.add_argument("--data-dir", default=str(C.DEFAULT_DATA))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    apply_quick(args)
    torch.set_num_threads(args.threads)
    model = steerlin.load_model(args.model)
    out = {"command": "python benchmarks/steer_eval.py", "args": vars(args), "tasks": {}}
    path = (
        Path(args.out)
        if args.out
        else ROOT
        / "benchmarks"
        / "results"
        / ("steer_eval_quick.json" if args.quick else "steer_eval.json")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    for task in args.tasks.split(","):

        def save(part, task=task):  # partial results as the run goes (a long run may be cut)
            out["tasks"][task] = part | {"partial": True}
            path.write_text(json.dumps(out, indent=1, default=str))

        out["tasks"][task] = run(model, task, args, checkpoint=save)
        path.write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
