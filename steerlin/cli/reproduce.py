"""`steerlin reproduce`: the paper's per-task fidelity and energy tables."""

from __future__ import annotations

import re

from ..experiments import separation
from .common import ENERGY_COLUMNS, FIDELITY_COLUMNS, _csv
from .options import _data, _energy_opts, _order, _positive_int, _sizes
from .steps import (
    _check_logits,
    _encode_splits,
    _energy,
    _fidelity,
    _label_words,
    _splits,
    _start,
    _subset,
)


def cmd_reproduce(args) -> int:
    from .. import plots

    tasks = _csv(args.tasks, what="--tasks")
    run, model = _start(args, "reproduce", "steerlin-reproduce", tasks)
    all_fid, all_energy, per_task = [], [], {}
    for name in tasks:
        print(f"\n=== task {name} ===", flush=True)
        with run.timed(f"{name}/data"):
            task, splits = _splits(args, name, args.n_concept, args.n_operating, args.n_eval)
        enc = _encode_splits(model, splits)
        lw = _label_words(args, task)
        readouts = ["concept"]
        note = _check_logits(model, lw)
        if note is None:
            readouts.append("logits")
        else:
            run.say(f"{name}: logit readout skipped ({note})")
        with run.timed(f"{name}/fidelity"):
            tr = _fidelity(
                args,
                model,
                enc,
                name,
                readouts=readouts,
                label_words=lw,
                label_names=task.spec.class_names,
            )
        fid = tr.table()
        all_fid += fid
        tag = re.sub(r"[^\w.-]+", "_", name)
        for rd in readouts:
            s = tr.surrogate(rd)
            suffix = "" if rd == "concept" else f"_{rd}"
            plots.plot_gains(
                s.gains,
                tr.measured[rd],
                run.path(f"gains_{tag}{suffix}.png"),
                exact=tr.exact_eval.get(rd),
                title=f"{run.config['model']} on {name}: {rd} readout (d={args.d})",
            )
        rec = tr.to_json()
        if not args.no_energy:
            sur = tr.surrogate("concept")
            eset = _subset(enc.eval, args.n_energy)
            sep = separation(
                model, eset.texts, eset.labels, tr.directions, batch_size=args.batch_size
            )
            target = args.target_frac * sep["separation"]
            rows = _energy(run, model, eset.texts, sur, target, args, label=f" for {name}")
            for r in rows:
                r["task"] = name
                r["target"] = target
            all_energy += rows
            plots.plot_energy(
                rows,
                run.path(f"energy_{tag}.png"),
                title=f"{name}: energy to shift the concept readout by {target:+.3g}",
            )
            rec.update(energy=rows, target=dict(sep, target=target))
        per_task[name] = rec
        run.results["tasks"] = per_task  # keep partial results if a later task fails
    run.say(
        f"Paper sizes are 400/200/200 per class; this run: {args.n_concept}/"
        f"{args.n_operating}/{args.n_eval}, d = {args.d}, ε = {args.eps}."
    )
    run.table(
        "Fidelity per task (predicted vs measured per-layer gains, eval split)",
        all_fid,
        FIDELITY_COLUMNS,
    )
    if all_energy:
        run.table(
            "Energy per task (calibrated; target = "
            f"{args.target_frac:g} × class-mean separation of the concept readout)",
            all_energy,
            [("task", "task", ""), ("target", "target", ".4g")] + ENERGY_COLUMNS,
        )
    return run.finish(fidelity=all_fid, energy=all_energy)


def register(add) -> None:
    p = add("reproduce", cmd_reproduce, "the paper's per-task fidelity and energy tables")
    p.add_argument(
        "--tasks",
        default="sst2,irony,hate",
        help="comma-separated tasks (default: sst2,irony,hate)",
    )
    _data(p)
    _sizes(p)
    _order(p)
    p.add_argument("--eps", type=float, default=0.1, help="scan step ε (default: 0.1)")
    p.add_argument("--label-words", default=None, help="'POS,NEG' (default: each task's)")
    p.add_argument(
        "--target-frac",
        type=float,
        default=0.5,
        help="energy target = this × class-mean separation (default: 0.5)",
    )
    _energy_opts(p)
    p.add_argument(
        "--n-energy",
        type=_positive_int,
        default=None,
        help="eval prompts per class for the energy target and calibrations (default: all)",
    )
    p.add_argument("--no-energy", action="store_true", help="skip the energy comparison")
