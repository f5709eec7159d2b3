"""Concept-anchored bases and the reduced linear layer-varying (LLV) model: linear algebra only.

No TransformerLens here: everything takes plain tensors, so it is tested on synthetic matrices.

A basis P_l is H x d with orthonormal columns and P_l[:, 0] = unit_l. The reduced model is

    r_{l+1} = Abar_l r_l + Bbar_l u_l,     dy = c^T r_L,
    Abar_l = P_{l+1}^T A_l P_l,   Bbar_l = P_{l+1}^T A_l b_l,   c = P_L^T (readout direction),

and the gain of layer l (readout change per unit u_l, all else zero) is

    h_l = c^T Abar_{L-1} ... Abar_{l+1} Bbar_l,

computed by the backward recursion w_L = c, w_l = Abar_l^T w_{l+1}, h_l = w_{l+1}^T Bbar_l.
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float

DEFAULT_BREAKDOWN_TOL = 1e-8


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = v.norm()
    if not torch.isfinite(n) or n <= 0:
        raise ValueError("anchor: the first column (concept direction) must be non-zero")
    return v / n


def _fix_signs(Q: torch.Tensor) -> torch.Tensor:
    """Make each column's largest-magnitude entry positive (determinism across runs/backends)."""
    idx = Q.abs().argmax(dim=0)
    s = torch.sign(Q[idx, torch.arange(Q.shape[1])])
    return Q * torch.where(s == 0, torch.ones_like(s), s)


def anchored_orth(
    first: Float[torch.Tensor, " H"],
    candidates: Float[torch.Tensor, "H m"],
    d: int,
    *,
    tol: float = DEFAULT_BREAKDOWN_TOL,
    generator: torch.Generator | None = None,
    what: str = "basis",
) -> Float[torch.Tensor, "H d"]:
    """Orthonormal [first/‖first‖, then the candidates in order] with re-orthogonalisation.

    Classical Gram-Schmidt run twice per column ("twice is enough"); a candidate whose residual
    falls below `tol` times its norm is dependent and skipped. If fewer than d - 1 candidates
    survive (a Krylov breakdown), a UserWarning says so and random orthonormal directions fill
    the rest, so the basis always has d columns.
    """
    H = first.shape[0]
    if not 1 <= d <= H:
        raise ValueError(f"d: expected 1 <= d <= {H} (the residual width), got {d}")
    cols = [_unit(first.to(torch.float64))]
    Q = cols[0][:, None]
    cand = candidates.to(torch.float64)
    for j in range(cand.shape[1]):
        if Q.shape[1] >= d:
            break
        v = cand[:, j]
        nv = v.norm()
        if not torch.isfinite(nv) or nv == 0:
            continue
        for _ in range(2):
            v = v - Q @ (Q.T @ v)
        if v.norm() <= tol * nv:
            continue
        Q = torch.cat([Q, (v / v.norm())[:, None]], dim=1)
    if Q.shape[1] < d:
        warnings.warn(
            f"{what}: Krylov breakdown, only {Q.shape[1]} independent directions of the {d} "
            "asked for; the rest are random orthonormal directions",
            UserWarning,
            stacklevel=2,
        )
        R = torch.randn(H, d - Q.shape[1], generator=generator, dtype=torch.float64)
        for _ in range(2):
            R = R - Q @ (Q.T @ R)
        R, _ = torch.linalg.qr(R)
        Q = torch.cat([Q, R], dim=1)
    return Q


def random_basis(
    first: Float[torch.Tensor, " H"], d: int, *, generator: torch.Generator | None = None
) -> Float[torch.Tensor, "H d"]:
    """unit(first) then d - 1 random orthonormal directions (the paper's ablation).

    Drawn column by column, so under the same generator state the order-d' basis is the
    first d' columns of the order-d one (nested orders, see `Surrogate.fit_orders`).
    """
    H = first.shape[0]
    R = torch.randn(max(d - 1, 0), H, generator=generator, dtype=torch.float64).T
    return anchored_orth(first, R, d, generator=generator, what="random basis")


def pod_basis(
    first: Float[torch.Tensor, " H"],
    gram: Float[torch.Tensor, "H H"],
    d: int,
    *,
    generator: torch.Generator | None = None,
) -> Float[torch.Tensor, "H d"]:
    """unit(first), then the top d - 1 principal directions of sample vectors orthogonal to it.

    `gram` = sum of M M^T over the samples M (H x m blocks), so the statistic is a sum and can be
    accumulated over prompt batches and over processes. Directions are those of the samples
    after projecting out `first`.
    """
    u = _unit(first.to(torch.float64))
    G = gram.to(torch.float64)
    Pperp = torch.eye(G.shape[0], dtype=torch.float64) - torch.outer(u, u)
    G = Pperp @ G @ Pperp
    G = (G + G.T) / 2
    evals, evecs = torch.linalg.eigh(G)
    order = torch.argsort(evals, descending=True)
    top = evecs[:, order[: d - 1]]
    keep = evals[order[: d - 1]] > evals.max().clamp_min(0) * 1e-12
    return anchored_orth(u, _fix_signs(top[:, keep]), d, generator=generator, what="POD basis")


def two_sided_candidates(
    observable: Float[torch.Tensor, "H m"],
    reachable: Float[torch.Tensor, "H k"],
) -> Float[torch.Tensor, "H m+k"]:
    """Interleave observable and reachable candidate columns: [o_1, r_1, o_2, r_2, ...].

    Fed to `anchored_orth`, a basis of order d keeps about (d - 1) / 2 directions of each
    kind, the most important first: the leading observability directions (where the readout
    looks, propagated backwards) and the leading reachability directions (where the
    injections go, propagated forwards).
    """
    m, k = observable.shape[1], reachable.shape[1]
    cols = []
    for j in range(max(m, k)):
        if j < m:
            cols.append(observable[:, j])
        if j < k:
            cols.append(reachable[:, j])
    if not cols:
        return observable.new_zeros(observable.shape[0], 0)
    return torch.stack(cols, dim=1)


def principal_directions(
    gram: torch.Tensor, k: int, *, rows: bool = False
) -> tuple[Float[torch.Tensor, "H k"], Float[torch.Tensor, " k"]]:
    """Top-k eigenvectors (sign-fixed) and eigenvalues of a symmetric PSD statistic Σ M Mᵀ.

    For k < H only the top k eigenpairs are computed (LAPACK ?syevx through scipy): the full
    eigendecomposition of an H x H statistic per layer was ~15% of a two-sided fit of 64
    short prompts on Gemma-3-270m (H = 640); the same eigenpairs to round-off.

    With `rows`, `gram` is the samples' rows W [n, H] of the statistic Wᵀ W: its top right
    singular vectors and squared singular values (an n x H SVD instead of an H x H eigenproblem;
    the same eigenpairs to round-off).
    """
    if rows:
        W = gram.to(torch.float64)
        if W.shape[0] == 0 or not bool(torch.isfinite(W).all()):
            return principal_directions(W.T @ W, k)
        _, sv, Vh = torch.linalg.svd(W, full_matrices=False)
        evals = sv[:k].pow(2)
        keep = evals > evals.max().clamp_min(0) * 1e-12
        return _fix_signs(Vh[:k].T[:, keep]), evals[keep]
    G = gram.to(torch.float64)
    G = (G + G.T) / 2
    H = G.shape[0]
    if 0 < k < H and bool(torch.isfinite(G).all()):
        import scipy.linalg

        w, v = scipy.linalg.eigh(
            G.cpu().numpy(), subset_by_index=[H - k, H - 1], driver="evx", check_finite=False
        )
        evals = torch.from_numpy(w).to(G.device)
        evecs = torch.from_numpy(v).to(G.device)
    else:
        evals, evecs = torch.linalg.eigh(G)
    order = torch.argsort(evals, descending=True)[:k]
    keep = evals[order] > evals.max().clamp_min(0) * 1e-12
    order = order[keep]
    return _fix_signs(evecs[:, order]), evals[order]


def _psd_sqrt(W: torch.Tensor) -> torch.Tensor:
    """A square-root factor S with S Sᵀ = W for a symmetric PSD W (negative round-off -> 0)."""
    evals, evecs = torch.linalg.eigh((W + W.T) / 2)
    return evecs * evals.clamp_min(0).sqrt()


def hankel_singular_values(
    Wc: Float[torch.Tensor, "d d"], Wo: Float[torch.Tensor, "d d"]
) -> Float[torch.Tensor, " d"]:
    """Hankel singular values at one layer, σ_i = sqrt(λ_i(W_c W_o)), by the square-root method.

    W_c is the reachability gramian at the layer (prompt-averaged Σ_k r_k r_kᵀ over the
    responses r_k to a unit injection at every earlier layer k), W_o the observability
    gramian (prompt-averaged w wᵀ of the readout gradient propagated back to the layer), both
    in the same coordinates. With W_c = S_c S_cᵀ and W_o = S_o S_oᵀ the σ_i are the singular
    values of S_oᵀ S_c. A direction with σ_i ≈ 0 is never reached or never read: the number
    of σ_i above a tolerance is the order the input-output map really uses at that layer.
    """
    Sc = _psd_sqrt(Wc.to(torch.float64))
    So = _psd_sqrt(Wo.to(torch.float64))
    return torch.linalg.svdvals(So.T @ Sc)


def gains_from_reduced(
    Abar: Float[torch.Tensor, "... L d d"],
    Bbar: Float[torch.Tensor, "... L d"],
    c: Float[torch.Tensor, "... d"],
) -> Float[torch.Tensor, "... L"]:
    """h_l = c^T Abar_{L-1} ... Abar_{l+1} Bbar_l for every l (batched over leading dims)."""
    L = Abar.shape[-3]
    w = c
    h = []
    for layer in range(L - 1, -1, -1):
        h.append((w * Bbar[..., layer, :]).sum(-1))
        w = (Abar[..., layer, :, :].transpose(-1, -2) @ w[..., None])[..., 0]
    return torch.stack(h[::-1], dim=-1)


def simulate(
    Abar: Float[torch.Tensor, "L d d"],
    Bbar: Float[torch.Tensor, "L d"],
    c: Float[torch.Tensor, " d"],
    u: Float[torch.Tensor, " L"],
) -> torch.Tensor:
    """dy for a schedule u by running r_{l+1} = Abar_l r_l + Bbar_l u_l from r_0 = 0."""
    r = torch.zeros(Abar.shape[-1], dtype=Abar.dtype)
    for layer in range(Abar.shape[0]):
        r = Abar[layer] @ r + Bbar[layer] * u[layer]
    return c @ r


__all__ = [
    "anchored_orth",
    "random_basis",
    "pod_basis",
    "two_sided_candidates",
    "principal_directions",
    "hankel_singular_values",
    "gains_from_reduced",
    "simulate",
]
