"""The Controller's in-regime objective (steerlin.objective, Controller.in_regime): the most
predicted readout change gᵀα at a KL budget ½αᵀF̄α = kl, sized from the regime Fisher."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import greedy_continuations, make_gemma_like, random_prompts

from steerlin import ConceptDirections, Controller, Surrogate
from steerlin.budget import measured_token_kl, schedule_fisher
from steerlin.errors import InputError, LayerError, SteerlinError
from steerlin.inregime import regime_gains
from steerlin.objective import best_layer, gain_per_sqrt_kl

F64 = torch.float64


@pytest.fixture(scope="module")
def setup():
    m = make_gemma_like()
    concept = random_prompts(m, 16, 3, 12, seed=11)
    dirs = ConceptDirections.fit(m, concept, [i % 2 for i in range(16)])
    sur = Surrogate.fit(m, random_prompts(m, 6, 3, 10, seed=5), dirs, d=4)
    cont = greedy_continuations(m, random_prompts(m, 4, 3, 8, seed=7), 5)
    fi = schedule_fisher(m, cont, Controller(sur).schedule, n_tokens=5)
    L = m.cfg.n_layers
    # gains of two made-up readouts (the objective is generic in g): one with mixed signs
    g = torch.tensor([0.3, -0.8, 1.1, 0.5], dtype=F64)[:L]
    rg = SimpleNamespace(gains={"lexicon": g, "concept": sur.gains.to(F64)}, fisher=fi)
    return m, dirs, sur, cont, fi, rg


def _gain(rg, ctrl, name="lexicon"):
    return float(rg.gains[name] @ ctrl.calibrated.amplitudes.to(F64))


@pytest.mark.parametrize("stat", ["mean", "p95"])
def test_sized_schedule_predicts_the_budget(setup, stat):
    m, dirs, sur, cont, fi, rg = setup
    for kl in (1e-4, 0.1):
        ctrl = Controller.in_regime(sur, rg, model=m, prompts=cont, kl=kl, kl_stat=stat)
        a = ctrl.calibrated.amplitudes.to(F64)
        assert fi.predict(a, stat) == pytest.approx(kl, rel=1e-9)
        assert ctrl.calibration.predicted_kl[stat] == pytest.approx(kl, rel=1e-9)
        assert ctrl.calibration.evaluations == 0  # the Fisher was reused: no run at all
    # and the model agrees in the first-order limit (one measured steered run)
    ctrl = Controller.in_regime(dirs, rg, model=m, prompts=cont, kl=1e-6)
    got = float(measured_token_kl(m, cont, ctrl.calibrated.vectors, n_new=5).mean())
    assert got == pytest.approx(1e-6, rel=1e-2)


def test_objective_maximises_gain_at_equal_kl(setup):
    """With ridge 0 the schedule reaches the Cauchy-Schwarz bound √(2kl·gᵀF̄⁻¹g) and beats
    min-norm, every single layer, uniform and 200 random schedules of the same predicted KL."""
    m, dirs, sur, cont, fi, rg = setup
    kl, g, Fm = 0.05, rg.gains["lexicon"], fi.mean.to(F64)
    best = Controller.in_regime(sur, rg, model=m, prompts=cont, kl=kl, ridge=0.0)
    got = _gain(rg, best)
    bound = math.sqrt(2 * kl * float(g @ torch.linalg.solve(Fm, g)))
    assert got == pytest.approx(bound, rel=1e-6)

    def at_kl(u):  # g·u of u scaled to the same predicted mean KL, best sign
        u = torch.as_tensor(u, dtype=F64)
        return abs(float(g @ u)) * math.sqrt(kl / fi.predict(u))

    base = Controller(sur)
    others = [base.schedule.amplitudes, base.baseline("uniform").amplitudes]
    others += [torch.eye(len(g), dtype=F64)[i] for i in range(len(g))]
    others += list(torch.randn(200, len(g), generator=torch.Generator().manual_seed(0), dtype=F64))
    assert max(at_kl(u) for u in others) <= got * (1 + 1e-9)
    assert at_kl(base.schedule.amplitudes) < 0.999 * got  # min-norm is not already optimal
    # the default ridge (1e-2 of F̄'s mean diagonal) costs little of the objective
    ridged = Controller.in_regime(sur, rg, model=m, prompts=cont, kl=kl)
    assert 0.9 * got <= _gain(rg, ridged) <= got * (1 + 1e-9)
    assert ridged.calibrated.meta["objective"]["ridge"] == pytest.approx(1e-2)


def test_single_layer_and_allowed_layers(setup):
    m, dirs, sur, cont, fi, rg = setup
    g = rg.gains["lexicon"]
    L = len(g)
    one = Controller.in_regime(sur, rg, model=m, prompts=cont, kl=0.05, single_layer=True)
    score = gain_per_sqrt_kl(g, fi)
    top = int(torch.argmax(score))
    assert best_layer(g, fi, list(range(L))) == top
    assert one.calibrated.layers == [top] and one.calibrated.meta["objective"]["layers"] == [top]
    for layer in range(L):  # it beats every other single layer at the same KL
        ctl = Controller.in_regime(sur, rg, model=m, prompts=cont, kl=0.05, layers=[layer])
        assert abs(_gain(rg, ctl)) <= _gain(rg, one) * (1 + 1e-9)
    some = Controller.in_regime(sur, rg, model=m, prompts=cont, kl=0.05, layers=[0, 2])
    a = some.calibrated.amplitudes
    assert set(some.calibrated.layers) <= {0, 2} and float(a[1].abs() + a[3:].abs().sum()) == 0
    sub = Controller.in_regime(
        sur,
        rg,
        model=m,
        prompts=cont,
        kl=0.05,
        single_layer=True,
        layers=[l for l in range(L) if l != top],
    )
    assert sub.calibrated.layers[0] != top


def test_sign_meta_and_apply(setup):
    m, dirs, sur, cont, fi, rg = setup
    up = Controller.in_regime(dirs, rg, model=m, prompts=cont, readout="concept", kl=0.02)
    down = Controller.in_regime(
        dirs, rg, model=m, prompts=cont, readout="concept", kl=0.02, sign=-1
    )
    assert _gain(rg, up, "concept") > 0 > _gain(rg, down, "concept")
    assert torch.allclose(down.calibrated.amplitudes, -up.calibrated.amplitudes)
    meta = up.calibrated.meta
    obj = meta["objective"]
    assert obj["name"] == meta["strategy"] == "in-regime:concept"
    assert obj["readout"] == "concept" and obj["kl_budget"] == 0.02 and obj["kl_stat"] == "mean"
    assert obj["ridge_abs"] == pytest.approx(1e-2 * float(fi.mean.diagonal().mean()))
    assert meta["kl_budget"] == 0.02 and meta["readout"]["kind"] == "concept"
    assert meta["predicted_shift"] == pytest.approx(_gain(rg, up, "concept"), rel=1e-9)
    tok = torch.tensor([cont.prompt_ids[0]])
    with torch.no_grad():
        clean = m(tok)[0, -1]
        with up.apply(m):
            steered = m(tok)[0, -1]
        after = m(tok)[0, -1]
    assert not torch.allclose(clean, steered) and torch.equal(clean, after)


def test_bad_input(setup):
    m, dirs, sur, cont, fi, rg = setup
    go = lambda **kw: Controller.in_regime(sur, rg, model=m, prompts=cont, **kw)
    for bad in (0, -0.1, float("nan"), float("inf"), "0.1", None):
        with pytest.raises(InputError, match="kl"):
            go(kl=bad)
    with pytest.raises(InputError, match="readout"):
        go(readout="vader")
    with pytest.raises(LayerError, match="layers"):
        go(layers=[0, 99])
    with pytest.raises(InputError, match="kl_stat"):
        go(kl_stat="max")
    with pytest.raises(InputError, match="sign"):
        go(sign=2)
    with pytest.raises(InputError, match="ridge"):
        go(ridge=-1.0)
    with pytest.raises(SteerlinError, match="gains"):
        Controller.in_regime(sur, torch.ones(3), model=m, prompts=cont, fisher=fi)
    with pytest.raises(InputError, match="fisher"):
        Controller.in_regime(sur, rg.gains["lexicon"], model=m, prompts=cont)
    zero = SimpleNamespace(gains={"lexicon": torch.zeros(len(rg.gains["lexicon"]))}, fisher=fi)
    with pytest.raises(InputError, match="does not move"):
        Controller.in_regime(sur, zero, model=m, prompts=cont)
    other = greedy_continuations(m, random_prompts(m, 3, 3, 8, seed=8), 5)
    with pytest.raises(InputError, match="fisher"):  # sized on prompts it was not computed on
        Controller.in_regime(sur, rg, model=m, prompts=other)


def test_recommend_with_a_kl_budget(setup, monkeypatch):
    """recommend(kl=) follows the evidence's ranking as far as the inputs allow, sizes the pick
    to the budget and says what it rests on; without kl it is unchanged (test_steering)."""
    import steerlin.objective as ob

    m, dirs, sur, cont, fi, rg = setup
    rec = Controller.recommend(sur, model=m, prompts=cont, kl=0.02, n_tokens=5)
    r = rec.recommendation
    assert r["objective"] == "min-norm" and r["kl"] == 0.02
    assert ob.EVIDENCE["source"] in r["based_on"]
    assert fi.predict(rec.calibrated.amplitudes) == pytest.approx(0.02, rel=1e-6)
    u0 = Controller(sur).schedule.amplitudes
    assert torch.allclose(rec.calibrated.amplitudes / r["multiplier"], u0)
    ranking = ["in-regime:lexicon:layer 9", "in-regime:label_words", "in-regime:concept"]
    monkeypatch.setitem(ob.EVIDENCE, "ranking", ranking)
    # no lexicon, no label words: the concept readout's gains are measured here
    got = Controller.recommend(sur, model=m, prompts=cont, kl=0.02, n_tokens=5, sign=-1)
    g = got.recommendation
    assert g["objective"] == "in-regime:concept" and "skipped" in g["based_on"]
    assert g["layers"] == got.calibrated.layers and g["sign"] == -1
    b = fi.b  # the surrogate's injections, measured as the user would
    rgc = regime_gains(m, cont, b, readouts=("concept",), concept=sur.P[-1, :, 0], n_tokens=5)
    want = Controller.in_regime(
        sur, rgc, model=m, prompts=cont, readout="concept", kl=0.02, sign=-1
    )
    assert torch.allclose(got.calibrated.amplitudes, want.calibrated.amplitudes)
    assert fi.predict(got.calibrated.amplitudes) == pytest.approx(0.02, rel=1e-6)
    # gains that hold the lexicon readout: its single best layer, as the evidence ranks first
    lex = Controller.recommend(sur, model=m, prompts=cont, kl=0.02, n_tokens=5, gains=rg)
    one = Controller.in_regime(sur, rg, model=m, prompts=cont, kl=0.02, single_layer=True)
    assert lex.recommendation["objective"] == ranking[0]
    assert torch.allclose(lex.calibrated.amplitudes, one.calibrated.amplitudes)
    for bad in (0, float("nan"), -1):
        with pytest.raises(InputError, match="kl"):
            Controller.recommend(sur, model=m, prompts=cont, kl=bad)
    with pytest.raises(InputError, match="model="):
        Controller.recommend(sur, kl=0.1)
    with pytest.raises(InputError, match="not both"):
        Controller.recommend(sur, model=m, prompts=cont, kl=0.1, separations=2)
    with pytest.raises(InputError, match="sign"):
        Controller.recommend(sur, model=m, prompts=cont, kl=0.1, sign=0)


def test_choose_applies_the_evidence_rule():
    """choose: KL rows at the budget, perplexity ≤ 1.5x at both signs, the second judge's CI
    above 0; min-norm (the default) unless a row beats it on the same stems (paired CI > 0)."""
    from steerlin.objective import choose

    def row(name, obj, budget, v, tb_lo, ppl, paired_lo=None):
        r = {
            "row": name,
            "objective": obj,
            "budget": budget,
            "layers": [1],
            "vader": {"delta": v, "ci95": [v - 0.1, v + 0.1]},
            "textblob": {"delta": tb_lo + 0.1, "ci95": [tb_lo, tb_lo + 0.2]},
            "ppl_ratio": {"+": ppl, "-": 1.0},
            "measured_kl": {"mean": 0.1, "p95": 0.3},
        }
        if paired_lo is not None:
            r["vs_default"] = {"vader": {"diff": paired_lo + 0.05, "ci95": [paired_lo, 1.0]}}
        return r

    rows = [
        row("t = 2", "min-norm", None, 1.5, 0.2, 1.2),  # no budget: not a candidate
        row("too rough", "in-regime:lexicon", 0.1, 1.2, 0.2, 1.6, 0.3),
        row("self-scored", "in-regime:concept", 0.1, 1.1, -0.05, 1.1, 0.3),
        row("not surely better", "in-regime:lexicon", 0.1, 0.8, 0.1, 1.1, -0.02),
        row("better", "in-regime:label_words", 0.1, 0.7, 0.1, 1.3, 0.01),
        row("default", "min-norm", 0.1, 0.5, 0.1, 1.1),
        row("other budget", "min-norm", 0.3, 0.9, 0.1, 1.2),
    ]
    got = choose(rows, 0.1)
    assert got["row"] == "better" and got["ranking"] == ["in-regime:label_words", "min-norm"]
    assert choose(rows[:4] + rows[5:], 0.1)["row"] == "default"  # no row surely better
    # without an eligible min-norm row: every candidate by VADER Δ
    assert choose(rows[:5], 0.1)["ranking"] == ["in-regime:lexicon", "in-regime:label_words"]
    assert choose(rows[:3], 0.1)["row"] is None and choose(rows[:3], 0.1)["objective"] == "min-norm"


def test_with_measured_regime_gains(setup):
    """A real RegimeGains (regime_gains: the concept readout and label-word logits as token ids)
    feeds the objective directly; its single-layer pick is RegimeGains.per_kl's top layer."""
    m, dirs, sur, cont, fi, rg = setup
    got = regime_gains(
        m, cont, dirs, readouts=("concept", "label_words"), label_words=(1, 2), n_tokens=5
    )
    for rd in ("concept", "label_words"):
        one = Controller.in_regime(
            dirs, got, model=m, prompts=cont, readout=rd, kl=0.01, single_layer=True
        )
        assert one.calibrated.layers == [int(torch.argmax(got.per_kl(rd)))]
        full = Controller.in_regime(dirs, got, model=m, prompts=cont, readout=rd, kl=0.01)
        assert got.fisher.predict(full.calibrated.amplitudes) == pytest.approx(0.01, rel=1e-9)
        g = got.gains[rd].to(F64)
        assert (
            float(g @ full.calibrated.amplitudes.to(F64))
            >= float(g @ one.calibrated.amplitudes.to(F64)) * (1 - 1e-9)
            > 0
        )
