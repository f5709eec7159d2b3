"""steerlin.plots: every figure writes a non-empty PNG from synthetic data (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from steerlin import plots
from steerlin.errors import InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def test_plot_gains(tmp_path):
    L = 18
    measured = torch.linspace(0.1, 2.0, L) ** 2
    predicted = measured * 0.9 + 0.05 * torch.sin(torch.arange(L, dtype=torch.float32))
    out = plots.plot_gains(predicted, measured, tmp_path / "g.png", exact=measured * 1.01)
    assert out == tmp_path / "g.png" and _is_png(out)
    # numpy input, no exact curve, custom title
    out2 = plots.plot_gains(
        np.arange(4.0) ** 2, np.arange(4.0), tmp_path / "s" / "g2.png", title="t"
    )
    assert _is_png(out2)
    with pytest.raises(InputError, match="equal lengths"):
        plots.plot_gains(np.ones(4), np.ones(5), tmp_path / "bad.png")


def test_plot_energy_skips_unreachable(tmp_path):
    rows = [
        {"strategy": "llv", "energy": 0.02, "ratio_to_llv": 1.0},
        {"strategy": "uniform", "energy": 0.06, "ratio_to_llv": 3.0},
        {"strategy": "last", "energy": math.inf, "ratio_to_llv": math.inf},
        {"strategy": "random:3", "energy": 2.5, "ratio_to_llv": 125.0},
        {"strategy": "random (median of 5)", "energy": 2.5, "ratio_to_llv": 125.0},
    ]
    assert _is_png(plots.plot_energy(rows, tmp_path / "e.png"))
    only_bad = [{"strategy": "last", "energy": math.inf, "ratio_to_llv": math.inf}]
    assert _is_png(plots.plot_energy(only_bad, tmp_path / "e2.png"))
    with pytest.raises(InputError):
        plots.plot_energy([], tmp_path / "e3.png")


def test_plot_schedule(tmp_path):
    L = 12
    sched = {
        "llv": torch.linspace(0, 0.1, L),
        "uniform": np.full(L, 0.05),
        "last": [0.0] * (L - 1) + [0.4],
    }
    assert _is_png(plots.plot_schedule(sched, tmp_path / "s.png"))
    with pytest.raises(InputError, match="equal lengths"):
        plots.plot_schedule({"a": [1.0, 2.0], "b": [1.0]}, tmp_path / "bad.png")


@pytest.mark.parametrize("x", ["d", "eps"])
def test_plot_ablation(tmp_path, x):
    values = [4, 8, 16, 32, 64] if x == "d" else [0.01, 0.05, 0.1, 0.2, 0.5]
    rows = [
        {x: v, "basis": b, "spearman": s, "pearson": s - 0.02}
        for b, base in (("krylov", 0.9), ("random", 0.4))
        for v, s in zip(values, np.linspace(base, base + 0.08, len(values)), strict=True)
    ]
    assert _is_png(plots.plot_ablation(rows, tmp_path / f"a_{x}.png", x=x, hue="basis"))


def test_plot_scaling_lists_failures(tmp_path):
    rows = [
        {"model": "small", "params": 1.2e8, "spearman": 0.7, "pearson": 0.6},
        {"model": "medium", "params": 3.5e8, "spearman": 0.9, "pearson": 0.85},
        {"model": "large", "params": 7.7e8, "spearman": 0.99, "pearson": 0.98},
        {"model": "broken", "error": "ModelLoadError: offline"},
    ]
    assert _is_png(plots.plot_scaling(rows, tmp_path / "sc.png"))
    assert _is_png(plots.plot_scaling(rows[-1:], tmp_path / "sc2.png"))


def test_plot_d_sweep_and_fidelity_vs_d(tmp_path):
    rows = [
        {
            "task": t,
            "readout": "concept",
            "basis": b,
            "d": d,
            "variant": "per-prompt",
            "red_rel_err_median": [0.5 / d, 0.6 / d],
            "red_raw_spearman": [1 - 0.5 / d, 1 - 0.4 / d],
            "red_null_identity_rel_err_median": [0.9, 0.8],
        }
        for t in ("a", "b")
        for b in ("krylov", "two-sided")
        for d in (1, 2, 8)
    ]
    assert _is_png(plots.plot_d_sweep(rows, tmp_path / "sweep.png"))
    assert _is_png(plots.plot_d_sweep(rows, tmp_path / "sp.png", metric="red_raw_spearman"))
    with pytest.raises(InputError, match="variant"):
        plots.plot_d_sweep(rows, tmp_path / "x.png", variant="paper")
    per_model = [
        {
            "model": m,
            "n_layers": L,
            "d": d,
            "red_raw_spearman": 1 - 1 / (d + L),
            "red_rel_err_median": 1 / (d + L),
            "red_null_identity_raw_spearman": -0.3,
        }
        for m, L in (("small", 4), ("big", 6))
        for d in (1, 2, 4)
    ]
    assert _is_png(plots.plot_fidelity_vs_d(per_model, tmp_path / "fvd.png"))
    with pytest.raises(InputError):
        plots.plot_fidelity_vs_d([{"model": "m"}], tmp_path / "none.png")
