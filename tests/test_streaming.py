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
    streamed = Surrogate.fit(tiny, prompts, dirs, d=6, batch_size=4, basis=basis)
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
