"""steerlin.evaluate: gain scans (cached single-token path vs brute-force hooks), exact gains,
fidelity.

Tolerances (float64): the cached and hooked scans compute the same perturbed forwards in a
different order; their central differences divide a ~1e-15 relative rounding by 2·eps, so at
eps = 0.1 they agree to ~1e-13 relative (we allow 1e-9). A central difference with eps = 1e-4
has O(eps²) ≈ 1e-8 truncation error relative to the exact derivative (we allow 1e-5).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import make_gpt2_like, random_prompts

from steerlin import ConceptDirections
from steerlin.errors import InputError, LayerError, NonFiniteError, ShapeError
from steerlin.gains import exact_gains, scan_gains
from steerlin.metrics import Fidelity, fidelity


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _setup(model):
    concept = random_prompts(model, 12, 3, 12, seed=11)
    dirs = ConceptDirections.fit(model, concept, [i % 2 for i in range(12)])
    ops = random_prompts(model, 5, 3, 12, seed=5)
    return dirs, ops


@pytest.mark.parametrize("readout", ["concept", "logits"])
def test_scan_cached_equals_hooks(tiny, readout):
    dirs, ops = _setup(tiny)
    kw = dict(eps=0.1, readout=readout, label_words=[3, 5], batch_size=2)
    cached = scan_gains(tiny, ops, dirs, method="cached", **kw)
    hooks = scan_gains(tiny, ops, dirs, method="hooks", **kw)
    assert cached.shape == (tiny.cfg.n_layers,) and cached.dtype == torch.float64
    assert _rel(cached, hooks) < 1e-9
    assert cached.abs().min() > 1e-6


def test_scan_layer_subset(tiny):
    dirs, ops = _setup(tiny)
    full = scan_gains(tiny, ops, dirs, eps=0.1)
    for method in ("cached", "hooks"):
        sub = scan_gains(tiny, ops, dirs, eps=0.1, layers=[0, 2], method=method)
        assert sub.shape == (2,)
        assert _rel(sub, full[[0, 2]]) < 1e-9
        rev = scan_gains(tiny, ops, dirs, eps=0.1, layers=[2, 0], method=method)
        assert _rel(rev, full[[2, 0]]) < 1e-9


def test_scan_batch_size_invariant(gpt2_like):
    dirs, ops = _setup(gpt2_like)
    a = scan_gains(gpt2_like, ops, dirs, batch_size=1)
    b = scan_gains(gpt2_like, ops, dirs, batch_size=16)
    assert _rel(a, b) < 1e-12


@pytest.mark.parametrize("readout", ["concept", "logits"])
def test_small_eps_scan_approximates_exact_gains(tiny, readout):
    dirs, ops = _setup(tiny)
    kw = dict(readout=readout, label_words=[3, 5])
    ex = exact_gains(tiny, ops, dirs, **kw)
    sc = scan_gains(tiny, ops, dirs, eps=1e-4, **kw)
    assert _rel(sc, ex) < 1e-5
    # and a large step is visibly non-linear (the check above is not vacuous)
    big = scan_gains(tiny, ops, dirs, eps=2.0, **kw)
    assert _rel(big, ex) > 1e-4


def test_exact_gains_per_prompt_order(gpt2_like):
    dirs, ops = _setup(gpt2_like)
    per = exact_gains(gpt2_like, ops, dirs, per_prompt=True, batch_size=2)
    assert per.shape == (len(ops), gpt2_like.cfg.n_layers)
    for i in (0, 3):
        one = exact_gains(gpt2_like, [ops[i]], dirs)
        torch.testing.assert_close(per[i], one, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(exact_gains(gpt2_like, ops, dirs), per.mean(0), rtol=1e-12, atol=0)


def test_exact_gains_last_layer_is_one_jvp(tiny):
    """Gain of the last block: <unit_L, A_{L-1} b_{L-1}>, one JVP per prompt (independent of
    the backward pass used by exact_gains)."""
    from steerlin.frozen import iter_contexts

    dirs, ops = _setup(tiny)
    L = tiny.cfg.n_layers
    per = exact_gains(tiny, ops, dirs, per_prompt=True)
    for c in iter_contexts(tiny, ops, batch_size=3):
        tang = dirs.b[L - 1].expand(len(c), 1, -1)
        jv = c.jvp(L - 1, tang)[:, 0] @ dirs.unit[L]
        torch.testing.assert_close(per[c.index, L - 1], jv, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ scan errors


def test_scan_bad_eps(gpt2_like):
    dirs, ops = _setup(gpt2_like)
    for eps in (0.0, -0.1, math.nan):
        with pytest.raises(InputError, match="eps: expected a positive step, got"):
            scan_gains(gpt2_like, ops, dirs, eps=eps)


def test_scan_bad_method(gpt2_like):
    dirs, ops = _setup(gpt2_like)
    with pytest.raises(
        InputError,
        match=r"method: expected one of \('cached', 'hooks'\), got "
        r"'jvp'",
    ):
        scan_gains(gpt2_like, ops, dirs, method="jvp")


def test_scan_bad_layers(gpt2_like):
    dirs, ops = _setup(gpt2_like)
    with pytest.raises(LayerError, match=r"layer: expected a layer index in 0\.\.2 .* got 3"):
        scan_gains(gpt2_like, ops, dirs, layers=[0, 3])
    with pytest.raises(InputError, match="layers: expected at least one layer"):
        scan_gains(gpt2_like, ops, dirs, layers=[])


def test_scan_directions_for_another_model(gpt2_like):
    _, ops = _setup(gpt2_like)
    dirs4, _ = _setup(make_gpt2_like(n_layers=4))
    with pytest.raises(ShapeError, match="directions: expected unit of shape"):
        scan_gains(gpt2_like, ops, dirs4)
    with pytest.raises(ShapeError, match="directions: expected unit of shape"):
        exact_gains(gpt2_like, ops, dirs4)


# ------------------------------------------------------------------ fidelity


def test_fidelity_matches_scipy():
    p = [0.1, 0.5, 0.4, 2.0, 1.5]
    m = torch.tensor([0.2, 0.3, 0.6, 1.8, 1.9], dtype=torch.float64)
    f = fidelity(p, m)
    assert isinstance(f, Fidelity)
    assert f.spearman == pytest.approx(scipy.stats.spearmanr(p, m.numpy()).statistic, abs=1e-15)
    assert f.pearson == pytest.approx(scipy.stats.pearsonr(p, m.numpy()).statistic, abs=1e-15)
    # ranks 1,3,2,5,4 vs 1,2,3,4,5: sum d^2 = 4, rho = 1 - 6*4/(5*24)
    assert f.spearman == pytest.approx(0.8)
    assert str(f) == f"Spearman {f.spearman:.3f}, Pearson {f.pearson:.3f}"
    g = fidelity(np.arange(4.0), -np.arange(4.0))
    assert g.spearman == pytest.approx(-1.0) and g.pearson == pytest.approx(-1.0)


def test_fidelity_errors():
    with pytest.raises(
        InputError,
        match=r"fidelity: expected two equal-length curves, got "
        r"\(3,\), \(4,\)",
    ):
        fidelity([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(InputError, match="fidelity: expected two equal-length curves"):
        fidelity(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(InputError, match="fidelity: need at least 3 layers to correlate, got 2"):
        fidelity([1.0, 2.0], [2.0, 1.0])
    with pytest.raises(NonFiniteError, match="fidelity: non-finite gains"):
        fidelity([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(NonFiniteError, match="fidelity: non-finite gains"):
        fidelity([1.0, 2.0, 3.0], [1.0, float("inf"), 3.0])
