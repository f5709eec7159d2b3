"""Figures for steerlin's results: gains, energies, schedules, ablations, scaling (PNG files).

Every function takes plain data (tensors, lists, the row dicts the library and the CLI
produce) and an output path, writes one PNG with the non-interactive Agg backend and returns
the path. Nothing here touches a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .errors import InputError  # noqa: E402
from .metrics import fidelity  # noqa: E402

DPI = 130
COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _as_array(x, what: str) -> np.ndarray:
    a = np.asarray(torch.as_tensor(x, dtype=torch.float64).detach().cpu(), dtype=np.float64)
    if a.ndim != 1:
        raise InputError(f"{what}: expected a 1-D per-layer curve, got shape {a.shape}")
    return a


def _normalised(a: np.ndarray) -> np.ndarray:
    m = np.abs(a).max() if a.size else 0.0
    return a / m if m > 0 else a


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _fmt_ratio(r: float) -> str:
    if not math.isfinite(r):
        return "-"
    return f"×{r:.3g}" if r < 100 else f"×{r:.0f}"


def _lower(lo: float, pad: float = 0.05) -> float:
    """Lower y limit for correlations: zoomed in when all are high, never below -1."""
    return max(-1.05, min(0.9, lo - pad))


def _fmt_params(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


# ------------------------------------------------------------------ gains


def plot_gains(
    predicted,
    measured,
    path,
    *,
    title: str = "Per-layer steering gains",
    exact=None,
    predicted_label: str = "LLV surrogate (predicted)",
    measured_label: str = "full model (measured, ±ε scan)",
) -> Path:
    """Predicted vs measured per-layer gains, each divided by its max |.|.

    The title carries Spearman / Pearson of predicted vs measured (`steerlin.fidelity`); the
    optional `exact` curve (first-order gains from one backward pass) gets its own numbers in
    the legend.
    """
    p = _as_array(predicted, "predicted")
    m = _as_array(measured, "measured")
    if p.shape != m.shape:
        raise InputError(f"predicted and measured: expected equal lengths, got {p.size}, {m.size}")
    layers = np.arange(p.size)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.axhline(0, color="0.75", lw=0.8)
    ax.plot(layers, _normalised(m), "o-", color=COLORS[0], lw=2, ms=5, label=measured_label)
    ax.plot(layers, _normalised(p), "s--", color=COLORS[1], lw=2, ms=5, label=predicted_label)
    if exact is not None:
        e = _as_array(exact, "exact")
        f_e = fidelity(e, m) if e.size >= 3 else None
        lab = "exact first-order (backward pass)"
        if f_e is not None:
            lab += f": ρ={f_e.spearman:.3f}, r={f_e.pearson:.3f}"
        ax.plot(layers, _normalised(e), "^:", color=COLORS[2], lw=1.5, ms=5, label=lab)
    sub = ""
    if p.size >= 3:
        f = fidelity(p, m)
        sub = f"\nsurrogate vs measured: Spearman {f.spearman:.3f}, Pearson {f.pearson:.3f}"
    ax.set_title(title + sub, fontsize=11)
    ax.set_xlabel("injection layer l (block input)")
    ax.set_ylabel("gain dy/du_l  (normalised by max |gain|)")
    ax.set_xticks(layers if p.size <= 40 else layers[:: max(1, p.size // 20)])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5, loc="best")
    return _save(fig, path)


# ------------------------------------------------------------------ energy


def plot_energy(rows: Sequence[Mapping[str, Any]], path, *, title: str | None = None) -> Path:
    """Calibrated norm-relative energy Σu² per strategy (rows from `compare_energy`), log y.

    Each bar is annotated with its energy ratio to the LLV schedule. Strategies that could not
    reach the target (energy inf) get no bar and are listed in the title.
    """
    rows = list(rows)
    if not rows:
        raise InputError("rows: expected at least one energy row, got none")
    ok = [r for r in rows if math.isfinite(float(r.get("energy", math.inf)))]
    bad = [str(r["strategy"]) for r in rows if r not in ok]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(ok) + 2.5), 4.5))
    names = [str(r["strategy"]) for r in ok]
    energies = np.array([float(r["energy"]) for r in ok])
    colors = [
        COLORS[1] if n == "llv" else ("0.65" if n.startswith("random") else COLORS[0])
        for n in names
    ]
    hatches = ["//" if n.startswith("random (") else "" for n in names]
    x = np.arange(len(ok))
    if ok:
        ax.bar(x, energies, color=colors, edgecolor="black", lw=0.6, hatch=hatches)
        ax.set_yscale("log")
        pos = energies[energies > 0]
        lo, hi = (pos.min(), pos.max()) if pos.size else (1e-3, 1.0)
        ax.set_ylim(lo / 3, hi * 6)
        for xi, r, e in zip(x, ok, energies, strict=True):
            ratio = float(r.get("ratio_to_llv", math.nan))
            ax.annotate(
                _fmt_ratio(ratio),
                (xi, e),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=9,
                fontweight="bold" if names[xi] == "llv" else "normal",
            )
    else:
        ax.text(0.5, 0.5, "no strategy reached the target", ha="center", transform=ax.transAxes)
    ax.set_xticks(x, [n.replace("random (median", "random\n(median") for n in names])
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=9)
    ax.set_xlabel("strategy")
    ax.set_ylabel("energy Σ u_l²  (norm-relative units, log)")
    t = title or "Energy to reach the target shift (calibrated on the full model)"
    t += "\nlabels: energy ratio to the LLV minimum-energy schedule"
    if bad:
        t += f"\nunreachable (no bar): {', '.join(bad)}"
    ax.set_title(t, fontsize=10.5)
    ax.grid(axis="y", alpha=0.3, which="both")
    return _save(fig, path)


# ------------------------------------------------------------------ schedules


def plot_schedule(
    schedules: Mapping[str, Any], path, *, title: str = "Steering schedules: amplitude per layer"
) -> Path:
    """Amplitudes u_l per layer for several named schedules, as grouped bars."""
    if not schedules:
        raise InputError("schedules: expected at least one named schedule, got none")
    curves = {str(k): _as_array(v, f"schedules[{k!r}]") for k, v in schedules.items()}
    n = {c.size for c in curves.values()}
    if len(n) != 1:
        raise InputError(f"schedules: expected equal lengths, got {sorted(n)}")
    L = n.pop()
    k = len(curves)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(7.0, 0.42 * L + 2), 4.2))
    ax.axhline(0, color="0.6", lw=0.8)
    for i, (name, amp) in enumerate(curves.items()):
        ax.bar(np.arange(L) - 0.4 + width * (i + 0.5), amp, width, label=name, color=COLORS[i % 10])
    ax.set_xticks(np.arange(L))
    ax.set_xlabel("injection layer l (block input)")
    ax.set_ylabel("amplitude u_l  (fraction of mean ‖x_l‖)")
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8.5)
    return _save(fig, path)


# ------------------------------------------------------------------ ablation and scaling


def _group(rows, hue: str | None, x: str) -> dict[str, list[Mapping[str, Any]]]:
    """Rows grouped into labelled curves by `hue` (and by variant, if several are present)."""
    variants = {r.get("variant") for r in rows}
    groups: dict[str, list] = {}
    for r in rows:
        label = str(r.get(hue, "")) if hue else ""
        if len(variants) > 1 and r.get("variant") is not None:
            label = f"{label} ({r['variant']})" if label else str(r["variant"])
        groups.setdefault(label or "fidelity", []).append(r)
    return {k: sorted(v, key=lambda r: float(r[x])) for k, v in groups.items()}


def plot_ablation(
    rows: Sequence[Mapping[str, Any]],
    path,
    *,
    x: str = "d",
    hue: str | None = "basis",
    title: str | None = None,
) -> Path:
    """Fidelity (Spearman and Pearson, two panels) against `x` ("d" or "eps"), one curve per
    value of `hue` (e.g. the basis). Rows: dicts with x, hue, "spearman", "pearson"."""
    rows = [r for r in rows if r.get(x) is not None and "spearman" in r]
    if not rows:
        raise InputError(f"rows: expected rows with {x!r}, 'spearman' and 'pearson', got none")
    groups = _group(rows, hue, x)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    xs = sorted({float(r[x]) for r in rows})
    for ax, metric in zip(axes, ("spearman", "pearson"), strict=True):
        for i, (label, rs) in enumerate(groups.items()):
            ax.plot(
                [float(r[x]) for r in rs],
                [float(r[metric]) for r in rs],
                "o-",
                color=COLORS[i % 10],
                lw=2,
                label=label,
            )
        if len(xs) > 1 and xs[0] > 0 and xs[-1] / xs[0] >= 8:
            ax.set_xscale("log", base=2 if x == "d" else 10)
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.minorticks_off()
        ax.set_xlabel({"d": "reduced order d", "eps": "scan step ε (norm-relative)"}.get(x, x))
        ax.set_ylabel(f"{metric.capitalize()} correlation (predicted vs measured)")
        ax.set_title(metric.capitalize())
        lo = min(float(r[metric]) for r in rows)
        ax.set_ylim(_lower(lo), 1.01)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8.5, title=hue if hue else None)
    fig.suptitle(title or f"Surrogate fidelity vs {x}", fontsize=12)
    return _save(fig, path)


def plot_fidelity_vs_d(
    rows: Sequence[Mapping[str, Any]], path, *, hue: str = "model", title: str | None = None
) -> Path:
    """Reduction fidelity against the order d, in raw units, one curve per `hue` value.

    Left: raw-unit Spearman of the surrogate vs exact gains on the operating prompts
    ("red_raw_spearman"), with the identity-Jacobian null of the same curve dashed. Right:
    median per-layer relative error ("red_rel_err_median", log scale). A dotted line marks
    each curve's d = L + 1 ("n_layers" + 1), where the mean model is realised exactly.
    """
    rows = [r for r in rows if r.get("d") is not None and r.get("red_raw_spearman") is not None]
    if not rows:
        raise InputError("rows: expected rows with 'd' and 'red_raw_spearman', got none")
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(str(r.get(hue, "")), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharex=True)
    xs = sorted({float(r["d"]) for r in rows})
    for i, (label, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: float(r["d"]))
        col = COLORS[i % 10]
        d = [float(r["d"]) for r in rs]
        axes[0].plot(
            d, [float(r["red_raw_spearman"]) for r in rs], "o-", color=col, lw=2, label=label
        )
        nul = [r.get("red_null_identity_raw_spearman") for r in rs]
        if all(v is not None and np.isfinite(v) for v in nul):
            axes[0].plot(
                d, nul, "--", color=col, lw=1, alpha=0.7, label=f"{label}: identity-Jacobian null"
            )
        axes[1].plot(
            d, [float(r["red_rel_err_median"]) for r in rs], "o-", color=col, lw=2, label=label
        )
        if rs[0].get("n_layers"):
            for ax in axes:
                ax.axvline(int(rs[0]["n_layers"]) + 1, color=col, ls=":", lw=1)
    for ax in axes:
        if len(xs) > 1 and xs[0] > 0 and xs[-1] / xs[0] >= 8:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.minorticks_off()
        ax.set_xlabel("reduced order d (dotted: L + 1, exact realisation of the mean model)")
        ax.grid(alpha=0.3)
    nulls = [r.get("red_null_identity_raw_spearman") for r in rows]
    lo = min(
        [float(r["red_raw_spearman"]) for r in rows]
        + [float(v) for v in nulls if v is not None and np.isfinite(v)]
    )
    axes[0].set_ylim(_lower(lo), 1.01)
    axes[0].set_ylabel("raw-unit Spearman vs exact gains")
    axes[0].set_title("reduction: rank agreement (raw units)")
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("median per-layer relative error")
    axes[1].set_title("reduction: per-layer error vs exact gains")
    fig.suptitle(title or "Surrogate reduction error vs order d", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def plot_d_sweep(
    rows: Sequence[Mapping[str, Any]],
    path,
    *,
    metric: str = "red_rel_err_median",
    variant: str = "per-prompt",
    title: str | None = None,
) -> Path:
    """The d sweep of a fidelity benchmark: one panel per (task, readout), one curve per basis.

    Rows: summary rows with "task", "readout", "basis", "d", "variant" and `metric` as a list
    over seeds (plotted as mean with a min-max band); the identity-Jacobian null of the same
    metric is drawn grey and dashed when present (its key with "null_identity_" inserted).
    Default metric: median per-layer relative error vs exact gains (log scale).
    """
    rows = [r for r in rows if r.get("variant") == variant and r.get(metric) is not None]
    if not rows:
        raise InputError(f"rows: none with variant {variant!r} and {metric!r}")
    panels = sorted({(r["task"], r["readout"]) for r in rows})
    bases = sorted({r["basis"] for r in rows})
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    null_key = metric.replace("red_", "red_null_identity_").replace("e2e_", "e2e_null_identity_")
    log = "rel_err" in metric
    vals = lambda v: np.array([x for x in np.atleast_1d(v) if x is not None], dtype=float)
    for ax, (task, rd) in zip(axes.flat, panels, strict=False):
        sub = [r for r in rows if r["task"] == task and r["readout"] == rd]
        for i, b in enumerate(bases):
            rs = sorted((r for r in sub if r["basis"] == b), key=lambda r: int(r["d"]))
            if not rs:
                continue
            d = [int(r["d"]) for r in rs]
            v = [vals(r[metric]) for r in rs]
            col = COLORS[i % 10]
            ax.plot(d, [x.mean() for x in v], "o-", color=col, lw=2, label=b)
            ax.fill_between(d, [x.min() for x in v], [x.max() for x in v], color=col, alpha=0.15)
        nul = [r for r in sub if r.get(null_key) is not None]
        if nul:
            m = np.mean([vals(r[null_key]).mean() for r in nul])
            ax.axhline(m, color="grey", ls="--", lw=1.2, label="identity-Jacobian null")
        ds = sorted({int(r["d"]) for r in sub})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ds, [str(x) for x in ds])
        ax.minorticks_off()
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{task}, {rd} readout", fontsize=10)
        ax.set_xlabel("order d")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel(metric.replace("_", " "))
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    axes.flat[0].legend(list(handles.values()), list(handles), fontsize=8)
    fig.suptitle(title or f"{metric} vs d ({variant})", fontsize=10)
    return _save(fig, path)


def plot_scaling(
    rows: Sequence[Mapping[str, Any]], path, *, title: str = "Surrogate fidelity vs model size"
) -> Path:
    """Fidelity (Spearman, Pearson) against parameter count (log x), one point per model.

    Rows: dicts with "model", "params", "spearman", "pearson"; rows with an "error" (a model
    that failed to load) or without numbers are listed under the plot instead.
    """
    rows = list(rows)
    good = [
        r for r in rows if not r.get("error") and r.get("params") and r.get("spearman") is not None
    ]
    failed = [str(r.get("model", "?")) for r in rows if r not in good]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    groups = _group(good, None, "params") if good else {}
    for i, (label, rs) in enumerate(groups.items()):
        px = [float(r["params"]) for r in rs]
        for j, metric in enumerate(("spearman", "pearson")):
            lab = metric.capitalize() + (f" ({label})" if label != "fidelity" else "")
            ax.plot(
                px,
                [float(r[metric]) for r in rs],
                "o-" if j == 0 else "s--",
                color=COLORS[(2 * i + j) % 10],
                lw=2,
                label=lab,
            )
    seen = set()
    for r in good:
        if r["model"] in seen:
            continue
        seen.add(r["model"])
        ax.annotate(
            str(r["model"]),
            (float(r["params"]), min(float(r["spearman"]), float(r["pearson"]))),
            xytext=(0, -10),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=8.5,
        )
    if good:
        ax.set_xscale("log")
        px = sorted({float(r["params"]) for r in good})
        ax.set_xlim(px[0] / 1.6, px[-1] * 1.6)
        ax.set_xticks(px, [_fmt_params(v) for v in px])
        ax.minorticks_off()
        lo = min(min(float(r["spearman"]), float(r["pearson"])) for r in good)
        ax.set_ylim(_lower(lo, pad=0.12), 1.01)
        ax.legend(fontsize=9)
    else:
        ax.text(0.5, 0.5, "no model produced a result", ha="center", transform=ax.transAxes)
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("correlation (predicted vs measured gains)")
    t = title
    if failed:
        t += f"\nfailed (not shown): {', '.join(failed)}"
    ax.set_title(t, fontsize=11)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


__all__ = [
    "plot_gains",
    "plot_energy",
    "plot_schedule",
    "plot_ablation",
    "plot_fidelity_vs_d",
    "plot_d_sweep",
    "plot_scaling",
]
