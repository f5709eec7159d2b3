"""Oracles that tell bases apart: reduced d on systems with a known answer.

Every surrogate oracle at d = d_model passes with any basis (the basis is complete). These run
the identification (`steerlin.identify.fit_core`, the same code `Surrogate.fit` runs) on
exactly linear toy systems, where the reduced model's gains have a closed form, and on a tiny
transformer at d = L + 1, where the Krylov recursion spans the whole reachable space of the
mean model. float64 throughout: the tolerances are round-off (1e-10) against errors of 1e-2
and more when the basis is wrong.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_gemma_like, random_prompts

from steerlin import ConceptDirections, Surrogate
from steerlin.frozen import iter_contexts
from steerlin.identify import fit_core, identity_reduce, observability_grams
from steerlin.linalg import hankel_singular_values
from steerlin.readouts import Readout

F64 = torch.float64


class LinearContext:
    """A 'frozen context' of an exactly linear depth map x_{l+1} = A_l x_l (same for every row)."""

    def __init__(self, A: torch.Tensor, b: int, H: int, model=None):
        self.A = A  # [L, H, H]
        self.model = model
        L = A.shape[0]
        self.n_layers = L
        self.states = torch.zeros(b, L + 1, H, dtype=F64)
        self.index = torch.arange(b)

    def __len__(self) -> int:
        return self.states.shape[0]

    def jvp(self, layer, tangents):  # [b, k, H] -> rows A_l v
        return tangents @ self.A[layer].T

    def vjp(self, layer, cot):  # rows A_lᵀ w
        return cot @ self.A[layer]

    def block(self, layer, x):  # [b, H] -> rows A_l x
        return x @ self.A[layer].T


def _toy(A: torch.Tensor, unit: torch.Tensor, readout_dir: torch.Tensor, d: int, basis: str):
    L, H = A.shape[0], A.shape[1]
    model = SimpleNamespace(cfg=SimpleNamespace(n_layers=L, d_model=H))
    dirs = ConceptDirections(unit.clone(), unit.clone(), torch.ones(L + 1, dtype=F64), {})
    rd = Readout("concept", direction=readout_dir)
    contexts = [LinearContext(A, 3, H, model)]
    obs = None
    if basis in ("two-sided", "observable"):
        obs, _ = observability_grams(model, contexts, rd, identity_reduce, dirs.unit)
    stats = fit_core(model, contexts, dirs, rd, d, basis, 0, False, identity_reduce, obs_gram=obs)
    return stats


def _exact(A, unit, readout_dir):
    """g_l = rᵀ A_{L-1} ... A_l unit_l (unit scale): the closed form."""
    L = A.shape[0]
    w, g = readout_dir.clone(), torch.zeros(L, dtype=F64)
    for layer in range(L - 1, -1, -1):
        w = A[layer].T @ w
        g[layer] = w @ unit[layer]
    return g


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def low_rank_system():
    """A_l = Q M_l Qᵀ with Q of rank r: the reachable space at every layer is
    span(unit_l) ⊕ range(Q), of dimension r + 1, far below H."""
    g = torch.Generator().manual_seed(0)
    H, L, r = 24, 7, 3
    Q, _ = torch.linalg.qr(torch.randn(H, r, generator=g, dtype=F64))
    M = torch.randn(L, r, r, generator=g, dtype=F64)
    A = Q @ M @ Q.T
    unit = torch.nn.functional.normalize(torch.randn(L + 1, H, generator=g, dtype=F64), dim=-1)
    return A, unit, r


def test_krylov_is_exact_at_reduced_order_where_random_is_not(low_rank_system):
    A, unit, r = low_rank_system
    exact = _exact(A, unit, unit[-1])
    kry = _toy(A, unit, unit[-1], r + 1, "krylov")
    rnd = _toy(A, unit, unit[-1], r + 1, "random")
    assert _rel(kry["gains_prompt"], exact) < 1e-10
    assert _rel(kry["gains_paper"], exact) < 1e-10
    assert _rel(rnd["gains_prompt"], exact) > 1e-2  # a wrong basis is visibly wrong
    # one order less than the reachable dimension loses information for Krylov too
    short = _toy(A, unit, unit[-1], r, "krylov")
    assert _rel(short["gains_prompt"], exact) > 1e-3


def test_two_sided_basis_reproduces_a_readout_outside_the_reachable_span():
    g = torch.Generator().manual_seed(1)
    H, L, d = 20, 6, 2
    A = torch.eye(H, dtype=F64) + 0.4 * torch.randn(L, H, H, generator=g, dtype=F64) / H**0.5
    unit = torch.nn.functional.normalize(torch.randn(L + 1, H, generator=g, dtype=F64), dim=-1)
    readout = torch.nn.functional.normalize(torch.randn(H, generator=g, dtype=F64), dim=0)
    exact = _exact(A, unit, readout)
    kry = _toy(A, unit, readout, d, "krylov")
    two = _toy(A, unit, readout, d, "two-sided")
    # d = 2 holds unit_l and one more direction: Krylov spends it on A unit_{l-1}, which
    # the random readout barely sees; the two-sided basis spends it on w_l = A_lᵀ w_{l+1}
    assert _rel(kry["gains_prompt"], exact) > 5e-2
    assert _rel(two["gains_prompt"], exact) < 1e-10
    assert _rel(two["gains_paper"], exact) < 1e-10


def test_paper_variant_at_full_reachable_order_equals_product_of_mean_jacobians():
    model = make_gemma_like(n_layers=4)
    L, H = model.cfg.n_layers, model.cfg.d_model
    concept = random_prompts(model, 16, 3, 10, seed=2)
    dirs = ConceptDirections.fit(model, concept, [i % 2 for i in range(16)])
    ops = random_prompts(model, 6, 3, 10, seed=3)
    sur = Surrogate.fit(model, ops, dirs, d=L + 1, basis="krylov", variant="paper")
    # dense mean Jacobians of the frozen-context block maps
    Abar = torch.zeros(L, H, H, dtype=F64)
    for ctx in iter_contexts(model, ops, batch_size=16):
        eye = torch.eye(H, dtype=ctx.states.dtype)[None].expand(len(ctx), H, H)
        for layer in range(L):
            cols = ctx.jvp(layer, eye)  # [b, j, H]: A_l(p) e_j
            Abar[layer] += cols.transpose(1, 2).sum(0).to(F64)
    Abar /= len(ops)
    unit = dirs.unit.to(F64)
    b = dirs.scale.to(F64)[:, None] * unit
    w, h = unit[-1].clone(), torch.zeros(L, dtype=F64)
    for layer in range(L - 1, -1, -1):
        w = Abar[layer].T @ w
        h[layer] = w @ b[layer]
    assert _rel(sur.gains, h) < 1e-9
    # and the per-prompt variant (mean of products) is a different number on 6 prompts
    pp = Surrogate.fit(model, ops, dirs, d=L + 1, basis="krylov")
    assert _rel(pp.gains, h) > 1e-6


def test_hankel_singular_values_closed_form():
    # W_c = diag(4, 1, 0), W_o = diag(1, 9, 5): σ = sqrt(eig(W_c W_o)) = (3, 2, 0)
    Wc = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=F64))
    Wo = torch.diag(torch.tensor([1.0, 9.0, 5.0], dtype=F64))
    s = hankel_singular_values(Wc, Wo)
    torch.testing.assert_close(s, torch.tensor([3.0, 2.0, 0.0], dtype=F64), atol=1e-12, rtol=0)
    # invariant under a change of coordinates T: W_c -> T W_c Tᵀ, W_o -> T⁻ᵀ W_o T⁻¹
    T = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 1.0]], dtype=F64)
    Ti = torch.linalg.inv(T)
    s2 = hankel_singular_values(T @ Wc @ T.T, Ti.T @ Wo @ Ti)
    torch.testing.assert_close(s2, s, atol=1e-10, rtol=0)


def test_hankel_spectrum_shows_the_low_rank(low_rank_system):
    A, unit, r = low_rank_system
    stats = _toy(A, unit, unit[-1], 8, "krylov")
    hsv = stats["hankel"]  # [L+1, d]
    last = hsv[-1]
    # a single readout at the end: one observable direction per layer, so ONE non-zero σ
    assert last[0] > 0 and (last[1:] <= 1e-10 * last[0]).all()


@pytest.mark.parametrize("basis", ["krylov", "two-sided", "observable"])
def test_fit_orders_equals_separate_fits(basis):
    model = make_gemma_like(n_layers=4)
    concept = random_prompts(model, 16, 3, 10, seed=2)
    dirs = ConceptDirections.fit(model, concept, [i % 2 for i in range(16)])
    ops = random_prompts(model, 7, 3, 10, seed=4)
    many = Surrogate.fit_orders(model, ops, dirs, orders=[2, 3, 6], basis=basis, batch_size=4)
    assert sorted(many) == [2, 3, 6]
    for o, sur in many.items():
        one = Surrogate.fit(model, ops, dirs, d=o, basis=basis, batch_size=4)
        assert sur.d == o
        for name in ("gains", "gains_paper", "gains_std", "A", "B", "c", "P", "hankel"):
            torch.testing.assert_close(
                getattr(sur, name), getattr(one, name), rtol=1e-9, atol=1e-9, msg=name
            )
