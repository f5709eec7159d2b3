"""`steerlin scan`: measure full-model gains on a fit's eval split; fidelity."""

from __future__ import annotations

from ..experiments import TaskRun
from .common import FIDELITY_COLUMNS, Run, seam
from .steps import _fit_record, _gains_table, _load_model, _readout_args


def cmd_scan(args) -> int:
    from .. import plots
    from ..directions import ConceptDirections
    from ..gains import exact_gains, scan_gains
    from ..surrogate import Surrogate

    fit_dir, cfg, split_rec = _fit_record(args.fit_dir)
    # the files are checked before the model loads, then against it
    ConceptDirections.load(fit_dir / "directions.safetensors")
    Surrogate.load(fit_dir / "surrogate.safetensors")
    run = Run(args, "scan", fit_dir / "scan")
    model = _load_model(args, run, cfg)
    dirs = ConceptDirections.load(fit_dir / "directions.safetensors", model)
    sur = Surrogate.load(fit_dir / "surrogate.safetensors", model)
    kind, lw = _readout_args(sur)
    ev = seam("encode_prompts")(model, split_rec["eval"]["texts"])
    with run.timed("scan"):
        measured = scan_gains(
            model,
            ev,
            dirs,
            eps=args.eps,
            readout=kind,
            label_words=lw,
            method=args.method,
            batch_size=args.batch_size,
            progress=args.progress,
        )
    exact = None
    if not args.no_exact:
        with run.timed("exact"):
            exact = exact_gains(
                model,
                ev,
                dirs,
                readout=kind,
                label_words=lw,
                batch_size=args.batch_size,
                progress=args.progress,
            )
    fid = TaskRun(
        split_rec.get("task"),
        dirs,
        {f"{sur.meta.get('basis')}/{kind}": sur},
        {kind: measured},
        {},
        {} if exact is None else {kind: exact},
        {},
        {},
    ).table()
    run.say(f"Full-model gains on {len(ev)} eval prompts ({args.method} scan, ε = {args.eps}).")
    run.table("Fidelity: surrogate vs measured gains", fid, FIDELITY_COLUMNS)
    _gains_table(run, "Per-layer gains", sur, measured, exact)
    plots.plot_gains(
        sur.gains,
        measured,
        run.path("gains.png"),
        exact=exact,
        title=f"{cfg.get('model', run.config['model'])} on "
        f"{split_rec.get('task')}: gains (d={sur.d}, {kind} readout)",
    )
    return run.finish(
        fidelity=fid,
        measured=measured,
        exact=exact,
        predicted=sur.gains,
        predicted_paper=sur.gains_paper,
        fit_dir=fit_dir,
    )


def register(add) -> None:
    p = add("scan", cmd_scan, "measure full-model gains on a fit's eval split; fidelity")
    p.add_argument("--fit-dir", required=True, help="output folder of `steerlin fit`")
    p.add_argument("--eps", type=float, default=0.1, help="scan step ε (default: 0.1)")
    p.add_argument(
        "--method",
        choices=("cached", "hooks"),
        default="cached",
        help="cached single-token path or full forwards with hooks (default: cached)",
    )
    p.add_argument("--no-exact", action="store_true", help="skip the exact first-order gains")
