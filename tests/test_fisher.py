"""steerlin.fisher: the KL metric F against a brute-force KL on tiny models.

½uᵀFu is the second-order term of the exact KL(clean ‖ steered) of the next-token distribution
for an injection s·u at the last token: the error is O(s³), so the relative error shrinks like
s. At s = 1e-2 and 1e-3 (float64) we require relative error below 5·s·C with C measured at
the larger step: a wrong F (a missing G term, a wrong Jacobian, a wrong layer order) is off by
O(1) at every step.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from steerlin import ConceptDirections
from steerlin.fisher import frozen_kl, kl_metric
from steerlin.hooks import inject


def _setup(model):
    concept = random_prompts(model, 12, 3, 12, seed=11)
    dirs = ConceptDirections.fit(model, concept, [i % 2 for i in range(12)])
    ops = random_prompts(model, 6, 3, 12, seed=5)
    return dirs, ops


def test_kl_metric_matches_brute_force(tiny):
    dirs, ops = _setup(tiny)
    met = kl_metric(tiny, ops, dirs, ridge=0.0, batch_size=4)
    F = met.meta["F"]
    L = tiny.cfg.n_layers
    assert F.shape == (L, L)
    assert torch.allclose(F, F.T)
    assert torch.linalg.eigvalsh(F).min() > -1e-10 * F.trace()
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        u = torch.randn(L, generator=g, dtype=torch.float64)
        errs = []
        for s in (1e-2, 1e-3):
            pred = 0.5 * float((s * u) @ F @ (s * u))
            kl = frozen_kl(tiny, ops, dirs, s * u, batch_size=4)
            errs.append(abs(kl - pred) / pred)
        # O(s) relative error: shrinks ~10x per decade
        assert errs[1] < 0.2 * errs[0] + 1e-6, errs
        assert errs[1] < 0.02, errs


def test_frozen_kl_matches_hooked_forward(gpt2_like):
    """The brute force itself: frozen single-token path == a full forward with hooks."""
    dirs, ops = _setup(gpt2_like)
    L = gpt2_like.cfg.n_layers
    u = torch.linspace(0.05, -0.05, L, dtype=torch.float64)
    kl = frozen_kl(gpt2_like, ops, dirs, u, batch_size=3)
    adds = {l: u[l] * dirs.b[l] for l in range(L)}
    total = 0.0
    with torch.no_grad():
        for p in ops:
            t = torch.tensor([p])
            lp0 = torch.log_softmax(gpt2_like(t)[0, -1].double(), -1)
            with inject(gpt2_like, adds, positions="last"):
                lp1 = torch.log_softmax(gpt2_like(t)[0, -1].double(), -1)
            total += float((lp0.exp() * (lp0 - lp1)).sum())
    assert kl == pytest.approx(total / len(ops), rel=1e-9)


def test_kl_metric_ridge(gpt2_like):
    dirs, ops = _setup(gpt2_like)
    met = kl_metric(gpt2_like, ops, dirs, ridge=0.1)
    F = met.meta["F"]
    L = gpt2_like.cfg.n_layers
    assert torch.allclose(met.W - F, 0.1 * F.trace() / L * torch.eye(L, dtype=torch.float64))
