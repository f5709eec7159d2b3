"""`steerlin control`: minimum-energy steering schedule for a target shift."""

from __future__ import annotations

import math

from ..errors import SteerlinError
from ..report import columns, read_json
from .common import ENERGY_COLUMNS, CliError, Run, _csv, parse_layers, seam
from .options import _energy_opts
from .steps import _calibrated_schedules, _energy, _fit_record, _load_model


def cmd_control(args) -> int:
    from .. import plots
    from ..control import Controller
    from ..surrogate import Surrogate

    fit_dir, cfg, split_rec = _fit_record(args.fit_dir)
    run = Run(args, "control", fit_dir / "control")
    sur = Surrogate.load(fit_dir / "surrogate.safetensors")
    L = sur.n_layers
    layers = parse_layers(args.layers, L)
    if args.llama_cpp and layers is None:
        layers = list(range(2, L))
        args.layers = f"2-{L - 1}"
        run.say(
            f"--llama-cpp: restricting the schedule to layers 2-{L - 1} (llama.cpp control "
            "vectors cannot express injections at blocks 0 and 1)."
        )
    target = args.target
    if target is None:
        fit_res = read_json(fit_dir / "results.json", "--fit-dir", error=CliError)["results"]
        target = float(fit_res["separation"]["half_separation"])
        run.say(
            f"No --target: using half the readout's class-mean separation recorded by fit, "
            f"{target:+.4g}."
        )
    run.config.update(target=target, layers=layers, model=cfg.get("model"), dtype=cfg.get("dtype"))
    kw = dict(kl=args.kl, kl_stat=args.kl_stat)
    ctrl = Controller(sur, target, units="raw", layers=layers, seed=args.seed, **kw)
    baselines = _csv(args.baselines, what="--baselines") if args.baselines else []
    if args.kl is not None:
        schedule, rows, scheds = _kl_budget(run, args, cfg, ctrl, baselines)
    elif args.calibrate:
        model = _load_model(args, run, cfg)
        ev = seam("encode_prompts")(model, split_rec["eval"]["texts"])
        rows = _energy(run, model, ev, sur, target, args)
        scheds = _calibrated_schedules(ctrl, rows)
        llv = rows[0]
        if not math.isfinite(llv.get("multiplier", math.nan)):
            raise CliError(f"calibration of the LLV schedule failed: {llv.get('error')}")
        schedule = ctrl.schedule.scaled(llv["multiplier"], calibrated=True)
        run.table(
            f"Energy to reach {target:+.4g} (calibrated on the full model)", rows, ENERGY_COLUMNS
        )
        plots.plot_energy(
            rows, run.path("energy.png"), title=f"Energy to shift the readout by {target:+.3g}"
        )
    else:
        plans = [("llv", ctrl.schedule)]
        for kind in baselines:
            try:
                s = ctrl.baseline(kind)
            except SteerlinError as exc:
                run.say(f"baseline {kind!r} skipped: {exc}")
                continue
            plans.append((s.strategy, s))
        e0 = plans[0][1].energy
        rows = [
            {
                "strategy": n,
                "layers": s.layers,
                "energy": s.energy,
                "ratio_to_llv": s.energy / e0,
                "raw_energy": s.raw_energy,
                "predicted_shift": s.predicted_shift,
            }
            for n, s in plans
        ]
        scheds = {n: s.amplitudes for n, s in plans}
        schedule = ctrl.schedule
        run.table(
            f"Energy to reach {target:+.4g} under the surrogate (not calibrated; "
            "--calibrate checks it on the full model)",
            rows,
            columns("strategy layers energy ratio_to_llv raw_energy predicted_shift"),
        )
    schedule.save(run.path("schedule.safetensors"))
    amp = [{"layer": l, "u": float(schedule.amplitudes[l])} for l in range(L)]
    run.table(
        "LLV schedule amplitudes (norm-relative)",
        amp,
        [("layer", "layer", ""), ("u", "u_l", ".4g")],
    )
    plots.plot_schedule(
        scheds,
        run.path("schedule.png"),
        title=f"Schedules for a shift of {target:+.3g}"
        + (" (calibrated)" if args.calibrate or args.kl is not None else " (surrogate-sized)"),
    )
    if args.llama_cpp:
        p = schedule.to_llama_cpp(args.llama_cpp)
        run.say(f"\nllama.cpp control vector: {p} (use: llama-cli --control-vector {p})")
    run.say(f"\nSchedule: {run.path('schedule.safetensors')} — {schedule!r}")
    return run.finish(
        energy=rows,
        schedule=schedule.amplitudes,
        schedules=scheds,
        schedule_meta=schedule.meta,
        fit_dir=fit_dir,
    )


def _kl_budget(run, args, cfg, ctrl, baselines):
    """--kl: the LLV schedule and the baselines sized to a KL budget (steerlin.budget) on the
    neutral calibration stems' greedy continuations, in the generation regime; the predicted
    KL beside the KL measured in one steered run there (then rescaled once by it)."""
    from ..budget import schedule_fisher
    from ..regime import generate
    from ..steer_eval import neutral_stems

    model = _load_model(args, run, cfg)
    cont = generate(model, neutral_stems()["calibration"], args.kl_tokens)
    plans = [ctrl.schedule] + [ctrl.baseline(k) for k in baselines]
    fi = schedule_fisher(model, cont, plans[0], n_tokens=args.kl_tokens)
    rows, scheds, llv = [], {}, None
    for s in plans:
        ctrl.calibrate(model, cont, n_tokens=args.kl_tokens, schedule=s, correct=True, fisher=fi)
        cal = ctrl.calibration
        llv = cal.schedule if llv is None else llv
        scheds[s.strategy] = cal.schedule.amplitudes
        rows.append(
            {"strategy": s.strategy, "layers": s.layers, "energy": cal.schedule.energy}
            | {f"predicted_kl_{k}": v for k, v in cal.predicted_kl.items()}
            | {f"measured_kl_{k}": v for k, v in cal.measured_kl.items()}
            | {"correction": cal.correction, "multiplier": cal.multiplier}
        )
    cols = "strategy layers energy predicted_kl_mean measured_kl_mean predicted_kl_p95 "
    cols += "measured_kl_p95 correction"
    run.table(
        f"Schedules sized to a KL budget of {args.kl:g} nats/token ({args.kl_stat}; first-order "
        "prediction vs one measured run on the calibration stems, then rescaled once by it)",
        rows,
        [(c, c, "" if c in ("strategy", "layers") else ".4g") for c in cols.split()],
    )
    return llv, rows, scheds


def register(add) -> None:
    p = add("control", cmd_control, "minimum-energy steering schedule for a target shift")
    p.add_argument("--fit-dir", required=True, help="output folder of `steerlin fit`")
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="readout shift Δy to reach (default: half the class-mean separation recorded by fit)",
    )
    p.add_argument(
        "--layers", default=None, help="allowed layers, e.g. '2-17' or '3,5,7' (default: all)"
    )
    _energy_opts(p)
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="rescale every schedule on the full model (bisection) to really reach "
        "the target; writes energy.png",
    )
    p.add_argument(
        "--kl",
        type=float,
        default=None,
        help="size the schedules to this KL budget (nats/token of next-token KL along the "
        "neutral stems' continuations; the target's sign gives the direction) instead",
    )
    p.add_argument("--kl-stat", choices=("mean", "p95"), default="mean", help="budgeted statistic")
    p.add_argument("--kl-tokens", type=int, default=8, help="continuation tokens (default: 8)")
    p.add_argument(
        "--llama-cpp",
        default=None,
        metavar="FILE",
        help="also export a llama.cpp control-vector GGUF",
    )
