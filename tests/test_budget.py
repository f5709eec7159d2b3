"""A KL budget as a target (steerlin.budget, Controller(kl=)): the amplitude from the Fisher of
the injection in the regime of use, checked against the KL measured on the full model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import greedy_continuations, make_gemma_like, random_prompts

from steerlin import ConceptDirections, Controller, Surrogate
from steerlin.budget import measured_token_kl, regime_fisher, schedule_fisher, size_to_kl
from steerlin.errors import SteerlinError

F64 = torch.float64


@pytest.fixture(scope="module")
def setup(tiny):
    m = tiny
    concept = random_prompts(m, 16, 3, 12, seed=11)
    labels = [i % 2 for i in range(16)]
    dirs = ConceptDirections.fit(m, concept, labels)
    ops = random_prompts(m, 6, 3, 10, seed=5)
    sur = Surrogate.fit(m, ops, dirs, d=4)
    cont = greedy_continuations(m, random_prompts(m, 4, 3, 8, seed=7), 5)
    return m, dirs, ops, sur, cont


def _strategies(m, dirs, ops, sur, kl, stat="mean"):
    """(name, Controller, schedule) for every strategy the Controller offers."""
    ctrl = Controller(sur, kl=kl, kl_stat=stat)
    ex = Controller.from_gains("exact", dirs, model=m, prompts=ops, kl=kl, kl_stat=stat)
    return [
        ("min-norm", ctrl, None),
        ("exact gains", ex, None),
        ("uniform", ctrl, ctrl.baseline("uniform")),
        ("single:1", ctrl, ctrl.baseline("single:1")),
    ]


def _measured(m, cont, sched, stat):
    tk = measured_token_kl(m, cont, sched.vectors, n_new=5)
    return float(tk.mean() if stat == "mean" else torch.quantile(tk, 0.95))


@pytest.mark.parametrize("stat", ["mean", "p95"])
def test_small_budget_is_met_for_every_strategy(setup, stat):
    """First order is exact as the budget -> 0: at 1e-6 nats/token the measured KL statistic
    equals the budget to ~0.1% (the O(amplitude) second-order term), for every strategy."""
    m, dirs, ops, sur, cont = setup
    kl = 1e-6
    for name, ctrl, sched in _strategies(m, dirs, ops, sur, kl, stat):
        ctrl.calibrate(m, cont, n_tokens=5, schedule=sched)
        cal = ctrl.calibration
        assert cal.evaluations == 0 and cal.measured_kl is None
        assert cal.predicted_kl[stat] == pytest.approx(kl, rel=1e-9)
        meas = _measured(m, cont, cal.schedule, stat)
        assert meas == pytest.approx(kl, rel=5e-3), name
        # the direction is the strategy's own: the amplitudes are a positive multiple
        u0 = (ctrl.schedule if sched is None else sched).amplitudes
        assert torch.allclose(cal.schedule.amplitudes, cal.multiplier * u0)
        assert cal.multiplier > 0


def test_error_shrinks_with_the_budget(setup):
    """The predicted/measured ratio converges to 1 as the budget shrinks (first order)."""
    m, dirs, ops, sur, cont = setup
    errs = []
    for kl in (1e-2, 1e-4, 1e-6):
        cal = size_to_kl(m, cont, Controller(sur).schedule, kl, n_tokens=5)
        errs.append(abs(_measured(m, cont, cal.schedule, "mean") / kl - 1))
    assert errs[2] < errs[1] < errs[0]
    assert errs[2] < 1e-2


def test_fisher_matches_finite_differences_off_diagonal(setup):
    """F_lm (l ≠ m) from the JVPs against 2·KL/ε² of a two-layer injection, not frozen."""
    m, dirs, ops, sur, cont = setup
    L = m.cfg.n_layers
    b = dirs.b[:L].to(F64)
    fi = regime_fisher(m, cont, b, n_new=5)
    assert fi.F.shape == (len(cont) * 5, L, L)
    u = torch.zeros(L, dtype=F64)
    u[0], u[L - 1] = 1.0, -0.5
    eps = 1e-4
    meas = measured_token_kl(m, cont, eps * u[:, None] * b, n_new=5)
    pred = fi.token_kl(eps * u)
    assert torch.allclose(pred, meas, rtol=5e-3, atol=1e-14)
    # attention is not frozen: the tangent at later positions carries earlier injections, so
    # the "last" policy (one position) is a different, single-token Fisher
    last = regime_fisher(m, cont, b, positions="last")
    assert last.F.shape == (len(cont), L, L)


def test_one_measured_correction(setup):
    m, dirs, ops, sur, cont = setup
    ctrl = Controller(sur, kl=0.05)
    ctrl.calibrate(m, cont, n_tokens=5, correct=True)
    cal = ctrl.calibration
    assert cal.evaluations == 1 and cal.measured_kl is not None
    first = math.sqrt(0.05 / cal.predicted_kl["mean"]) * cal.multiplier / cal.correction
    assert cal.correction == pytest.approx(math.sqrt(0.05 / cal.measured_kl["mean"]))
    assert first == pytest.approx(cal.multiplier / cal.correction)
    assert cal.schedule.meta["kl_correction"] == cal.correction


def test_fisher_reuse_and_apply(setup):
    m, dirs, ops, sur, cont = setup
    ctrl = Controller(sur, kl=1e-4)
    fi = schedule_fisher(m, cont, ctrl.schedule, n_tokens=5)
    a = size_to_kl(m, cont, ctrl.schedule, 1e-4, n_tokens=5, fisher=fi)
    ctrl.calibrate(m, cont, n_tokens=5, fisher=fi)
    assert ctrl.calibration.multiplier == pytest.approx(a.multiplier)
    with ctrl.apply(m, positions="generated"):
        pass
    other = regime_fisher(m, cont, 2 * fi.b, n_new=5)
    with pytest.raises(SteerlinError, match="fisher"):
        size_to_kl(m, cont, ctrl.schedule, 1e-4, n_tokens=5, fisher=other)


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf"), "0.1", None])
def test_bad_budgets(setup, bad):
    m, dirs, ops, sur, cont = setup
    if bad is None:  # kl=None is "no budget": the readout target as before
        assert Controller(sur, kl=None).kl is None
        return
    with pytest.raises(SteerlinError, match="kl"):
        Controller(sur, kl=bad)
    with pytest.raises(SteerlinError, match="kl"):
        Controller.from_gains(sur.gains, dirs, kl=bad)
    with pytest.raises(SteerlinError, match="kl"):
        size_to_kl(m, cont, Controller(sur).schedule, bad)


def test_other_bad_input(setup):
    m, dirs, ops, sur, cont = setup
    with pytest.raises(SteerlinError, match="kl_stat"):
        Controller(sur, kl=0.1, kl_stat="median")
    with pytest.raises(SteerlinError, match="kl"):
        Controller([sur, sur], target=[1, 1], kl=0.1)
    with pytest.raises(SteerlinError, match="b:"):
        regime_fisher(m, cont, torch.zeros(2, 3))


def test_split_half_reliability_spearman_brown():
    """Equal halves give the usual 2r/(1+r); on simulated stems (true curve + independent
    per-stem noise) the 12 + 24 estimate recovers the 36-stem reliability."""
    from steerlin.predictors import split_half_reliability

    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, generator=g, dtype=F64)
    b = a + torch.randn(40, generator=g, dtype=F64)
    eq = split_half_reliability(a, b, 10, 10)
    assert eq["reliability"] == pytest.approx(2 * eq["r_halves"] / (1 + eq["r_halves"]))
    assert eq["ceiling"] == pytest.approx(eq["reliability"] ** 0.5)
    # simulation: per-stem reliability 0.1 -> 36 stems: 3.6 / 4.5 = 0.8
    # (Spearman on Gaussian data runs ~0.02 below Pearson: a small downward bias)
    true = torch.randn(3000, generator=g, dtype=F64)
    stems = true[:, None] + 3.0 * torch.randn(3000, 36, generator=g, dtype=F64)
    rel = split_half_reliability(stems[:, :12].mean(1), stems[:, 12:].mean(1), 12, 24)
    assert rel["reliability"] == pytest.approx(0.8, abs=0.04)
    assert split_half_reliability(a, -a, 12, 24)["reliability"] == 0.0
    with pytest.raises(SteerlinError, match="half_b"):
        split_half_reliability(a, a[:3], 12, 24)


def test_cli_demo_and_control_take_a_kl_budget(monkeypatch, tmp_path):
    """`steerlin demo --kl` sizes both generation schedules to the budget (predicted mean =
    the budget); `steerlin control --kl` sizes the LLV schedule and the baselines, predicted
    beside measured KL."""
    pytest.importorskip("vaderSentiment")
    from _wordtok import with_tokenizer

    from steerlin import cli

    model = with_tokenizer(make_gemma_like())
    monkeypatch.setattr(cli, "resolve_model", lambda name, **kw: model)
    threads = torch.get_num_threads()
    out = tmp_path / "demo"
    argv = "demo --d 4 --n-random 2 --threads 1 --max-new-tokens 5 --kl 0.05 --no-progress"
    try:
        assert cli.main([*argv.split(), "--prompt", "the movie was", "--out", str(out)]) == 0
        gen = json.loads((out / "results.json").read_text())["results"]["generation"]
        assert len(gen["signs"]) == 2
        for rec in gen["signs"].values():
            assert rec["calibration"]["budget"] == 0.05
            assert rec["calibration"]["predicted_kl"]["mean"] == pytest.approx(0.05)
        fit = tmp_path / "fit"
        sizes = "--n-concept 8 --n-operating 5 --n-eval 5 --no-progress"
        assert cli.main(f"fit --task demo --d 4 --out {fit} {sizes}".split()) == 0
        ctl = tmp_path / "ctl"
        argv = f"control --fit-dir {fit} --kl 0.05 --baselines uniform --kl-tokens 4 --out {ctl}"
        assert cli.main([*argv.split(), "--no-progress"]) == 0
        rows = json.loads((ctl / "results.json").read_text())["results"]["energy"]
        assert [r["strategy"] for r in rows] == ["llv", "uniform"]
        for r in rows:
            assert r["predicted_kl_mean"] == pytest.approx(0.05)
            assert 0 < r["measured_kl_mean"] < 1 and r["correction"] > 0
        bad = ["control", "--fit-dir", str(fit), "--kl", "-1", "--out", str(tmp_path / "x")]
        assert cli.main(bad) == 2  # SteerlinError naming kl, before any model run
    finally:
        torch.set_num_threads(threads)
