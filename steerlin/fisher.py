"""The KL metric of steering: predicted side effect of a schedule on the next-token distribution.

For a small injection schedule u (norm-relative amplitudes, b_l = scale_l unit_l) at the last
token of a prompt, with every earlier position frozen, the next-token logits move by
δz ≈ Σ_l u_l J_l b_l (J_l: Jacobian from x_l to the logits). The KL divergence of the
next-token distribution is then, to second order,

    KL(π ‖ π') ≈ ½ δzᵀ G δz,     G = diag(π) − ππᵀ   (the softmax Fisher metric at the clean π)

so the expected KL over prompts is ½ uᵀFu with

    F[l, m] = E_p ⟨J_l(p) b_l, J_m(p) b_m⟩_G.

`kl_metric` computes F with the single-token machinery: per batch, one tangent per injection
layer is propagated by forward JVPs through the frozen-context block maps (all injection layers
folded into one tangent batch), then through the final norm and the unembedding; R = [J_l b_l]
is [V, L] per prompt, and F = mean_p RᵀGR (float64, L×L).
"""

from __future__ import annotations

import torch
from jaxtyping import Float

from .backend import check_model
from .energy import Metric
from .errors import InputError
from .frozen import FrozenContext, compute_dtype, iter_contexts
from .readouts import full_logits, logit_kl
from .tokens import PromptsLike

F64 = torch.float64


def injection_responses(
    ctx: FrozenContext, b: Float[torch.Tensor, "L H"]
) -> Float[torch.Tensor, "n L H"]:
    """J_{l→L}(p) b_l for every injection layer l: tangents folded into one batch per block."""
    n, H = len(ctx), ctx.states.shape[-1]
    T = ctx.states.new_zeros(n, 0, H)
    for layer in range(ctx.n_layers):
        T = torch.cat([T, b[layer].to(T)[None, None].expand(n, 1, H)], dim=1)
        T = ctx.jvp(layer, T)
    return T


def _fisher_rows(model, xL: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Σ over the rows of RᵀGR: xL [n, H] clean final states, T [n, L, H] tangents there."""
    L = T.shape[1]
    out = torch.zeros(L, L, dtype=F64, device=xL.device)
    f = lambda x: full_logits(model, x)
    for i in range(xL.shape[0]):
        x = xL[i]
        z, R = torch.func.vmap(lambda t: torch.func.jvp(f, (x,), (t,)), out_dims=(None, 0))(T[i])
        pi = torch.softmax(z.to(F64), -1)  # [V]
        R = R.to(F64)  # [L, V]
        m = R @ pi  # [L]
        out += (R * pi) @ R.T - torch.outer(m, m)
    return out.cpu()


def kl_metric(
    model,
    prompts: PromptsLike,
    directions,
    *,
    ridge: float = 1e-3,
    batch_size: int = 8,
) -> Metric:
    """The KL metric F (see the module docstring) on `prompts`, as a `Metric` for Controller.

    Args:
        model: the model.
        prompts: where the side effect is measured: neutral text, or the operating prompts.
        directions: ConceptDirections, or a Surrogate (its unit_l and scale_l are used).
        ridge: F is regularised as F + ridge · tr(F)/L · I: with L injection layers F can be
            near-singular (layers whose effects on the logits are nearly parallel), and the
            least-KL solve W⁻¹h would then put large, cancelling amplitudes on them that hold
            only to first order. 1e-3 of the mean eigenvalue is the default.
        batch_size: prompts per batch.

    Returns:
        Metric("kl", F + ridge), with meta["F"] the unregularised F and its eigenvalues.
    """
    check_model(model)
    if not ridge >= 0:
        raise InputError(f"ridge: expected a non-negative number, got {ridge}")
    b = _injections(model, directions)
    L = model.cfg.n_layers
    F = torch.zeros(L, L, dtype=F64)
    n = 0
    for ctx in iter_contexts(model, prompts, batch_size=batch_size):
        T = injection_responses(ctx, b)
        F += _fisher_rows(model, ctx.states[:, -1], T)
        n += len(ctx)
    if n == 0:
        raise InputError("prompts: expected at least one prompt, got none")
    F = 0.5 * (F + F.T) / n
    lam = ridge * float(F.trace()) / L
    eig = torch.linalg.eigvalsh(F)
    meta = {
        "n_prompts": n,
        "ridge": ridge,
        "ridge_abs": lam,
        "eig_min": float(eig[0]),
        "eig_max": float(eig[-1]),
        "F": F,
    }
    return Metric("kl", F + lam * torch.eye(L, dtype=F64), meta)


def _injections(model, directions) -> torch.Tensor:
    """b_l = scale_l unit_l [L, H] in the model's dtype, from directions or a surrogate."""
    L = model.cfg.n_layers
    if hasattr(directions, "b"):
        b = directions.b[:L]
    elif hasattr(directions, "P") and "scale" in getattr(directions, "meta", {}):
        scale = torch.as_tensor(directions.meta["scale"], dtype=F64)[:L]
        b = directions.P[:L, :, 0] * scale[:, None]
    else:
        raise InputError(
            f"directions: expected ConceptDirections or a Surrogate, got {type(directions)}"
        )
    if b.shape != (L, model.cfg.d_model):
        raise InputError(f"directions: injection vectors {tuple(b.shape)} do not fit the model")
    return b.to(compute_dtype(model))


def frozen_kl(
    model, prompts: PromptsLike, directions, u: Float[torch.Tensor, " L"], *, batch_size: int = 8
) -> float:
    """Measured mean KL(clean ‖ steered) of the next-token distribution, u injected at the last
    token only (frozen context), on the full model: the brute-force check of ½uᵀFu."""
    check_model(model)
    b = _injections(model, directions)
    u = torch.as_tensor(u, dtype=F64)
    total, n = 0.0, 0
    with torch.no_grad():
        for ctx in iter_contexts(model, prompts, batch_size=batch_size):
            x = ctx.states[:, 0]
            for layer in range(ctx.n_layers):
                x = ctx.block(layer, x + (u[layer] * b[layer].to(F64)).to(x))
            total += float(logit_kl(model, ctx.states[:, -1], x).sum())
            n += len(ctx)
    return total / n


__all__ = ["kl_metric", "frozen_kl", "injection_responses"]
