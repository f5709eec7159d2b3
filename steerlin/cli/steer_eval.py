"""`steerlin steer-eval`: behavioural evaluation of steering strategies (judged text vs side
effects)."""

from __future__ import annotations

import json

from ..steer_eval import STRATEGIES
from .options import _positive_int
from .steps import _data_dir, _start


def cmd_steer_eval(args) -> int:
    """Run `steerlin.steer_eval.run_task` for each task; JSON, figures and tables to --out."""
    from ..steer_eval import run_task

    apply_quick(args)
    args.data_dir = _data_dir(args)
    tasks = [t for t in args.tasks.split(",") if t.strip()]
    run, model = _start(args, "steer-eval", "steerlin-steer-eval", tasks)
    res = run.results.setdefault("tasks", {})
    for task in args.tasks.split(","):
        with run.timed(task):
            res[task] = run_task(model, task, args, img_dir=run.out, log=run.say)
        (run.out / "steer_eval.json").write_text(json.dumps(run.results, indent=1, default=str))
    return run.finish()


def register(add) -> None:
    p = add(
        "steer-eval",
        cmd_steer_eval,
        "judged behaviour change vs side effect of steering strategies (needs steerlin[eval])",
        "For each task (sst2: VADER sentiment; hate: alt-profanity-check) and steering "
        "strategy, calibrate to ±t class separations in the generation regime, generate greedy "
        "continuations of held-out neutral stems, and report the judged change, the "
        "perplexity under the unsteered model, the measured KL and the energies. Writes "
        "steer_eval.json, steer_eval_<task>.png and results.md.",
    )
    p.add_argument("--tasks", default="sst2,hate", help="comma list of sst2, hate")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with sst2/ and tweeteval/ (default: $STEERLIN_DATA_DIR, else Hugging "
        "Face online)",
    )
    add_eval_options(p)


def add_eval_options(p) -> None:
    """The evaluation's own options (also benchmarks/steer_eval.py's)."""
    p.add_argument("--sizes", default="200,50", help="concept,operating prompts per class")
    p.add_argument("--d", type=_positive_int, default=32, help="surrogate order (default 32)")
    p.add_argument("--basis", default="krylov", help="surrogate basis (default krylov)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--strengths", default="0.5,1,2", help="|t| in class separations")
    p.add_argument(
        "--search-coefs",
        default="1,2,4,8",
        help="coefficients of the raw class-mean difference the 'searched' grid tries",
    )
    p.add_argument("--tokens", type=_positive_int, default=30, help="greedy tokens per stem")
    p.add_argument("--seeds", type=int, default=3, help="seeds of 12 held-out stems (max 3)")
    p.add_argument("--quick", action="store_true", help="2 strategies, t = 1, 8 tokens, 1 seed")
    p.add_argument(
        "--chat",
        action="store_true",
        help="prompting baseline through the chat template (instruct models)",
    )


def apply_quick(args) -> None:
    """--quick: min-norm and min-KL, t = 1, 8 tokens, 1 seed, 32/16 prompts, d = 8."""
    if args.quick:
        args.strategies, args.strengths, args.tokens, args.seeds = "min-norm,min-kl", "1", 8, 1
        args.sizes, args.d = "32,16", 8
