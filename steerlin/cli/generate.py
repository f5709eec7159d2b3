"""`steerlin generate`: greedy generation, steered vs unsteered."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .common import DEMO_PROMPTS, CliError, Run
from .options import _positive_int
from .steps import _generate, _generation_table, _load_model


def cmd_generate(args) -> int:
    from ..control import Schedule

    sched_path = Path(args.schedule).expanduser()
    recorded: dict = {}
    for cand in (sched_path.parent / "results.json", sched_path.parent.parent / "results.json"):
        if cand.is_file():
            recorded = json.loads(cand.read_text()).get("config", {})
            if recorded.get("model"):
                break
    Schedule.load(sched_path)  # the file is checked before the model loads, then against it
    if not math.isfinite(args.scale):
        raise CliError(f"--scale: expected a finite number, got {args.scale}")
    run = Run(args, "generate", sched_path.parent / "generate")
    model = _load_model(args, run, recorded)
    if model.tokenizer is None:
        raise CliError("generate: the model has no tokenizer; text generation needs one")
    schedule = Schedule.load(sched_path, model)
    steer = schedule.scaled(args.scale) if args.scale != 1.0 else schedule
    prompts = args.prompt or list(DEMO_PROMPTS)
    run.say(f"Schedule {sched_path} × {args.scale:g}: {steer!r}")
    with run.timed("generate"):
        plain = _generate(model, prompts, args.max_new_tokens)
        steered = _generate(model, prompts, args.max_new_tokens, steer)
    rows = _generation_table(
        run, prompts, plain, steered, f"Steered (× {args.scale:g}) vs unsteered, greedy"
    )
    return run.finish(samples=rows, scale=args.scale, energy=steer.energy, schedule=str(sched_path))


def register(add) -> None:
    p = add("generate", cmd_generate, "greedy generation, steered vs unsteered")
    p.add_argument("--schedule", required=True, help="schedule.safetensors from control/demo")
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt (repeatable; default: two movie-review openings)",
    )
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=30, help="tokens to generate (default: 30)"
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the schedule (negative flips the direction; default: 1)",
    )
