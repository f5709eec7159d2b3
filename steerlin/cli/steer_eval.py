"""`steerlin steer-eval`: behavioural evaluation of steering strategies (judged text vs side
effects)."""

from __future__ import annotations

import json
from pathlib import Path

from ..steer_eval import STRATEGIES


def cmd_steer_eval(args) -> int:
    """Run `steerlin.steer_eval.run_task` for each task; write JSON and figures to --out."""
    import torch

    from ..loading import load_model
    from ..steer_eval import run_task

    torch.set_num_threads(args.eval_threads)
    out = Path(args.eval_out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.strategies, args.strengths, args.tokens, args.seeds = "min-norm,min-kl", "1", 8, 1
        args.sizes, args.d = "32,16", 8
    model = load_model(args.eval_model)
    res = {"command": "steerlin steer-eval", "tasks": {}}
    for task in args.tasks.split(","):
        res["tasks"][task] = run_task(
            model, task, args, img_dir=out, log=lambda m: print(m, flush=True)
        )
        (out / "steer_eval.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"\nwrote {out / 'steer_eval.json'}")
    return 0


def register(add) -> None:
    """Add the subcommand's parser (`add(name, func, help, description)`)."""
    p = add(
        "steer-eval",
        cmd_steer_eval,
        "judged behaviour change vs side effect of steering strategies (needs steerlin[eval])",
    )
    p.add_argument("--tasks", default="sst2,hate", help="comma list of sst2, hate")
    p.add_argument("--sizes", default="200,50", help="concept,operating prompts per class")
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--basis", default="krylov", help="surrogate basis (docs table: krylov)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--strengths", default="0.5,1,2", help="|t| in class separations")
    p.add_argument("--tokens", type=int, default=30, help="greedy tokens per continuation")
    p.add_argument("--seeds", type=int, default=3, help="seeds of 12 held-out stems (max 3)")
    p.add_argument(
        "--eval-data-dir",
        dest="data_dir",
        default=str(Path("..") / "shared" / "data"),
        help="folder with sst2/ and tweeteval/ (default ../shared/data)",
    )
    p.add_argument("--eval-model", default="gemma-3-270m")
    p.add_argument("--eval-threads", type=int, default=1)
    p.add_argument("--eval-out", default="steer_eval_out", help="output folder")
    p.add_argument("--quick", action="store_true", help="2 strategies, t = 1, 8 tokens, 1 seed")
