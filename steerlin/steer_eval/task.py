"""One task of the behavioural evaluation from fitting to table, figure and samples
(`run_task`: `steerlin steer-eval` and benchmarks/steer_eval.py)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import InputError
from .cost import Cost, shared_costs
from .setting import SETTINGS, TASKS, neutral_stems
from .strategies import REGISTRY
from .tables import (
    format_correlations,
    format_table,
    plot_tradeoff,
    readout_correlations,
    summarise,
)


def _shared_steps(model, task: str, args, strategies: list[str]) -> tuple[dict, dict]:
    """The steps strategies share, each with its cost: directions on the concept split, the
    surrogate on the operating split, the KL metric on the calibration stems and (if asked
    for) the exact gains. Returns ({directions, fit, kl, exact}, {step: Cost})."""
    import steerlin

    from ..fisher import kl_metric

    nc, no = (int(x) for x in args.sizes.split(","))
    tk = steerlin.load_task(TASKS[task], data_dir=args.data_dir)
    sp = tk.split(nc, no, 0, seed=0)
    steps = {"directions": Cost(), "fit": Cost(), "kl": Cost(), "exact": Cost()}
    with steps["directions"].measure(model):
        dirs = steerlin.ConceptDirections.fit(
            model, sp.concept.texts, sp.concept.labels, label_names=tk.spec.class_names
        )
    with steps["fit"].measure(model):
        sur = steerlin.Surrogate.fit(
            model, sp.operating.texts, dirs, d=args.d, basis=getattr(args, "basis", "krylov")
        )
    with steps["kl"].measure(model):
        kl = kl_metric(model, neutral_stems()["calibration"], dirs)
    exact = None
    if "exact" in strategies:
        with steps["exact"].measure(model):
            exact = steerlin.exact_gains(model, sp.operating.texts, dirs)
    return {"directions": dirs, "fit": sur, "kl": kl, "exact": exact}, steps


def _report(res: dict, task: str, args, img_dir, log) -> None:
    """The table, the readout correlations, the trade-off figure and three samples."""
    setting = SETTINGS[task]
    log(format_table(res["summary"], setting.judge))
    if res["readout_correlations"]:
        log(
            "\nwhich readout predicts the judged change:\n"
            + format_correlations(res["readout_correlations"])
        )
    name = str(getattr(args, "model", None) or "gemma-3-270m")
    tag = ("" if name == "gemma-3-270m" else "_" + name.replace("/", "_")) + (
        "_quick" if args.quick else ""
    )
    img = Path(img_dir) / f"steer_eval_{task}{tag}.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    plot_tradeoff(
        res["summary"],
        img,
        judge=setting.judge,
        title=f"Gemma-3-270m, {task}: judged shift vs side effect ({args.seeds} seeds × 12 stems)",
    )
    log(f"figure: {img}")
    s = res["samples"]
    for i in range(min(3, len(s["prompt"]))):
        log(f"\n> {s['prompt'][i]}\n  unsteered: {s['unsteered'][i]!r}")
        for k in s:
            if k in ("prompt", "unsteered") or not k.startswith(("min-kl", "min-norm")):
                continue
            log(f"  {k:>14}: {s[k][i]!r}")


def run_task(model, task: str, args, *, img_dir, log=print, checkpoint=None) -> dict:
    """One task of the behavioural evaluation from fitting to table, figure and samples.

    args: sizes ("concept,operating" per class), d, strategies, strengths (comma lists),
    tokens, seeds, data_dir, quick. Used by `steerlin steer-eval` and benchmarks/steer_eval.py.
    """
    from ..control import Controller
    from ..readouts import make_readout
    from . import steer_eval

    if task not in TASKS:
        raise InputError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    t0 = time.time()
    strategies = args.strategies.split(",")
    fitted, steps = _shared_steps(model, task, args, strategies)
    dirs, sur, kl, exact = (fitted[k] for k in ("directions", "fit", "kl", "exact"))
    sep = float(dirs.vectors[-1].double().norm())
    setting = SETTINGS[task]
    log(
        f"\n{task}: + = label 1 = {setting.plus!r}, − = label 0 = {setting.minus!r}; one class "
        f"separation of the concept readout on the concept split = {sep:.4g}; fit "
        f"{time.time() - t0:.0f} s; F eigenvalues "
        f"{kl.meta['eig_min']:.3g}..{kl.meta['eig_max']:.3g}"
        f" (ridge {kl.meta['ridge_abs']:.3g})"
    )
    ctrl = Controller(sur, 1.0)
    factory = lambda u, name: ctrl._make(u[None].to(torch.float64), name)
    rd = make_readout(model, "concept", dirs.unit[-1])
    try:
        logit_rd = make_readout(model, "logits", None, label_words=setting.label_words)
    except InputError as exc:  # label words that are not single tokens for this tokenizer
        log(f"  no logit readout: {exc}")
        logit_rd = None
    eval_stems = [neutral_stems()["eval"][i : i + 12] for i in range(0, 12 * args.seeds, 12)]
    res = steer_eval(
        model,
        sur,
        dirs,
        rd,
        setting=setting,
        kl=kl,
        separation=sep,
        strategies=strategies,
        strengths=[float(x) for x in args.strengths.split(",")],
        eval_stems=eval_stems,
        max_new_tokens=args.tokens,
        schedule_factory=factory,
        exact_gains=exact,
        logit_readout=logit_rd,
        search_coefs=[float(x) for x in str(getattr(args, "search_coefs", "1,2,4,8")).split(",")],
        log=log,
        checkpoint=checkpoint,
        chat=bool(getattr(args, "chat", False)),
    )
    # what each strategy needs before its own calibrations or search (`REGISTRY`'s needs)
    res["shared_costs"] = shared_costs(steps, {n: s.needs for n, s in REGISTRY.items()})
    summ = summarise(res)
    res.update(
        summary=summ,
        readout_correlations=readout_correlations(summ),
        exact_gains=None if exact is None else exact.tolist(),
        separation=sep,
        sign={"+": setting.plus, "-": setting.minus},
        gains=sur.gains.tolist(),
        F=kl.meta["F"].tolist(),
        ridge=kl.meta["ridge_abs"],
    )
    _report(res, task, args, img_dir, log)
    return res
