"""steerlin.krylov: anchored orthonormal bases, POD bases and reduced-model gains (plain tensors).

Tolerances: everything is float64 linear algebra on O(1) numbers; orthonormality after
Gram-Schmidt-twice is at the 1e-15 level (we allow 1e-12); recovered subspaces from an exact
planted low-rank Gram matrix are exact up to eigensolver rounding (1e-10).
"""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from steerlin.linalg import anchored_orth, gains_from_reduced, pod_basis, random_basis, simulate

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _assert_orthonormal(P, tol=1e-12):
    eye = torch.eye(P.shape[1], dtype=F64)
    assert (P.T @ P - eye).abs().max().item() < tol


def _proj(U):
    Q, _ = torch.linalg.qr(U)
    return Q @ Q.T


# ------------------------------------------------------------------ anchored_orth


def test_anchored_orth_orthonormal_and_anchored():
    H, d = 20, 6
    g = _gen(0)
    first = 3.0 * torch.randn(H, generator=g, dtype=F64)
    cand = torch.randn(H, 8, generator=g, dtype=F64)
    P = anchored_orth(first, cand, d)
    assert P.shape == (H, d) and P.dtype == F64
    _assert_orthonormal(P)
    torch.testing.assert_close(P[:, 0], first / first.norm(), rtol=0, atol=1e-15)
    # Gram-Schmidt order: span(P[:, :k+1]) == span(first, cand[:, :k]) for every k
    for k in range(1, d):
        S = torch.cat([first[:, None], cand[:, :k]], dim=1)
        torch.testing.assert_close(_proj(P[:, : k + 1]), _proj(S), rtol=0, atol=1e-12)


def test_anchored_orth_float32_input_gives_float64():
    g = _gen(1)
    P = anchored_orth(torch.randn(10, generator=g), torch.randn(10, 4, generator=g), 5)
    assert P.dtype == F64
    _assert_orthonormal(P)


def test_anchored_orth_breakdown_warns_and_fills():
    H = 12
    g = _gen(2)
    first = torch.randn(H, generator=g, dtype=F64)
    a = torch.randn(H, generator=g, dtype=F64)
    # dependent: a multiple of first, a zero, a NaN column, a combination, a multiple of a
    cand = torch.stack(
        [
            2 * first,
            a,
            torch.zeros(H, dtype=F64),
            torch.full((H,), float("nan"), dtype=F64),
            a - 5 * first,
            -3 * a,
        ],
        dim=1,
    )
    with pytest.warns(
        UserWarning, match="Krylov breakdown, only 2 independent directions of the 5 asked for"
    ):
        P = anchored_orth(first, cand, 5, generator=_gen(0))
    assert P.shape == (H, 5) and torch.isfinite(P).all()
    _assert_orthonormal(P)
    torch.testing.assert_close(
        _proj(P[:, :2]), _proj(torch.stack([first, a], 1)), rtol=0, atol=1e-12
    )
    # the random fill is seeded
    with pytest.warns(UserWarning):
        P2 = anchored_orth(first, cand, 5, generator=_gen(0))
    assert torch.equal(P, P2)


def test_anchored_orth_no_warning_when_enough_candidates():
    g = _gen(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        anchored_orth(
            torch.randn(8, generator=g, dtype=F64), torch.randn(8, 7, generator=g, dtype=F64), 8
        )


def test_anchored_orth_errors():
    first = torch.ones(6, dtype=F64)
    with pytest.raises(ValueError, match=r"d: expected 1 <= d <= 6 \(the residual width\), got 7"):
        anchored_orth(first, torch.eye(6, dtype=F64), 7)
    with pytest.raises(ValueError, match="d: expected 1 <= d <= 6"):
        anchored_orth(first, torch.eye(6, dtype=F64), 0)
    with pytest.raises(ValueError, match="must be non-zero"):
        anchored_orth(torch.zeros(6, dtype=F64), torch.eye(6, dtype=F64), 2)


def test_random_basis():
    first = torch.arange(1.0, 11.0, dtype=F64)
    P = random_basis(first, 4, generator=_gen(0))
    _assert_orthonormal(P)
    torch.testing.assert_close(P[:, 0], first / first.norm(), rtol=0, atol=1e-15)
    assert torch.equal(P, random_basis(first, 4, generator=_gen(0)))
    assert not torch.equal(P, random_basis(first, 4, generator=_gen(1)))
    assert random_basis(first, 1).shape == (10, 1)


# ------------------------------------------------------------------ POD


def _planted(H, k, m, first, seed):
    """Samples lying exactly in a k-dim subspace U with distinct strengths."""
    g = _gen(seed)
    U, _ = torch.linalg.qr(torch.randn(H, k, generator=g, dtype=F64))
    s = torch.tensor([10.0 / (j + 1) for j in range(k)], dtype=F64)
    M = U @ torch.diag(s) @ torch.randn(k, m, generator=g, dtype=F64)
    return U, M


def test_pod_recovers_planted_subspace_orthogonal_to_first():
    H, k = 16, 3
    first = torch.zeros(H, dtype=F64)
    first[0] = 2.0
    U, M = _planted(H - 1, k, 50, first, 0)
    U = torch.cat([torch.zeros(1, k, dtype=F64), U])  # orthogonal to first = e_0
    M = torch.cat([torch.zeros(1, M.shape[1], dtype=F64), M])
    P = pod_basis(first, M @ M.T, k + 1)
    _assert_orthonormal(P)
    torch.testing.assert_close(P[:, 0], first / first.norm(), rtol=0, atol=1e-15)
    torch.testing.assert_close(_proj(P[:, 1:]), _proj(U), rtol=0, atol=1e-10)
    # columns in order of explained variance: the first POD column is the top principal one
    evals, evecs = torch.linalg.eigh(M @ M.T)
    top = evecs[:, -1]
    assert abs(abs(P[:, 1] @ top) - 1) < 1e-10
    # sign convention: largest-magnitude entry of each POD column is positive
    for j in range(1, k + 1):
        assert P[P[:, j].abs().argmax(), j] > 0


def test_pod_projects_out_first():
    """Planted subspace not orthogonal to first: P spans first + the subspace."""
    H, k = 12, 2
    g = _gen(5)
    first = torch.randn(H, generator=g, dtype=F64)
    U, M = _planted(H, k, 30, first, 1)
    M = M + first[:, None] * torch.randn(1, 30, generator=g, dtype=F64)
    P = pod_basis(first, M @ M.T, k + 1)
    _assert_orthonormal(P)
    torch.testing.assert_close(
        _proj(P), _proj(torch.cat([first[:, None], U], 1)), rtol=0, atol=1e-10
    )


def test_pod_rank_deficient_warns():
    H, k = 10, 2
    first = torch.zeros(H, dtype=F64)
    first[-1] = 1.0
    U, M = _planted(H, k, 20, first, 2)
    with pytest.warns(UserWarning, match="POD basis: Krylov breakdown"):
        P = pod_basis(first, M @ M.T, 6, generator=_gen(0))
    assert P.shape == (H, 6)
    _assert_orthonormal(P)


# ------------------------------------------------------------------ reduced gains


def _random_llv(L, d, seed, batch=()):
    g = _gen(seed)
    A = torch.randn(*batch, L, d, d, generator=g, dtype=F64) / d**0.5
    B = torch.randn(*batch, L, d, generator=g, dtype=F64)
    c = torch.randn(*batch, d, generator=g, dtype=F64)
    return A, B, c


def _brute_gains(A, B, c):
    L, d = A.shape[0], A.shape[1]
    h = []
    for l in range(L):
        M = torch.eye(d, dtype=F64)
        for m in range(l + 1, L):
            M = A[m] @ M
        h.append(c @ M @ B[l])
    return torch.stack(h)


def test_gains_from_reduced_equals_brute_force_products():
    A, B, c = _random_llv(6, 4, 0)
    h = gains_from_reduced(A, B, c)
    assert h.shape == (6,)
    torch.testing.assert_close(h, _brute_gains(A, B, c), rtol=1e-12, atol=1e-12)
    # last layer: c^T B_{L-1}; no A involved
    torch.testing.assert_close(h[-1], c @ B[-1], rtol=0, atol=1e-14)


def test_gains_from_reduced_batched():
    A, B, c = _random_llv(5, 3, 1, batch=(2, 3))
    h = gains_from_reduced(A, B, c)
    assert h.shape == (2, 3, 5)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(
                h[i, j], _brute_gains(A[i, j], B[i, j], c[i, j]), rtol=1e-12, atol=1e-12
            )


def test_simulate_one_hot_gives_gains():
    A, B, c = _random_llv(5, 4, 2)
    h = gains_from_reduced(A, B, c)
    for l in range(5):
        u = torch.zeros(5, dtype=F64)
        u[l] = 1.0
        torch.testing.assert_close(simulate(A, B, c, u), h[l], rtol=1e-12, atol=1e-12)


def _finite_floats():
    return st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def llv_systems(draw):
    L = draw(st.integers(1, 6))
    d = draw(st.integers(1, 5))
    A = draw(arrays("float64", (L, d, d), elements=_finite_floats()))
    B = draw(arrays("float64", (L, d), elements=_finite_floats()))
    c = draw(arrays("float64", (d,), elements=_finite_floats()))
    u = draw(arrays("float64", (L,), elements=_finite_floats()))
    return tuple(torch.from_numpy(x) for x in (A, B, c, u))


@settings(max_examples=60, deadline=None)
@given(llv_systems())
def test_gains_are_linear_property(system):
    """simulate(u) == gains @ u for any reduced system: the surrogate is linear in u."""
    A, B, c, u = system
    h = gains_from_reduced(A, B, c)
    # rounding scale: the same products in absolute values (no cancellation)
    bound = (gains_from_reduced(A.abs(), B.abs(), c.abs()) @ u.abs()).item()
    tol = 1e-12 * bound + 1e-300
    assert abs(simulate(A, B, c, u).item() - (h @ u).item()) <= tol
    hbound = gains_from_reduced(A.abs(), B.abs(), c.abs())
    assert ((h - _brute_gains(A, B, c)).abs() <= 1e-12 * hbound + 1e-300).all()


def test_linalg_shape_annotations_are_enforced():
    """conftest installs jaxtyping + beartype on steerlin.linalg: a call whose shapes break the
    annotation (H differs between the two candidate sets) fails at the call, by name."""
    from jaxtyping import TypeCheckError

    from steerlin import linalg

    f64 = torch.float64
    ok = linalg.two_sided_candidates(torch.zeros(5, 2, dtype=f64), torch.zeros(5, 3, dtype=f64))
    assert ok.shape == (5, 5)
    with pytest.raises(TypeCheckError, match="two_sided_candidates"):
        linalg.two_sided_candidates(torch.zeros(5, 2, dtype=f64), torch.zeros(4, 3, dtype=f64))
