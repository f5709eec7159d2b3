"""The observability statistic from the n x H rows W_l (one process, n <= H prompts) against the
H x H grams G_l = W_lᵀ W_l (`steerlin.identify.observability_stats`): the same basis, gains,
exact gains and `adjoint_captured` (float64 tiny models; both are float64 round-off apart, we
allow 1e-9 relative)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

import steerlin.identify as identify_mod
from steerlin import ConceptDirections
from steerlin.frozen import iter_contexts
from steerlin.identify import identity_reduce, observability_grams, observability_stats
from steerlin.linalg import principal_directions
from steerlin.readouts import make_readout
from steerlin.surrogate import Surrogate

FIELDS = ("P", "A", "B", "gains", "gains_paper", "gains_exact", "adjoint_captured")


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _dirs(model):
    concept = random_prompts(model, 12, 3, 12, seed=11)
    return ConceptDirections.fit(model, concept, [i % 2 for i in range(12)])


def _both(monkeypatch, model, ops, dirs, **kw):
    rows = Surrogate.fit_orders(model, ops, dirs, orders=[2, 4, 8], batch_size=3, **kw)
    monkeypatch.setattr(identify_mod, "_OBS_ROWS", False)
    grams = Surrogate.fit_orders(model, ops, dirs, orders=[2, 4, 8], batch_size=3, **kw)
    monkeypatch.setattr(identify_mod, "_OBS_ROWS", True)
    return rows, grams


@pytest.mark.parametrize("basis", ["two-sided", "observable"])
def test_rows_path_fits_what_the_gram_path_fits(tiny, basis, monkeypatch):
    dirs = _dirs(tiny)
    ops = random_prompts(tiny, 7, 3, 12, seed=5)  # 7 prompts <= H = 32: the rows path
    rows, grams = _both(monkeypatch, tiny, ops, dirs, basis=basis)
    for o in (2, 4, 8):
        a, b = rows[o], grams[o]
        for f in FIELDS:
            assert _rel(getattr(a, f), getattr(b, f)) < 1e-9, (o, f)
        ea, eb = a.reduction_error(), b.reduction_error()
        assert ea.rel_err_median == pytest.approx(eb.rel_err_median, rel=1e-9)
        assert ea.raw_spearman == pytest.approx(eb.raw_spearman, abs=1e-12)
        assert (a.adjoint_captured < 1 - 1e-6).any()  # a real truncation, not a trivial 1


def test_stats_switch_to_grams_past_h_prompts(gpt2_like):
    """Rows while n <= H; past H prompts (or all-reduced, not one process) the grams, equal to
    the rows' W_lᵀ W_l; the top directions agree."""
    model = gpt2_like
    L, H = model.cfg.n_layers, model.cfg.d_model
    dirs = _dirs(model)
    rd = make_readout(model, "concept", dirs.unit[-1])
    many = random_prompts(model, H + 4, 3, 8, seed=3)
    few = many[:9]

    def stats(prompts, reduce=identity_reduce):
        ctxs = iter_contexts(model, prompts, batch_size=4)
        return observability_stats(model, ctxs, rd, reduce, dirs.unit)

    W, proj_w, is_rows = stats(few)
    assert is_rows and W.shape == (L + 1, len(few), H)
    G, proj_g = observability_grams(
        model, iter_contexts(model, few, batch_size=4), rd, identity_reduce, dirs.unit
    )
    assert _rel(W.transpose(1, 2) @ W, G) < 1e-12 and torch.equal(proj_w, proj_g)
    for layer in range(L + 1):
        va, ea = principal_directions(W[layer], 4, rows=True)
        vb, eb = principal_directions(G[layer], 4)
        assert _rel(ea, eb) < 1e-9 and _rel(va, vb) < 1e-7, layer

    big, _, is_rows = stats(many)
    assert not is_rows and big.shape == (L + 1, H, H)
    Gm, _ = observability_grams(
        model, iter_contexts(model, many, batch_size=4), rd, identity_reduce, dirs.unit
    )
    assert _rel(big, Gm) < 1e-12
    _, _, is_rows = stats(few, reduce=lambda t: t.clone())  # not one process: grams
    assert not is_rows
