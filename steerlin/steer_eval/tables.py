"""The tables and figures of a steer-eval run: per (strategy, |t|) summaries over seeds
(`summarise`), which readout predicts the judged change (`readout_correlations`), their
markdown tables and the trade-off figure (`plot_tradeoff`)."""

from __future__ import annotations

import math

import numpy as np

from .cost import cost_of
from .strategies import STRATEGIES


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
        if plus.get("logit_readout") is not None and minus.get("logit_readout") is not None:
            rec["logit_readout_delta"] = float(
                np.mean(np.array(plus["logit_readout"]) - np.array(minus["logit_readout"]))
            )
        if "choice" in plus:
            rec["choice"] = f"{plus['choice']} c={t:g}"
        cost = cost_of(result, name, t)
        if cost is not None:
            rec["cost"] = cost
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
            multiplier=0.5 * (plus.get("multiplier", math.nan) + minus.get("multiplier", math.nan)),
        )
        out.append(rec)
    return out


def readout_correlations(summary: list[dict]) -> dict:
    """Which target definition predicts the judged change: Pearson and Spearman correlation,
    across strategies and strengths, of judged Δ(+,−) with (a) the calibrated concept shift at
    x_L (2t separations: what each schedule was sized to), (b) the concept readout and (c) the
    logit readout (label words) of the finished text under the unsteered model. Rows without
    a calibration (searched) are left out of (a)."""
    from scipy.stats import pearsonr, spearmanr

    rows = [r for r in summary if "delta" in r]
    preds = {
        "target (concept at x_L, calibrated)": lambda r: None if "choice" in r else 2 * r["t"],
        "concept readout of the text": lambda r: r.get("readout_delta"),
        "logit readout of the text": lambda r: r.get("logit_readout_delta"),
    }
    out = {}
    for key, fn in preds.items():
        pairs = [(fn(r), r["delta"]) for r in rows if fn(r) is not None]
        if len(pairs) < 3:
            continue
        x, y = np.array(pairs).T
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        out[key] = {
            "n": len(pairs),
            "pearson": float(pearsonr(x, y)[0]),
            "spearman": float(spearmanr(x, y)[0]),
        }
    return out


def format_correlations(corr: dict) -> str:
    """Markdown table of `readout_correlations`."""
    lines = ["| predictor of judged Δ | rows | Pearson | Spearman |", "|---|---|---|---|"]
    for k, v in corr.items():
        lines.append(f"| {k} | {v['n']} | {v['pearson']:+.2f} | {v['spearman']:+.2f} |")
    return "\n".join(lines)


def format_table(summary: list[dict], judge: str) -> str:
    """Markdown table of `summarise` rows."""
    seeds = sorted({r["n_seeds"] for r in summary if "n_seeds" in r}) or [0]
    head = (
        f"| strategy | t (sep.) | {judge} + | {judge} − | Δ(+,−) ± sd "
        f"({'/'.join(map(str, seeds))} seeds) | own readout Δ "
        "| ppl ratio + / − | KL (nats/token) | Σu² | raw Σ‖u b‖² | ½uᵀFu "
        "| cost: s / forward tokens |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in summary:
        t = r.get("choice", f"{r['t']:g}")
        if "error" in r:
            lines.append(f"| {r['strategy']} | {t} | unreachable | | | | | | | | | |")
            continue
        c = r.get("cost")
        cost = "" if c is None else f"{c['seconds']:.0f} / {c['forward_tokens']:,}"
        lines.append(
            f"| {r['strategy']} | {t} | {r['judge_plus']:+.3f} | {r['judge_minus']:+.3f} "
            f"| {r['delta']:+.3f}{_sd(r['delta_sd'])} | {r['readout_delta']:+.2f} "
            f"| {r['ppl_plus']:.2f} / {r['ppl_minus']:.2f} | {r['kl']:.3f} "
            f"| {r['energy_norm']:.3g} | {r['energy_raw']:.3g} | {r['kl_pred']:.3g} | {cost} |"
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
