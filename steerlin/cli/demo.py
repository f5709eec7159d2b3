"""`steerlin demo`: offline end-to-end tour: fit, gains, fidelity, energy, steered generation."""

from __future__ import annotations

import argparse
import math

from ..experiments import separation
from ..report import md_table
from .common import DEMO_PROMPTS, ENERGY_COLUMNS, FIDELITY_COLUMNS
from .options import _energy_opts, _order, _positive_int, _sizes
from .steps import (
    _calibrated_schedules,
    _encode_splits,
    _energy,
    _fidelity,
    _gains_table,
    _splits,
    _start,
    _subset,
)


def cmd_demo(args) -> int:
    """Offline end-to-end tour on Gemma-3-270m and the shipped SST-2 sample."""
    from .. import plots
    from ..control import Controller

    run, model = _start(args, "demo", "steerlin-demo")
    L = model.cfg.n_layers
    with run.timed("data"):
        task, splits = _splits(args, "demo", args.n_concept, args.n_operating, args.n_eval)
    run.say(
        f"Model {run.config['model']} ({L} blocks, d_model {model.cfg.d_model}); task "
        f"{task.name}: {args.n_concept}/{args.n_operating}/{args.n_eval} prompts per class for "
        f"concept/operating/eval (seed {args.seed}); surrogate order d = {args.d}, scan ε = "
        f"{args.eps}."
    )
    enc = _encode_splits(model, splits)
    with run.timed("fidelity"):
        tr = _fidelity(
            args, model, enc, task.name, readouts=("concept",), label_names=task.spec.class_names
        )
    run.timings.update({f"fidelity/{k}": v for k, v in tr.timings.items()})
    sur = tr.surrogate("concept")
    fid = tr.table()
    run.table("Fidelity: predicted vs measured per-layer gains (eval split)", fid, FIDELITY_COLUMNS)
    _gains_table(
        run,
        "Per-layer gains dy/du_l (concept readout)",
        sur,
        tr.measured["concept"],
        tr.exact_eval["concept"],
    )
    # energy: target and calibrations on the first n_energy eval prompts of each class
    energy_set = _subset(enc.eval, args.n_energy)
    with run.timed("target"):
        sep = separation(
            model, energy_set.texts, energy_set.labels, tr.directions, batch_size=args.batch_size
        )
    target = args.target_frac * sep["separation"]
    run.say(
        f"\nTarget: {args.target_frac:g} × the class-mean separation of the concept readout "
        f"<unit_L, x_L> on the eval split ({len(energy_set)} prompts): {args.target_frac:g} × "
        f"({sep['mean_label1']:.4g} − {sep['mean_label0']:.4g}) = {target:+.4g}."
    )
    rows = _energy(run, model, energy_set.texts, sur, target, args)
    run.table("Energy to reach the target (calibrated on the full model)", rows, ENERGY_COLUMNS)
    ctrl = Controller(sur, target, units="raw", seed=args.seed)
    scheds = _calibrated_schedules(ctrl, rows)
    plots.plot_gains(
        sur.gains,
        tr.measured["concept"],
        run.path("gains.png"),
        exact=tr.exact_eval["concept"],
        title=f"{run.config['model']} on {task.name}: per-layer gains (d={args.d})",
    )
    plots.plot_energy(
        rows,
        run.path("energy.png"),
        title=f"Energy to shift the readout by {target:+.3g} ({task.name})",
    )
    plots.plot_schedule(
        {k: v for k, v in scheds.items() if k in ("llv", "uniform", "last")} or scheds,
        run.path("schedule.png"),
        title=f"Calibrated schedules for a shift of {target:+.3g}",
    )
    run.results.update(
        fidelity=fid,
        gains=tr.to_json(),
        target=dict(sep, target=target, target_frac=args.target_frac),
        energy=rows,
        schedules=scheds,
    )
    if not args.no_generate and model.tokenizer is not None:
        _demo_generation(run, model, sur, args)
    cal_llv = rows[0]
    if math.isfinite(cal_llv.get("multiplier", math.nan)):
        ctrl.schedule.scaled(cal_llv["multiplier"], calibrated=True).save(
            run.path("schedule.safetensors")
        )
    tr.directions.save(run.path("directions.safetensors"))
    sur.save(run.path("surrogate.safetensors"))
    run.say("\nFigures: gains.png, energy.png, schedule.png")
    return run.finish()


def register(add) -> None:
    p = add(
        "demo",
        cmd_demo,
        "offline tour: fit, gains, fidelity, energy, steered generation",
        "Offline end-to-end demo on Gemma-3-270m and the SST-2 sample shipped with steerlin: "
        "fit directions and the surrogate, scan full-model gains, compare schedule energies, "
        "and generate text with and without steering. Writes gains.png, energy.png, "
        "schedule.png, results.json and results.md to steerlin-demo/.",
    )
    _sizes(p, 100, 50, 50)
    _order(p)
    p.add_argument("--eps", type=float, default=0.1, help="scan step ε (default: 0.1)")
    p.add_argument("--template", default="{text}", help=argparse.SUPPRESS)
    p.add_argument(
        "--target-frac",
        type=float,
        default=0.5,
        help="target = this × the class-mean separation of the concept readout on "
        "the eval split (default: 0.5)",
    )
    _energy_opts(p)
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="generation prompt (repeatable; default: 'The movie was', 'I think this film')",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=20,
        help="tokens to generate per prompt (default: 20)",
    )
    p.add_argument(
        "--steer-target",
        type=float,
        default=2.0,
        help="generation strength |t| in class separations (default 2, the strength "
        "docs/results.md recommends): the demo steers both +t (label 1) and -t, each "
        "calibrated in the generation regime",
    )
    p.add_argument(
        "--n-energy",
        type=_positive_int,
        default=16,
        help="eval prompts per class for the energy target and calibrations (default: 16)",
    )
    p.add_argument("--no-generate", action="store_true", help="skip the generation step")
    p.add_argument(
        "--kl",
        type=float,
        default=None,
        help="size the generation schedules to this KL budget (nats/token, steerlin.budget) "
        "instead of --steer-target (which then gives only the direction)",
    )


def _demo_generation(run, model, sur, args) -> None:
    """Steer generation both ways (±t) with schedules calibrated in the regime of use; judge
    every line (VADER), and report the perplexity ratio to the unsteered text."""
    import numpy as np

    from ..control import Controller
    from ..errors import InputError, UnreachableTargetError
    from ..measure import continuation_scores
    from ..regime import generate
    from ..steer_eval import neutral_stems

    t = abs(float(args.steer_target))
    prompts = args.prompt or list(DEMO_PROMPTS)
    try:
        from ..judges import vader
    except InputError:  # pragma: no cover - the eval extra is part of the demo's set-up
        vader = None
    score = (lambda texts: vader(texts)) if vader is not None else None
    with run.timed("generate"):
        plain = generate(model, prompts, args.max_new_tokens)
    nll0 = float(continuation_scores(model, plain)["nll"].mean())
    texts = {"unsteered": plain.texts}
    gen: dict = {"strength": t, "signs": {}}
    for sign in (+1, -1):
        ctrl = Controller(sur, sign * t, kl=args.kl)
        if sign > 0:
            run.say(f"\nSign convention: {ctrl.sign_convention}.")
        try:
            with run.timed(f"calibrate_generation_{'plus' if sign > 0 else 'minus'}"):
                ctrl.calibrate(model, neutral_stems()["calibration"], n_tokens=8)
        except UnreachableTargetError as exc:
            run.say(f"\n{sign * t:+g}: the schedule could not be calibrated ({exc}).")
            continue
        cal = ctrl.calibration
        with run.timed("generate"):
            steered = generate(model, prompts, args.max_new_tokens, ctrl, positions="generated")
        nll = float(continuation_scores(model, steered)["nll"].mean())
        tg = ctrl.targets[0]
        key = f"{sign * t:+g} ({tg.label_plus if sign > 0 else tg.label_minus})"
        texts[key] = steered.texts
        gen["signs"][key] = {
            "target": ctrl.targets[0].to_meta(),
            "calibration": cal.to_meta(),
            "ppl_ratio": math.exp(nll - nll0),
            "changed": int((plain.new_ids != steered.new_ids).any(dim=1).sum()),
        }
        how = (
            f"measured shift {cal.measured_shift:+.4g}"
            if args.kl is None
            else f"sized to a KL budget of {args.kl:g} nats/token, predicted mean "
            f"{cal.predicted_kl['mean']:.3g}, p95 {cal.predicted_kl['p95']:.3g}"
        )
        run.say(
            f"\n{key}: least-norm schedule for {ctrl.targets[0].describe()}, calibrated in "
            f"the generation regime (x{cal.multiplier:.3g} of the surrogate's size, {how}); "
            "perplexity under the unsteered model "
            f"{math.exp(nll - nll0):.2f}x the unsteered text's; "
            f"{gen['signs'][key]['changed']}/{len(prompts)} continuations changed."
        )
        if sign > 0:
            cal.schedule.save(run.path("schedule_generation.safetensors"))
    judged = {k: (None if score is None else score(v)) for k, v in texts.items()}
    if score is None:
        run.say("(pip install 'steerlin[eval]' for the VADER judge.)")
    else:
        gen["vader_mean"] = {k: float(np.mean(v)) for k, v in judged.items()}
        run.say(
            "VADER compound, mean over the prompts: "
            + ", ".join(f"{k} {v:+.3f}" for k, v in gen["vader_mean"].items())
        )
    rows = []
    for i, p in enumerate(prompts):
        print(f"\nprompt: {p}")
        row = {"prompt": p}
        for k, v in texts.items():
            line = v[i].replace("\n", " ").strip()
            mark = "" if judged[k] is None else f"[VADER {judged[k][i]:+.2f}] "
            print(f"  {k:>22}: {mark}…{line}")
            row[k] = f"{mark}{line}"
        rows.append(row)
    cols = [(k, k, "") for k in rows[0]] if rows else []
    run.md.append(f"## Steered both ways (|t| = {t:g})\n\n" + md_table(rows, cols) + "\n")
    gen["samples"] = rows
    run.results["generation"] = gen
