"""`steerlin ablate`: fidelity against d, ε and the basis."""

from __future__ import annotations

from ..report import Timer, columns, fidelity_columns
from .common import _csv
from .options import _data, _positive_int, _sizes
from .steps import _start, _task_data


def cmd_ablate(args) -> int:
    from ..directions import ConceptDirections
    from ..experiments import fit_surrogates, scan_eps
    from ..gains import exact_gains

    ds = _csv(args.d, int, "--d")
    epss = _csv(args.eps, float, "--eps")
    bases = _csv(args.basis, what="--basis")
    run, model = _start(args, "ablate", "steerlin-ablate", [args.task])
    task, _, enc, lw = _task_data(args, run, model, args.task)
    with run.timed("directions"):
        dirs = ConceptDirections.fit(
            model,
            enc.concept.texts,
            list(enc.concept.labels),
            batch_size=args.batch_size,
            progress=args.progress,
        )
    say = lambda msg: print(msg, flush=True)
    timer = Timer(run.timings)
    sur = fit_surrogates(
        model,
        enc.operating.texts,
        dirs,
        [(basis, d) for basis in bases for d in sorted(set(ds) | {args.d_ref})],
        readout=args.readout,
        label_words=lw,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=args.progress,
        timer=timer,
        say=say,
    )
    measured = scan_eps(
        model,
        enc.eval.texts,
        dirs,
        sorted(set(epss) | {args.eps_ref}),
        readout=args.readout,
        label_words=lw,
        batch_size=args.batch_size,
        progress=args.progress,
        timer=timer,
        say=say,
    )
    with run.timed("exact"):
        exact = exact_gains(
            model,
            enc.eval.texts,
            dirs,
            readout=args.readout,
            label_words=lw,
            batch_size=args.batch_size,
            progress=args.progress,
        )
    lin_rows = _linearity_rows(exact, measured, epss)
    rows = _fidelity_rows(sur, measured, dirs.scale, bases, ds, epss, args.d_ref, args.eps_ref)
    _report(run, rows, lin_rows, epss, args, task.name)
    return run.finish(
        rows=rows,
        measured={str(k): v for k, v in measured.items()},
        exact=exact,
        linearity=lin_rows,
        predicted={f"{b}/{d}": s.gains for (b, d), s in sur.items()},
    )


def _linearity_rows(exact, measured: dict, epss: list[float]) -> list[dict]:
    """How linear the full model is at each ε: the scan over the exact first-order gain, per
    layer, then the scans' Spearman and Pearson against the exact gains across layers."""
    from ..metrics import fidelity

    lin_rows = []
    for layer in range(len(exact)):
        row: dict = {"layer": layer, "exact": float(exact[layer])}
        for eps in epss:
            row[f"r{eps:g}"] = float(measured[eps][layer] / exact[layer])
        lin_rows.append(row)
    fids = {eps: fidelity(exact, measured[eps]) for eps in epss}
    lin_rows.append({"layer": "Spearman", **{f"r{e:g}": f.spearman for e, f in fids.items()}})
    lin_rows.append({"layer": "Pearson", **{f"r{e:g}": f.pearson for e, f in fids.items()}})
    return lin_rows


def _fidelity_rows(sur: dict, measured: dict, scale, bases, ds, epss, d_ref, eps_ref) -> list:
    """Fidelity of each surrogate's gains (both variants) against the ±ε scans: the d sweep
    at ε = eps_ref, the ε sweep at d = d_ref, per basis."""
    from ..metrics import fidelity

    rows = []
    for basis in bases:
        for sweep, xs in (("d", ds), ("eps", epss)):
            for x in xs:
                d, eps = (x, eps_ref) if sweep == "d" else (d_ref, x)
                s = sur[basis, d]
                for variant, g in (("per-prompt", s.gains), ("paper", s.gains_paper)):
                    f = fidelity(g, measured[eps], scale=scale, identity=s.gains_identity)
                    rows.append(
                        dict(sweep=sweep, basis=basis, d=d, eps=eps, variant=variant) | f.as_dict()
                    )
    return rows


def _report(run, rows: list, lin_rows: list, epss, args, task_name: str) -> None:
    """The d and ε tables, the linearity table and the two raw-unit figures."""
    from .. import plots

    cols = columns("basis d eps variant") + fidelity_columns()
    run.table(f"Fidelity vs d (ε = {args.eps_ref:g})", [r for r in rows if r["sweep"] == "d"], cols)
    run.table(f"Fidelity vs ε (d = {args.d_ref})", [r for r in rows if r["sweep"] == "eps"], cols)
    run.table(
        "Linearity of the full model: scan(ε) / exact first-order gain, per layer "
        "(1 = linear; last rows: scan(ε) vs exact across layers)",
        lin_rows,
        [("layer", "layer", ""), ("exact", "exact gain", ".4g")]
        + [(f"r{eps:g}", f"ε = {eps:g}", ".3f") for eps in epss],
    )
    # plotted in raw units (the headline; norm-relative scores are in the tables)
    pp = [
        dict(r, spearman=r["raw_spearman"], pearson=r["raw_pearson"])
        for r in rows
        if r["variant"] == "per-prompt"
    ]
    titles = {
        "d": f"Raw-unit fidelity vs reduced order d ({task_name}, ε = {args.eps_ref:g})",
        "eps": f"Raw-unit fidelity vs scan step ε ({task_name}, d = {args.d_ref})",
    }
    for sweep, title in titles.items():
        plots.plot_ablation(
            [r for r in pp if r["sweep"] == sweep],
            run.path(f"ablation_{sweep}.png"),
            x=sweep,
            hue="basis",
            title=title,
        )


def register(add) -> None:
    p = add("ablate", cmd_ablate, "fidelity against d, ε and the basis")
    p.add_argument("--d", default="4,8,16,32,64", help="orders to try (default: 4,8,16,32,64)")
    p.add_argument(
        "--eps",
        default="0.01,0.05,0.1,0.2,0.5",
        help="scan steps to try (default: 0.01,0.05,0.1,0.2,0.5)",
    )
    p.add_argument(
        "--basis", default="krylov,random", help="bases to compare (default: krylov,random)"
    )
    p.add_argument(
        "--d-ref", type=_positive_int, default=32, help="d used for the ε sweep (default: 32)"
    )
    p.add_argument(
        "--eps-ref", type=float, default=0.1, help="ε used for the d sweep (default: 0.1)"
    )
    p.add_argument("--task", default="sst2", help="task (default: sst2)")
    p.add_argument(
        "--readout",
        choices=("concept", "logits"),
        default="concept",
        help="readout (default: concept)",
    )
    p.add_argument("--label-words", default=None, help="'POS,NEG' (default: the task's)")
    _data(p)
    _sizes(p)
