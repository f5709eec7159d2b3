"""Controller targets in class separations, metrics of the least-norm solve, calibration in the
regime of use (tiny float64 models)."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_continuations as _cont
from conftest import random_prompts

import steerlin
from steerlin import ConceptDirections, Controller, Surrogate
from steerlin.energy import Metric, make_metric
from steerlin.errors import InputError
from steerlin.fisher import frozen_kl, kl_metric
from steerlin.measure import measure_regime_shift
from steerlin.readouts import make_readout

F64 = torch.float64


@pytest.fixture(scope="module")
def fitted(gemma_like):
    m = gemma_like
    concept = random_prompts(m, 16, 3, 12, seed=11)
    labels = [i % 2 for i in range(16)]
    dirs = ConceptDirections.fit(m, concept, labels, label_names=("calm", "angry"))
    ops = random_prompts(m, 6, 3, 10, seed=5)
    sur = Surrogate.fit(m, ops, dirs, d=4)
    return m, concept, labels, dirs, ops, sur


def test_separation_is_the_class_mean_difference(fitted):
    m, concept, labels, dirs, ops, sur = fitted
    from steerlin.trajectory import capture

    xL = capture(m, concept).states[:, -1].to(F64)
    y = torch.tensor(labels)
    proj = xL @ dirs.unit[-1].to(F64)
    want = float(proj[y == 1].mean() - proj[y == 0].mean())
    assert sur.meta["separation"]["value"] == pytest.approx(want, rel=1e-10)
    # logit readout: from the stored class-mean logits, against the direct computation
    rd = make_readout(m, "logits", None, label_words=[3, 7])
    ly = rd(m, xL.to(m.cfg.dtype)).to(F64)
    want_l = float(ly[y == 1].mean() - ly[y == 0].mean())
    assert dirs.separation(rd) == pytest.approx(want_l, rel=1e-5)
    sur_l = Surrogate.fit(m, ops, dirs, d=4, readout="logits", label_words=[3, 7])
    assert sur_l.meta["separation"]["value"] == pytest.approx(want_l, rel=1e-5)
    assert sur.meta["label_names"] == ["calm", "angry"]


def test_target_units(fitted):
    *_, sur = fitted
    sep = sur.meta["separation"]["value"]
    one = Controller(sur, 1.0)
    assert float(one.target[0]) == pytest.approx(sep)
    assert float(Controller(sur, -0.5).target[0]) == pytest.approx(-0.5 * sep)
    assert float(Controller(sur, 123.0, units="raw").target[0]) == 123.0
    for word, sign in (("positive", 1), ("negative", -1), ("angry", 1), ("calm", -1)):
        assert float(Controller(sur, word).target[0]) == pytest.approx(sign * sep)
    assert "+ = 'angry'" in one.sign_convention
    s = one.schedule
    assert s.predicted_shift == pytest.approx(sep)
    assert s.meta["target_units"]["separations"] == 1.0
    assert s.meta["target_units"]["plus"] == "angry"
    with pytest.raises(InputError, match="target"):
        Controller(sur, "sideways")
    with pytest.raises(InputError, match="units"):
        Controller(sur, 1.0, units="furlongs")
    old = Surrogate(
        **{k: getattr(sur, k) for k in ("P", "A", "B", "c", "gains", "gains_paper", "gains_std")},
        meta={k: v for k, v in sur.meta.items() if k != "separation"},
    )
    with pytest.raises(InputError, match="units='raw'"):
        Controller(old, 1.0)
    assert float(Controller(old, 5.0, units="raw").target[0]) == 5.0


@pytest.mark.parametrize("metric", ["norm", "raw", "weights", "kl"])
def test_least_norm_in_each_metric(fitted, metric):
    m, concept, labels, dirs, ops, sur = fitted
    L = sur.n_layers
    scale = torch.as_tensor(sur.meta["scale"], dtype=F64)[:L]
    if metric == "weights":
        met = torch.linspace(1, 3, L, dtype=F64)
        W = torch.diag(met)
    elif metric == "kl":
        met = kl_metric(m, ops, dirs)
        W = met.W
    else:
        met = metric
        W = torch.eye(L, dtype=F64) if metric == "norm" else torch.diag(scale**2)
    ctrl = Controller(sur, 1.0, metric=met)
    u = ctrl.schedule.amplitudes.to(F64)
    h = sur.gains.to(F64)
    dy = float(ctrl.target[0])
    assert float(h @ u) == pytest.approx(dy, rel=1e-10)
    want = dy * torch.linalg.solve(W, h) / (h @ torch.linalg.solve(W, h))
    assert torch.allclose(u, want, rtol=1e-9, atol=1e-12 * want.abs().max())
    # optimality: any other schedule reaching the target costs more in W
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = torch.randn(L, generator=g, dtype=F64)
        v = v - (h @ v) / (h @ h) * h  # h-orthogonal direction keeps the shift
        w = u + 0.1 * v * u.norm() / v.norm()
        assert float(w @ W @ w) > float(u @ W @ u)
    assert ctrl.schedule.meta["metric"]["name"] == make_metric(met, scale).name


def test_metric_kl_by_name(fitted):
    m, concept, labels, dirs, ops, sur = fitted
    a = Controller(sur, 1.0, metric="kl", model=m, metric_prompts=ops).schedule
    b = Controller(sur, 1.0, metric=kl_metric(m, ops, sur)).schedule
    assert torch.allclose(a.amplitudes, b.amplitudes)
    with pytest.raises(InputError, match="kl"):
        Controller(sur, 1.0, metric="kl")
    with pytest.raises(InputError, match="metric"):
        Controller(sur, 1.0, metric="manhattan")
    assert isinstance(Controller(sur, 1.0, metric=torch.eye(sur.n_layers)).metric, Metric)


def test_recommend(fitted):
    *_, sur = fitted
    rec = Controller.recommend(sur, separations=2, sign=-1)
    with pytest.warns(DeprecationWarning, match=r"strength=\) is now separations="):
        old = Controller.recommend(sur, strength=2, sign=-1)
    assert torch.equal(old.target, rec.target) and Controller.recommend(sur).target > 0
    assert rec.recommendation["separations"] == 2.0
    with pytest.raises(InputError, match="separations= only"):
        Controller.recommend(sur, separations=2, strength=2)
    assert rec.metric.name == "norm"
    assert float(rec.target[0]) == pytest.approx(-2 * sur.meta["separation"]["value"])
    # the layers it names are the largest-gain ones, holding >= 90% of Σu² (u ∝ h)
    h2 = sur.gains.to(torch.float64).pow(2)
    got = rec.recommendation["layers"]
    assert float(h2[got].sum() / h2.sum()) >= 0.9
    assert min(float(h2[i]) for i in got) >= max(
        [float(h2[i]) for i in range(len(h2)) if i not in got], default=0.0
    )
    m, *_ = fitted
    ops = fitted[4]
    cal = Controller.recommend(sur, separations=1, model=m, prompts=_cont(m, ops, 4), n_tokens=4)
    assert cal.calibration is not None and cal.recommendation["multiplier"] > 0
    rank = cal.recommendation["layer_ranking"]
    assert (
        sorted(rank) == list(range(sur.n_layers))
        and cal.recommendation["best_single_layer"] == rank[0]
    )
    # checked on the full model: for the same measured last-token shift, the top-ranked layer
    # alone costs less measured next-token KL than the bottom-ranked one
    kls = []
    for layer in (rank[0], rank[-1]):
        s = Controller(sur, 1.0).baseline(f"single:{layer}")
        c = steerlin.calibrate(m, ops, s, 0.05, units="separations")
        assert c.target == pytest.approx(0.05 * sur.meta["separation"]["value"])
        kls.append(frozen_kl(m, ops, sur, c.schedule.amplitudes))
    assert kls[0] < kls[1]
    with pytest.raises(InputError, match="separations"):
        Controller.recommend(sur, separations=-1)


@pytest.mark.parametrize("positions", ["last", "generated", "all"])
def test_calibrate_then_apply_uses_the_calibration(fitted, positions):
    m, concept, labels, dirs, ops, sur = fitted
    ctrl = Controller(sur, 0.5)
    cont = _cont(m, ops, 4)
    if positions == "last":  # its old name for the generation regime (one release)
        with pytest.warns(DeprecationWarning, match="positions='generated'"):
            cal = ctrl.calibrate(m, cont, positions=positions, n_tokens=4)
    else:
        cal = ctrl.calibrate(m, cont, positions=positions, n_tokens=4)
    assert cal is ctrl  # in place: a discarded result still calibrates (`apply` below)
    assert cal.calibration.positions == ("all" if positions == "all" else "generated")
    rd = make_readout(m, "concept", dirs.unit[-1])
    got = measure_regime_shift(
        m,
        cont,
        cal.calibrated.vectors,
        rd,
        positions=cal.calibration.positions,
        n_new=cal.calibration.n_new,
    )
    assert got == pytest.approx(float(ctrl.target[0]), rel=1.1e-2)
    # apply uses the calibrated schedule, not the surrogate-sized one
    tok = torch.tensor([ops[0]])

    def out(ctx):
        with ctx, torch.no_grad():
            return m(tok)[0, -1]

    if positions == "generated":  # reads the prompt end from a KV cache: not a plain forward
        with pytest.raises(InputError, match="calibrated with"):
            cal.apply(m, positions="all")
        return
    via_ctrl = out(cal.apply(m, positions=positions))
    assert torch.equal(via_ctrl, out(cal.calibrated.apply(m, positions=positions)))
    assert not torch.allclose(via_ctrl, out(ctrl.schedule.apply(m, positions=positions)))
    with pytest.raises(InputError, match="calibrated with"):
        other = "all" if positions != "all" else "last"
        cal.apply(m, positions=other)
    # the calibrated multiplier differs between regimes (the point of calibrating in them)
    assert cal.calibration.multiplier > 0


def test_from_gains_with_the_surrogate_gains_is_the_surrogate_schedule(fitted):
    m, concept, labels, dirs, ops, sur = fitted
    a = Controller(sur, 0.5).schedule
    b = Controller.from_gains(sur.gains, dirs, 0.5).schedule
    assert torch.allclose(a.amplitudes, b.amplitudes, rtol=1e-12, atol=0)
    assert torch.allclose(a.vectors, b.vectors, rtol=1e-12, atol=0)
    assert b.meta["predicted_shift"] == pytest.approx(a.meta["predicted_shift"], rel=1e-12)


def test_from_exact_gains_is_least_norm_and_calibrates_on_the_full_model(fitted):
    from steerlin import exact_gains

    m, concept, labels, dirs, ops, sur = fitted
    ctrl = Controller.from_gains("exact", dirs, 0.5, model=m, prompts=ops, layers=[1, 2, 3])
    h = exact_gains(m, ops, dirs)
    u = ctrl.schedule.amplitudes
    want = torch.zeros_like(h)
    want[[1, 2, 3]] = h[[1, 2, 3]] * float(ctrl.target[0]) / h[[1, 2, 3]].pow(2).sum()
    assert torch.allclose(u, want, rtol=1e-10, atol=1e-14)
    cont = _cont(m, ops, 4)
    ctrl.calibrate(m, cont, positions="generated", n_tokens=4)  # result discarded on purpose
    assert ctrl.calibration is not None  # in place: apply now uses the calibrated schedule
    rd = make_readout(m, "concept", dirs.unit[-1])
    got = measure_regime_shift(m, cont, ctrl.calibrated.vectors, rd, n_new=4)
    assert got == pytest.approx(float(ctrl.target[0]), rel=1.1e-2)


def test_from_gains_refuses_what_it_cannot_use(fitted):
    from steerlin.errors import ShapeError

    m, concept, labels, dirs, ops, sur = fitted
    with pytest.raises(ShapeError, match="gains"):
        Controller.from_gains(sur.gains[:-1], dirs, 1.0)
    with pytest.raises(InputError, match="gains"):
        Controller.from_gains("magic", dirs, 1.0)
    with pytest.raises(InputError, match="model= and prompts="):
        Controller.from_gains("exact", dirs, 1.0)
    with pytest.raises(InputError, match="coupling"):
        g = Controller.from_gains(sur.gains, dirs, 1.0).surrogates[0]
        Controller([g, g], [1.0, 1.0])
