"""Streaming: the layer-wise contexts of the fit equal the full frozen contexts exactly, and the
fit no longer holds every prompt's K/V (checked by counting what is alive, not by timing)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from steerlin import ConceptDirections, Surrogate
from steerlin.frozen import LayerwiseContext, iter_contexts, layerwise_contexts


def test_layerwise_context_equals_frozen_context(tiny):
    prompts = random_prompts(tiny, 7, 3, 14, seed=4)
    full = list(iter_contexts(tiny, prompts, batch_size=3))
    lazy = layerwise_contexts(tiny, prompts, batch_size=3)
    g = torch.Generator().manual_seed(0)
    for f, z in zip(full, lazy, strict=True):
        assert torch.equal(f.index, z.index)
        t = torch.randn(len(f), 3, tiny.cfg.d_model, generator=g, dtype=tiny.cfg.dtype)
        for layer in range(tiny.cfg.n_layers):  # forward sweep, as the fit does
            torch.testing.assert_close(z.jvp(layer, t), f.jvp(layer, t), rtol=0, atol=1e-12)
            x = f.states[:, layer]
            torch.testing.assert_close(z.block(layer, x), f.block(layer, x), rtol=0, atol=1e-12)
        torch.testing.assert_close(z.states, f.states, rtol=0, atol=1e-12)
        # going back rebuilds from the embedding, same numbers
        torch.testing.assert_close(z.jvp(0, t), f.jvp(0, t), rtol=0, atol=1e-12)


def test_layerwise_context_holds_one_block_of_keys_values(gemma_like):
    z = layerwise_contexts(gemma_like, random_prompts(gemma_like, 4), batch_size=4)[0]
    assert isinstance(z, LayerwiseContext)
    t = torch.zeros(len(z), 1, gemma_like.cfg.d_model, dtype=torch.float64)
    for layer in range(gemma_like.cfg.n_layers):
        z.jvp(layer, t)
        held = [k is not None for k in z._ctx.keys]
        assert held == [i == layer for i in range(gemma_like.cfg.n_layers)]


@pytest.mark.parametrize("basis", ["krylov", "two-sided"])
def test_streamed_fit_equals_fit_on_full_contexts(tiny, monkeypatch, basis):
    """Two-sided: the observability pass (one batch's full context at a time) and the
    layer-wise sweep give the same basis and gains as full contexts held throughout."""
    import steerlin.surrogate as S

    prompts = random_prompts(tiny, 9, 3, 12, seed=8)
    dirs = ConceptDirections.fit(tiny, random_prompts(tiny, 10, seed=1), [0, 1] * 5)
    streamed = Surrogate.fit(tiny, prompts, dirs, d=6, batch_size=4, basis=basis, context_memory=0)
    monkeypatch.setattr(
        S,
        "layerwise_contexts",
        lambda m, p, batch_size, engine="auto": list(
            iter_contexts(m, p, batch_size=4, engine=engine)
        ),
    )
    full = Surrogate.fit(tiny, prompts, dirs, d=6, batch_size=4, basis=basis)
    for k in ("P", "A", "B", "c", "gains", "gains_paper", "gains_std", "hankel"):
        torch.testing.assert_close(getattr(streamed, k), getattr(full, k), rtol=1e-10, atol=1e-12)


def test_two_sided_fit_keeps_contexts_within_budget(tiny, monkeypatch):
    """The observability pass's contexts are kept for the sweep while they fit the byte
    budget (no second forward for them); the rest are rebuilt block by block. Same numbers
    for every budget."""
    import steerlin.surrogate as S
    from steerlin.frozen import context_nbytes

    prompts = random_prompts(tiny, 10, 3, 12, seed=9)  # batches of 4, 4, 2
    dirs = ConceptDirections.fit(tiny, random_prompts(tiny, 10, seed=1), [0, 1] * 5)
    sizes = [context_nbytes(c) for c in iter_contexts(tiny, prompts, batch_size=4)]
    kept: list[int] = []
    keep = S._keep_within

    def spy(batches, held, budget):
        yield from keep(batches, held, budget)
        kept.append(len(held))

    monkeypatch.setattr(S, "_keep_within", spy)
    fits = {}
    for name, budget in (("none", 0), ("one", sizes[0]), ("all", sum(sizes))):
        fits[name] = Surrogate.fit(
            tiny, prompts, dirs, d=5, batch_size=4, basis="two-sided", context_memory=budget
        )
    assert kept == [0, 1, 3]
    for name in ("one", "all"):
        for k in ("P", "A", "c", "gains", "gains_paper", "hankel"):
            torch.testing.assert_close(
                getattr(fits[name], k), getattr(fits["none"], k), rtol=1e-10, atol=1e-12
            )


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB"])
def test_context_memory_must_be_bytes(tiny, bad):
    from steerlin.errors import InputError

    dirs = ConceptDirections.fit(tiny, random_prompts(tiny, 10, seed=1), [0, 1] * 5)
    with pytest.raises(InputError, match="context_memory"):
        Surrogate.fit(tiny, random_prompts(tiny, 4), dirs, d=2, context_memory=bad)


def test_context_pool_keeps_what_fits_and_rebuilds_the_rest(tiny):
    from steerlin.frozen import ContextPool, context_nbytes

    prompts = random_prompts(tiny, 10, 3, 12, seed=2)
    full = list(iter_contexts(tiny, prompts, batch_size=4))
    sizes = [context_nbytes(c) for c in full]
    for budget, n_held in ((0, 0), (sizes[0] + sizes[1], 2), (sum(sizes), 3)):
        pool = ContextPool(tiny, prompts, batch_size=4, budget=budget)
        assert len(pool.held) == n_held and len(pool) == 3
        for _ in range(2):  # every pass sees every batch, held or rebuilt, in the same order
            got = list(pool)
            assert all(torch.equal(a.index, b.index) for a, b in zip(got, full, strict=True))
            for a, b in zip(got, full, strict=True):
                torch.testing.assert_close(a.states, b.states, rtol=0, atol=0)


def test_calibrate_streamed_equals_held(tiny):
    from steerlin import Controller, calibrate

    dirs = ConceptDirections.fit(tiny, random_prompts(tiny, 10, seed=1), [0, 1] * 5)
    sur = Surrogate.fit(tiny, random_prompts(tiny, 8, seed=3), dirs, d=4)
    sched = Controller(sur, 0.5).schedule
    prompts = random_prompts(tiny, 9, seed=5)
    held = calibrate(tiny, prompts, sched, sched.predicted_shift, batch_size=4)
    streamed = calibrate(
        tiny, prompts, sched, sched.predicted_shift, batch_size=4, context_memory=0
    )
    assert held.multiplier == streamed.multiplier
    assert held.measured_shift == pytest.approx(streamed.measured_shift, rel=1e-12)


def test_done_with_frees_the_block_and_the_sweep_goes_on(tiny):
    prompts = random_prompts(tiny, 5, 3, 10, seed=6)
    (f,) = list(iter_contexts(tiny, prompts, batch_size=8))
    (z,) = layerwise_contexts(tiny, prompts, batch_size=8)
    t = torch.randn(len(f), 2, tiny.cfg.d_model, dtype=tiny.cfg.dtype)
    for layer in range(tiny.cfg.n_layers):
        torch.testing.assert_close(z.jvp(layer, t), f.jvp(layer, t), rtol=0, atol=1e-12)
        z.done_with(layer)
        assert z._ctx is None and z._resid is not None  # K/V freed, next block's input kept
    # asking for a freed block again rebuilds it from the embedding: same numbers
    torch.testing.assert_close(z.jvp(1, t), f.jvp(1, t), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.states, f.states, rtol=0, atol=1e-12)
