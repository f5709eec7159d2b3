"""`steerlin fit`: fit concept directions and the LLV surrogate on a task."""

from __future__ import annotations

import json

from ..experiments import separation
from ..report import columns
from .common import CliError
from .options import _data, _order, _sizes
from .steps import (
    _check_logits,
    _start,
    _task_data,
)


def cmd_fit(args) -> int:
    from ..directions import ConceptDirections
    from ..surrogate import Surrogate
    from ..trajectory import capture

    run, model = _start(args, "fit", "steerlin-fit", [args.task])
    task, splits, enc, lw = _task_data(args, run, model, args.task)
    if lw is not None and (why := _check_logits(model, lw)):
        raise CliError(f"--readout logits: {why}; pass --label-words ' yes, no' (single tokens)")
    run.config.update(task_name=task.name, label_words=lw, data_source=task.source)
    with run.timed("directions"):
        traj = capture(model, enc.concept.texts, batch_size=args.batch_size, progress=args.progress)
        dirs = ConceptDirections.fit(
            model, traj, list(enc.concept.labels), label_names=task.spec.class_names
        )
    with run.timed("surrogate"):
        sur = Surrogate.fit(
            model,
            enc.operating.texts,
            dirs,
            d=args.d,
            basis=args.basis,
            readout=args.readout,
            variant=args.variant,
            label_words=lw,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=args.progress,
        )
    with run.timed("separation"):
        sep = separation(
            model,
            enc.eval.texts,
            enc.eval.labels,
            dirs,
            readout=args.readout,
            label_words=lw,
            batch_size=args.batch_size,
        )
    dirs.save(run.path("directions.safetensors"))
    sur.save(run.path("surrogate.safetensors"))
    run.path("splits.json").write_text(
        json.dumps(
            {
                "task": task.name,
                "template": args.template,
                "seed": args.seed,
                **{
                    name: {"texts": list(p.texts), "labels": list(p.labels)}
                    for name, p in splits.items()
                },
            },
            indent=1,
        )
        + "\n"
    )
    run.say(
        f"Fitted {sur!r} on {len(enc.operating)} operating prompts of {task.name}; "
        f"directions on {len(enc.concept)} concept prompts."
    )
    rows = [
        {
            "layer": l,
            "gain": float(sur.gains[l]),
            "paper": float(sur.gains_paper[l]),
            "std": float(sur.gains_std[l]),
            "scale": float(dirs.scale[l]),
        }
        | ({} if sur.gains_exact is None else {"exact": float(sur.gains_exact[l])})
        for l in range(sur.n_layers)
    ]
    run.table(
        f"Predicted gains dy/du_l ({args.readout} readout, {args.variant})",
        rows,
        columns(
            "layer gain",
            ("paper", "paper variant", ".4g"),
            ("std", "per-prompt std", ".3g"),
            ("scale", "scale ‖x_l‖", ".4g"),
        )
        + ([] if sur.gains_exact is None else [("exact", "exact (same prompts)", ".4g")]),
    )
    if sur.gains_exact is not None:
        check = sur.reduction_error()
        run.say(
            f"\nReduction check against the exact gains on the same prompts (computed by the "
            f"fit's observability pass): raw Spearman {check.raw_spearman:.3f}, median "
            f"per-layer error {check.rel_err_median:.1%}, max {check.rel_err_max:.1%}."
        )
        run.results.update(gains_exact=sur.gains_exact, reduction=check.as_dict())
    run.say(
        f"\nReadout class-mean separation on the eval split: {sep['separation']:+.4g} "
        f"(half of it, {sep['half_separation']:+.4g}, is a natural `control --target`)."
    )
    return run.finish(
        gains=sur.gains,
        gains_paper=sur.gains_paper,
        gains_std=sur.gains_std,
        scale=dirs.scale,
        separation=sep,
        surrogate=repr(sur),
    )


def register(add) -> None:
    p = add("fit", cmd_fit, "fit concept directions and the LLV surrogate on a task")
    p.add_argument(
        "--task",
        required=True,
        help="task name (sst2, irony, hate, ..., or 'demo' for the shipped sample)",
    )
    _data(p)
    _sizes(p)
    _order(p)
    p.add_argument(
        "--readout",
        choices=("concept", "logits"),
        default="concept",
        help="readout y (default: concept)",
    )
    p.add_argument(
        "--variant",
        choices=("per-prompt", "paper"),
        default="per-prompt",
        help="gain variant (default: per-prompt)",
    )
    p.add_argument(
        "--label-words",
        default=None,
        help="'POS,NEG' words for the logit readout (default: the task's)",
    )
