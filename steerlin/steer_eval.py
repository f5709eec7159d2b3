"""Behavioural evaluation of steering: does the text change, and does the model stay fluent?

For each strategy (a per-layer shape of the schedule) and each target of ±t class separations:

1. size the shape under the surrogate, then calibrate it in the regime of use (teacher-forced
   greedy continuations of held-out calibration stems, the schedule on the last prompt token
   and every generated token; `steerlin.regime`);
2. generate greedy continuations of held-out evaluation stems with it (`apply`, KV cache);
3. judge them: an outside classifier (VADER for sentiment, alt-profanity-check for offensive)
   and the model's own readout of the finished text under the unsteered model;
4. side effects: perplexity of the continuation under the unsteered model, and the measured KL
   of the next-token distribution along the unsteered continuations (teacher-forced);
5. energy in each metric: Σu² (norm-relative), Σ‖u_l b_l‖² (raw), ½uᵀFu (predicted KL).

Strategies (`STRATEGIES`): "min-norm" (least Σu²: the paper's LLV schedule), "min-kl" (least
½uᵀFu), "uniform" (same amplitude on every layer), "last" (last layer only), "best-layer" (the
single layer with the most gain per unit of predicted KL, max h_l²/F_ll; the largest |h_l| in
norm-relative units is the last layer, already "last"), "middle" (the raw class-mean
difference v_l on the middle third of the layers with one coefficient, as repeng /
steering-vectors users set it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from .energy import Metric, least_norm
from .errors import InputError, UnreachableTargetError
from .judges import get_judge
from .regime import (
    Continuations,
    calibrate_regime,
    continuation_scores,
    final_states,
    generate,
    regime_kl,
)

F64 = torch.float64
STRATEGIES = ("min-norm", "min-kl", "uniform", "last", "best-layer", "middle")


def neutral_stems() -> dict[str, list[str]]:
    """The shipped neutral prompt stems: {"calibration": 12, "eval": 36 (3 seeds of 12)}."""
    ref = resources.files("steerlin").joinpath("data", "neutral_stems.txt")
    out: dict[str, list[str]] = {"calibration": [], "eval": []}
    key = None
    for line in ref.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s.startswith("# ---"):
            key = "calibration" if "calibration" in s else "eval"
            continue
        if not s or s.startswith("#") or key is None:
            continue
        out[key].append(s)
    return out


def middle_layers(n_layers: int) -> list[int]:
    """The middle third of the blocks: round(L/3) .. round(2L/3) - 1."""
    lo, hi = round(n_layers / 3), round(2 * n_layers / 3)
    return list(range(lo, max(hi, lo + 1)))


def strategy_shape(
    name: str, h: torch.Tensor, *, kl: Metric | None = None, directions=None
) -> torch.Tensor:
    """Per-layer amplitude shape u [L] (norm-relative) for a strategy, with hᵀu = 1."""
    h = torch.as_tensor(h, dtype=F64)
    L = h.shape[0]
    if name == "min-norm":
        u = least_norm(h, 1.0, torch.eye(L, dtype=F64), list(range(L)))
    elif name == "min-kl":
        if kl is None:
            raise InputError("strategy 'min-kl' needs the KL metric (steerlin.kl_metric)")
        u = least_norm(h, 1.0, kl.W, list(range(L)))
    elif name == "uniform":
        u = torch.ones(L, dtype=F64)
    elif name == "last":
        u = torch.zeros(L, dtype=F64)
        u[-1] = 1
    elif name == "best-layer":
        # the single layer with the most readout change per unit of predicted KL, h_l²/F_ll
        # (the largest |h_l| in norm-relative units is the last layer: "last" covers it)
        if kl is None:
            raise InputError("strategy 'best-layer' needs the KL metric (steerlin.kl_metric)")
        u = torch.zeros(L, dtype=F64)
        u[int((h.pow(2) / kl.W.diagonal().to(F64)).argmax())] = 1
    elif name == "middle":
        if directions is None:
            raise InputError("strategy 'middle' needs the ConceptDirections (raw v_l)")
        v = directions.vectors[:L].to(F64).norm(dim=-1) / directions.scale[:L].to(F64)
        u = torch.zeros(L, dtype=F64)
        mid = middle_layers(L)
        u[mid] = v[mid]
    else:
        raise InputError(f"strategy: expected one of {STRATEGIES}, got {name!r}")
    pred = float(h @ u)
    if pred == 0:
        raise InputError(f"strategy {name!r}: the surrogate predicts no effect from that shape")
    return u / pred


@dataclass(frozen=True)
class EvalSetting:
    """One task's set-up for `steer_eval`."""

    name: str
    judge: str  # "vader" or "profanity"
    plus: str  # name of label 1
    minus: str  # name of label 0


def _pct(x):
    return float(np.mean(x))


def steer_eval(
    model,
    surrogate,
    directions,
    readout,
    *,
    setting: EvalSetting,
    kl: Metric,
    separation: float,
    strategies: Sequence[str] = STRATEGIES,
    strengths: Sequence[float] = (0.5, 1.0, 2.0),
    calibration_stems: Sequence[str] | None = None,
    eval_stems: Sequence[Sequence[str]] | None = None,
    max_new_tokens: int = 30,
    calibration_tokens: int = 8,
    kl_tokens: int = 10,
    schedule_factory=None,
    log=print,
) -> dict:
    """Run the behavioural evaluation (see the module docstring); returns rows and samples.

    schedule_factory(u [L]) -> Schedule builds a schedule from amplitudes (the Controller's).
    eval_stems: seeds of stems (default: the shipped 3 × 12); all seeds generate in one batch.
    """
    stems = neutral_stems()
    cal_stems = list(calibration_stems or stems["calibration"])
    if eval_stems is None:
        ev = stems["eval"]
        eval_stems = [ev[i : i + 12] for i in range(0, len(ev), 12)]
    seeds = [list(s) for s in eval_stems]
    flat = [p for s in seeds for p in s]
    seed_of = np.concatenate([[k] * len(s) for k, s in enumerate(seeds)])
    judge = get_judge(setting.judge)
    h = surrogate.gains.to(F64)
    L = h.shape[0]
    t0 = time.time()

    # unsteered references (calibration continuations: generated once, shared by all)
    cal_cont = generate(model, cal_stems, calibration_tokens)
    base = generate(model, flat, max_new_tokens)
    base_sc = continuation_scores(model, base, readout)
    base_judge = judge(base.texts)
    log(
        f"  unsteered: {setting.judge} {np.mean(base_judge):+.3f}, ppl "
        f"{math.exp(float(base_sc['nll'].mean())):.3f} ({time.time() - t0:.0f} s)"
    )
    rows: list[dict] = []
    samples: dict[str, list[str]] = {"prompt": flat, "unsteered": base.texts}

    def per_seed(values, nll=None):
        out = []
        for k in range(len(seeds)):
            m = seed_of == k
            out.append(float(np.mean(values[m])))
        return out

    base_row = {
        "strategy": "unsteered",
        "t": 0.0,
        "judge": per_seed(base_judge),
        "readout": per_seed(((base_sc["readout"] - base_sc["readout"]) / separation).numpy()),
        "ppl": per_seed_ppl(base_sc["nll"].numpy(), seed_of, len(seeds)),
        "kl": [0.0] * len(seeds),
        "energy_norm": 0.0,
        "energy_raw": 0.0,
        "kl_pred": 0.0,
    }
    rows.append(base_row)
    y_base = base_sc["readout"]
    for name in strategies:
        shape = strategy_shape(name, h, kl=kl, directions=directions)
        for t in strengths:
            for sign in (+1, -1):
                tt = sign * t
                target = tt * separation
                sched = schedule_factory(target * shape, f"{name} {tt:+g}")
                row = {"strategy": name, "t": tt, "layers": sched.layers}
                try:
                    cal = calibrate_regime(
                        model,
                        cal_cont,
                        sched,
                        target,
                        readout,
                        positions="generated",
                        n_new=calibration_tokens,
                    )
                except UnreachableTargetError as exc:
                    row.update(error=str(exc))
                    rows.append(row)
                    log(f"  {name:>10} {tt:+.2g}: unreachable ({exc})")
                    continue
                s = cal.schedule
                u = s.amplitudes.to(F64)
                steered = generate(model, flat, max_new_tokens, s)
                sc = continuation_scores(model, steered, readout)
                jd = judge(steered.texts)
                klm = regime_kl(model, base, s.vectors, n_new=min(kl_tokens, max_new_tokens))
                row.update(
                    multiplier=cal.multiplier,
                    measured_shift=cal.measured_shift,
                    judge=per_seed(jd),
                    readout=per_seed(((sc["readout"] - y_base) / separation).numpy()),
                    ppl=per_seed_ppl(sc["nll"].numpy(), seed_of, len(seeds)),
                    kl=[klm] * len(seeds),
                    energy_norm=float(u @ u),
                    energy_raw=s.raw_energy,
                    kl_pred=0.5 * kl.energy(u),
                    amplitudes=u.tolist(),
                )
                rows.append(row)
                samples[f"{name} {tt:+g}"] = steered.texts
                log(
                    f"  {name:>10} {tt:+.2g}: x{cal.multiplier:.3g} {setting.judge} "
                    f"{np.mean(row['judge']):+.3f} ppl {np.mean(row['ppl']):.2f} KL {klm:.3f} "
                    f"({time.time() - t0:.0f} s)"
                )
    return {"rows": rows, "samples": samples, "n_seeds": len(seeds), "L": L}


def per_seed_ppl(nll: np.ndarray, seed_of: np.ndarray, n_seeds: int) -> list[float]:
    """Corpus perplexity per seed: exp(mean NLL over every continuation token of the seed)."""
    return [float(np.exp(np.mean(nll[seed_of == k]))) for k in range(n_seeds)]


def regime_readout_states(model, cont: Continuations, vectors, **kw):
    """(for checks) x_L at the measured positions with and without `vectors`."""
    return final_states(model, cont, None, **kw), final_states(model, cont, vectors, **kw)


SETTINGS = {
    "sst2": EvalSetting("sst2", "vader", "positive", "negative"),
    "hate": EvalSetting("hate", "profanity", "hateful", "not hateful"),
}


def summarise(result: dict) -> list[dict]:
    """Per (strategy, |t|): judged Δ between +t and −t, the unsteered-relative ppl ratio of
    each sign and the KL, as mean and sd over seeds."""
    rows = result["rows"]
    base = rows[0]
    ppl0 = np.array(base["ppl"])
    out = []
    keys = sorted(
        {(r["strategy"], abs(r["t"])) for r in rows[1:]},
        key=lambda k: (STRATEGIES.index(k[0]) if k[0] in STRATEGIES else 99, k[1]),
    )
    for name, t in keys:
        plus = next((r for r in rows if r["strategy"] == name and r["t"] == t), None)
        minus = next((r for r in rows if r["strategy"] == name and r["t"] == -t), None)
        rec = {"strategy": name, "t": t}
        if plus is None or minus is None or "judge" not in plus or "judge" not in minus:
            rec["error"] = (plus or {}).get("error") or (minus or {}).get("error") or "missing"
            out.append(rec)
            continue
        d = np.array(plus["judge"]) - np.array(minus["judge"])
        dr = np.array(plus["readout"]) - np.array(minus["readout"])
        rp = np.array(plus["ppl"]) / ppl0
        rm = np.array(minus["ppl"]) / ppl0
        worst = np.maximum(rp, rm)
        rec.update(
            judge_plus=float(np.mean(plus["judge"])),
            judge_minus=float(np.mean(minus["judge"])),
            delta=float(d.mean()),
            delta_sd=float(d.std(ddof=1)) if len(d) > 1 else float("nan"),
            n_seeds=len(d),
            delta_seeds=d.tolist(),
            readout_delta=float(dr.mean()),
            ppl_plus=float(rp.mean()),
            ppl_minus=float(rm.mean()),
            ppl_worst=float(worst.mean()),
            ppl_worst_max=float(worst.max()),
            kl=0.5 * (float(np.mean(plus["kl"])) + float(np.mean(minus["kl"]))),
            energy_norm=0.5 * (plus["energy_norm"] + minus["energy_norm"]),
            energy_raw=0.5 * (plus["energy_raw"] + minus["energy_raw"]),
            kl_pred=0.5 * (plus["kl_pred"] + minus["kl_pred"]),
            multiplier=0.5 * (plus["multiplier"] + minus["multiplier"]),
        )
        out.append(rec)
    return out


def format_table(summary: list[dict], judge: str) -> str:
    """Markdown table of `summarise` rows."""
    seeds = sorted({r["n_seeds"] for r in summary if "n_seeds" in r}) or [0]
    head = (
        f"| strategy | t (sep.) | {judge} + | {judge} − | Δ(+,−) ± sd "
        f"({'/'.join(map(str, seeds))} seeds) | own readout Δ "
        "| ppl ratio + / − | KL (nats/token) | Σu² | raw Σ‖u b‖² | ½uᵀFu |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in summary:
        if "error" in r:
            lines.append(f"| {r['strategy']} | {r['t']:g} | unreachable | | | | | | | | |")
            continue
        lines.append(
            f"| {r['strategy']} | {r['t']:g} | {r['judge_plus']:+.3f} | {r['judge_minus']:+.3f} "
            f"| {r['delta']:+.3f}{_sd(r['delta_sd'])} | {r['readout_delta']:+.2f} "
            f"| {r['ppl_plus']:.2f} / {r['ppl_minus']:.2f} | {r['kl']:.3f} "
            f"| {r['energy_norm']:.3g} | {r['energy_raw']:.3g} | {r['kl_pred']:.3g} |"
        )
    return "\n".join(lines)


def _sd(sd: float) -> str:
    """ " ± sd", or nothing for a single seed (no spread measured)."""
    return "" if math.isnan(sd) else f" ± {sd:.3f}"


def plot_tradeoff(summary: list[dict], path, *, judge: str, title: str = "") -> None:
    """Judged Δ(+,−) vs worst-sign perplexity ratio, one curve per strategy (points: |t|)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for name in STRATEGIES:
        rs = [r for r in summary if r["strategy"] == name and "error" not in r]
        if not rs:
            continue
        rs.sort(key=lambda r: r["t"])
        for ax, key in zip(axes, ("ppl_worst", "kl"), strict=True):
            x = [r[key] for r in rs]
            y = [r["delta"] for r in rs]
            ax.errorbar(
                x,
                y,
                yerr=[np.nan_to_num(r["delta_sd"]) for r in rs],
                marker="o",
                ms=4,
                capsize=2,
                label=name,
            )
            for r, xi, yi in zip(rs, x, y, strict=True):
                ax.annotate(
                    f"{r['t']:g}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    axes[0].axvline(1.5, color="0.6", ls="--", lw=0.8)
    axes[0].set_xlabel("perplexity ratio to unsteered (worse of + and − targets)")
    axes[1].set_xlabel("measured KL of next-token distribution (nats/token, mean of ±)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel(f"{judge} mean: +t minus −t")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "steering success vs side effect (labels: t in class separations)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_task(model, task: str, args, *, img_dir, log=print) -> dict:
    """One task of the behavioural evaluation from fitting to table, figure and samples.

    args: sizes ("concept,operating" per class), d, strategies, strengths (comma lists),
    tokens, seeds, data_dir, quick. Used by `steerlin steer-eval` and benchmarks/steer_eval.py.
    """
    import steerlin

    from .control import Controller
    from .fisher import kl_metric
    from .readouts import make_readout

    TASKS = {"sst2": "sst2", "hate": "tweet_eval_hate"}
    if task not in TASKS:
        raise InputError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    nc, no = (int(x) for x in args.sizes.split(","))
    tk = steerlin.load_task(TASKS[task], data_dir=args.data_dir)
    sp = tk.split(nc, no, 0, seed=0)
    t0 = time.time()
    dirs = steerlin.ConceptDirections.fit(
        model, sp.concept.texts, sp.concept.labels, label_names=tk.spec.class_names
    )
    sur = steerlin.Surrogate.fit(
        model, sp.operating.texts, dirs, d=args.d, basis=getattr(args, "basis", "krylov")
    )
    stems = neutral_stems()
    kl = kl_metric(model, stems["calibration"], dirs)
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
    eval_stems = [stems["eval"][i : i + 12] for i in range(0, 12 * args.seeds, 12)]
    res = steer_eval(
        model,
        sur,
        dirs,
        rd,
        setting=setting,
        kl=kl,
        separation=sep,
        strategies=args.strategies.split(","),
        strengths=[float(x) for x in args.strengths.split(",")],
        eval_stems=eval_stems,
        max_new_tokens=args.tokens,
        schedule_factory=factory,
        log=log,
    )
    summ = summarise(res)
    res.update(
        summary=summ,
        separation=sep,
        sign={"+": setting.plus, "-": setting.minus},
        gains=sur.gains.tolist(),
        F=kl.meta["F"].tolist(),
        ridge=kl.meta["ridge_abs"],
    )
    log(format_table(summ, setting.judge))
    from pathlib import Path

    img = Path(img_dir) / f"steer_eval_{task}{'_quick' if args.quick else ''}.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    plot_tradeoff(
        summ,
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
    return res


__all__ = [
    "run_task",
    "STRATEGIES",
    "SETTINGS",
    "neutral_stems",
    "strategy_shape",
    "steer_eval",
    "EvalSetting",
    "summarise",
    "format_table",
    "plot_tradeoff",
]
