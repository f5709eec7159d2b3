"""Identification of the LLV surrogate: the layer-major sweep over the operating prompts.

Pure algorithm behind `Surrogate.fit`: per layer, push the basis P_l through every prompt's
frozen-context Jacobian (JVPs), choose P_{l+1} (steerlin.linalg), reduce each prompt's A_l and
accumulate the means, the per-prompt reduced responses (reachability Gramian) and, for the
two-sided/observable bases, the observability statistic from VJPs. Equations: `Surrogate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from . import linalg
from .backend import Model
from .directions import ConceptDirections
from .errors import InputError, NonFiniteError
from .frozen import FrozenContext, LayerwiseContext
from .readouts import Readout


def state_gradients(
    ctx: FrozenContext, readout: Readout, what: str = "exact gains: non-finite gradient"
) -> Float[torch.Tensor, "b L H"]:
    """∂y(p)/∂x_l for every layer l < L at once: ONE backward pass through the single-token
    chain x_{l+1} = f_l(x_l) with a zero additive perturbation at each x_l.

    These are the readout gradient propagated backwards, w_l = A_lᵀ w_{l+1} (the
    observability vectors of the two-sided basis), and the exact gains are ⟨w_l, b_l⟩.
    A non-finite block output or gradient raises NonFiniteError prefixed by `what`.

    For a half-precision model (`ctx.upcast`) the same gradients come from the per-layer VJP
    recursion at the clean states, one block at a time: a backward through the whole chain
    would keep every block's float32 copy alive in the autograd graph (a float32 model copy).
    """
    L, st = ctx.n_layers, ctx.states
    if getattr(ctx, "upcast", None) is not None:
        return _blockwise_state_gradients(ctx, readout, what)
    with torch.enable_grad():
        u = torch.zeros(len(ctx), L, st.shape[-1], dtype=st.dtype, device=st.device)
        u.requires_grad_(True)
        x = st[:, 0]
        for layer in range(L):
            x = ctx.block(layer, x + u[:, layer])
            if not torch.isfinite(x).all():  # name the block before backward smears it
                raise NonFiniteError(
                    f"{what} at layer {layer}: the single-token block's output is not finite"
                )
        (W,) = torch.autograd.grad(readout(ctx.model, x).sum(), u)
    bad = (~torch.isfinite(W)).any(-1).any(0).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteError(f"{what} at layers {bad}")
    return W.detach()


def _blockwise_state_gradients(ctx, readout: Readout, what: str) -> torch.Tensor:
    """state_gradients by w_L = ∇y(x_L), w_l = A_lᵀ w_{l+1}: one VJP per block at x_l."""
    L, st = ctx.n_layers, ctx.states
    W = torch.empty(len(ctx), L, st.shape[-1], dtype=st.dtype, device=st.device)
    w = readout.gradient(ctx.model, st[:, -1]).to(st.dtype)
    with torch.enable_grad():
        for layer in range(L - 1, -1, -1):
            x = st[:, layer].detach().requires_grad_(True)
            y = ctx.block(layer, x)
            if not torch.isfinite(y).all():
                raise NonFiniteError(
                    f"{what} at layer {layer}: the single-token block's output is not finite"
                )
            (w,) = torch.autograd.grad(y, x, w)
            if not torch.isfinite(w).all():
                raise NonFiniteError(f"{what} at layers [{layer}]")
            W[:, layer] = w
    return W


def identity_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


# one process, n <= H prompts: the observability directions from the n x H rows, not the H x H
# grams (`observability_stats`); False forces the grams (tests compare the two paths)
_OBS_ROWS = True


def fit_core(
    model: Model,
    contexts: Sequence[FrozenContext | LayerwiseContext],
    directions: ConceptDirections,
    readout: Readout,
    d: int,
    basis: str,
    seed: int,
    progress: bool,
    reduce,
    orders: Sequence[int] = (),
    *,
    obs_gram: Float[torch.Tensor, "Lp1 H H"] | None = None,
    obs_proj: Float[torch.Tensor, " L"] | None = None,
    obs_rows: bool = False,
) -> dict[str, Any]:
    """Layer-major identification; `reduce` sums a statistic over processes (identity: one).
    `obs_gram`: the observability statistic the two-sided/observable bases need; `obs_proj`:
    Σ_p ⟨w_l(p), unit_l⟩ from the same pass (`observability_grams`), which gives the
    exact gains and the reduction's self-check at no cost. `obs_rows`: `obs_gram` is the rows
    W [L+1, n, H] of the grams W_lᵀ W_l (`observability_stats`), not the grams."""
    L, H = model.cfg.n_layers, model.cfg.d_model
    f64 = torch.float64
    gen = torch.Generator().manual_seed(seed)
    unit = directions.unit.to(f64)
    scale = directions.scale.to(f64)
    n_local = sum(len(c) for c in contexts)
    n = int(reduce(torch.tensor(float(n_local), dtype=f64)).item())
    if n == 0:
        raise InputError("prompts: expected at least one operating prompt, got none")

    # b_l = 0 where unit_l = 0 (e.g. every prompt ends in the same token: x_0 is identical)
    scale = scale * (unit.norm(dim=-1) > 0).to(f64)
    if basis in ("two-sided", "observable") and obs_gram is None:
        raise InputError(f"basis={basis!r} needs the observability statistic (obs_gram)")
    # Only P_0[:, 0] matters (nothing perturbs x_0 before the first injection).
    anchor0 = unit[0] if unit[0].norm() > 0 else torch.eye(H, dtype=f64)[0]
    P = [linalg.random_basis(anchor0, d, generator=gen)]
    # R[i]: per-prompt reduced responses at the current layer to unit injections at 0..l-1
    R = [torch.zeros(len(c), d, 0, dtype=f64) for c in contexts]
    Ab_all: list[list[torch.Tensor]] = [[] for _ in contexts]  # per-prompt Abar, per layer
    A_mean, B_mean, Wc = [], [], [torch.zeros(d, d, dtype=f64)]
    for layer in tqdm(range(L), desc="surrogate", disable=not progress, leave=False):
        Pl = P[layer]
        Ys: list[torch.Tensor] = []
        sum_Y = torch.zeros(d, H, dtype=f64)
        for ctx in contexts:
            # boundary: tangents go to the model's device and dtype, images come back as CPU
            # float64 for the reduced algebra (small, d x H per prompt)
            tang = Pl.T.to(ctx.states.device, ctx.states.dtype)[None].expand(len(ctx), d, H)
            Y = ctx.jvp(layer, tang).to("cpu", f64)  # [b, d, H]: rows are A_l(p) P_l[:, j]
            if isinstance(ctx, LayerwiseContext):
                ctx.done_with(layer)  # streamed: this block's K/V are not needed again
            Ys.append(Y)
            sum_Y += Y.sum(0)
        gram = _pod_gram(Ys, R, d, H, n, reduce) if basis == "pod" else None
        sum_Y = reduce(sum_Y)
        mean_Y = sum_Y / n  # [d, H]
        obs = None if obs_gram is None else obs_gram[layer + 1]
        obs = None if obs is None else linalg.principal_directions(obs, d, rows=obs_rows)[0]
        nxt = _next_basis(basis, layer, unit[layer + 1], mean_Y, obs, gram, d, gen, reduce)
        P.append(nxt)
        A_l = nxt.T @ mean_Y.T  # [d, d] = P_{l+1}^T (mean A_l) P_l
        A_mean.append(A_l)
        B_mean.append(scale[layer] * A_l[:, 0])
        Wc.append(reduce(_propagate(nxt, Ys, R, Ab_all, scale[layer], d)) / n)
        del Ys

    sum_c, sum_grad, sum_g, sum_g2, Wo = _readout_sums(model, contexts, readout, P[L], R, Ab_all, L)
    Wo = reduce(Wo) / n
    lower = {}
    for o in sorted({int(o) for o in orders if int(o) < d}):
        lower[o] = _truncated(contexts, readout, model, P, Ab_all, scale, o, n, reduce)
        if obs_gram is not None:
            lower[o]["adjoint_captured"] = adjoint_captured(lower[o]["P"], obs_gram, rows=obs_rows)
    del Ab_all
    hankel = _hankel(Wc, Wo)
    c = reduce(sum_c) / n
    mean_grad = reduce(sum_grad) / n
    gains_prompt = reduce(sum_g) / n
    var = (reduce(sum_g2) / n - gains_prompt.pow(2)).clamp_min(0)
    A = torch.stack(A_mean)
    B = torch.stack(B_mean)
    gains_paper = linalg.gains_from_reduced(A, B, c)
    P = torch.stack(P)
    out = {
        "P": P,
        # the exact gains on the same prompts (None without the observability pass)
        "gains_exact": None if obs_proj is None else scale[:L] * obs_proj / n,
        "adjoint_captured": (
            None if obs_gram is None else adjoint_captured(P, obs_gram, rows=obs_rows)
        ),
        "A": A,
        "B": B,
        "c": c,
        "gains_prompt": gains_prompt,
        "gains_paper": gains_paper,
        "gains_std": var.sqrt(),
        # null model: the injection reaches x_L unchanged (every A_l = I)
        "gains_identity": scale[:L] * (unit[:L] @ mean_grad),
        "hankel": hankel,
        "n": torch.tensor(n),
        "orders": lower,
    }
    for k in ("gains_prompt", "gains_paper"):
        if not torch.isfinite(out[k]).all():
            bad = (~torch.isfinite(out[k])).nonzero().flatten().tolist()
            raise NonFiniteError(f"surrogate: non-finite gains at layers {bad}")
    return out


def identify(
    model: Model,
    directions: ConceptDirections,
    readout: Readout,
    reduce,
    *,
    d: int,
    basis: str,
    seed: int,
    progress: bool,
    orders: Sequence[int],
    full: Callable[[], Iterable[FrozenContext]],
    layerwise: Callable[[], list[LayerwiseContext]],
    held: list[FrozenContext],
) -> dict[str, Any]:
    """The identification (`fit_core`) over the prompts' frozen contexts, streamed: `layerwise()`
    builds each batch block by block (its residual at the current layer and one block's K/V:
    one forward in all over the layer-major sweep, not every block's K/V). For the two-sided
    and observable bases a first pass over `full()` (one batch's full context at a time) folds
    the backward vectors w_l(p) into the observability statistic; the contexts it appends to
    `held` while it goes are swapped into the sweep (no second forward for them)."""
    with torch.no_grad():  # JVPs/VJPs via torch.func only; no graph through a user's parameters
        obs_gram = obs_proj = None
        obs_rows = False
        if basis in ("two-sided", "observable"):
            unit = directions.unit.to(torch.float64)
            obs_gram, obs_proj, obs_rows = observability_stats(
                model, full(), readout, reduce, unit, rows_ok=_OBS_ROWS
            )
        contexts = layerwise()
        for i, ctx in enumerate(held):  # same batching, same order: swap in the held ones
            if not torch.equal(ctx.index.cpu(), torch.as_tensor(contexts[i].index).cpu()):
                raise RuntimeError("internal: held contexts do not match the sweep's batches")
            contexts[i] = ctx
        return fit_core(
            model,
            contexts,
            directions,
            readout,
            int(d),
            basis,
            seed,
            progress,
            reduce,
            orders,
            obs_gram=obs_gram,
            obs_proj=obs_proj,
            obs_rows=obs_rows,
        )


def _pod_gram(Ys, R, d: int, H: int, n: int, reduce) -> torch.Tensor:
    """The "pod" basis's statistic (this process's part): propagated responses to every
    injection so far plus the new one (unit_l), each injection layer weighted to unit
    mean-square norm over all prompts."""
    f64 = torch.float64
    resps = [
        torch.einsum("bdh,bdk->bkh", Y, torch.cat([R[i], _e1(len(Y), d, f64)], dim=2))
        for i, Y in enumerate(Ys)
    ]  # [b, l+1, H]
    sq = reduce(sum(r.pow(2).sum(-1).sum(0) for r in resps)) / n
    w = sq.clamp_min(1e-300).rsqrt()
    gram = torch.zeros(H, H, dtype=f64)
    for r in resps:
        rw = r * w[None, :, None]
        gram += torch.einsum("bkh,bkg->hg", rw, rw)
    return gram


def _next_basis(basis: str, layer: int, anchor, mean_Y, obs, gram, d: int, gen, reduce):
    """P_{l+1}: anchored on unit_{l+1} (`anchor`), completed as the basis says from the mean
    images mean_Y [d, H] (krylov), the observability directions `obs` [H, <=d] (two-sided,
    observable: the top eigenvectors of the observability statistic), the
    pod statistic `gram` (reduced here), or at random."""
    what = f"basis P_{layer + 1}"
    if basis == "krylov":
        return linalg.anchored_orth(anchor, mean_Y.T, d, generator=gen, what=what)
    if basis == "two-sided":
        cand = linalg.two_sided_candidates(obs, mean_Y.T)
        return linalg.anchored_orth(anchor, cand, d, generator=gen, what=what)
    if basis == "observable":
        cand = torch.cat([obs, mean_Y.T], dim=1)  # reachable ones only if obs run out
        return linalg.anchored_orth(anchor, cand, d, generator=gen, what=what)
    if basis == "pod":
        return linalg.pod_basis(anchor, reduce(gram), d, generator=gen)
    return linalg.random_basis(anchor, d, generator=gen)


def _propagate(nxt, Ys, R, Ab_all, scale_l, d: int) -> torch.Tensor:
    """Per prompt: Abar_l = P_{l+1}^T A_l(p) P_l (kept in `Ab_all`), the reduced responses R
    carried one layer on plus the new injection's; returns this process's part of the
    controllability increment Σ_p R Rᵀ."""
    wc = torch.zeros(d, d, dtype=torch.float64)
    for i, Y in enumerate(Ys):
        Ab = torch.einsum("hi,bjh->bij", nxt, Y)  # [b, d, d] per-prompt Abar
        Ab_all[i].append(Ab)
        Bb = scale_l * Ab[:, :, 0]
        R[i] = torch.cat([Ab @ R[i], Bb[:, :, None]], dim=2)
        wc += torch.einsum("bik,bjk->ij", R[i], R[i])
    return wc


def _readout_sums(model, contexts, readout, P_L, R, Ab_all, L: int) -> tuple:
    """This process's sums over prompts of the readout rows c(p) = P_Lᵀ ∇y(p) (the concept
    readout gives e_1 for every prompt), ∇y, the per-prompt gains g(p) and g(p)², and the
    reduced observability Gram Σ w_l w_lᵀ (w_l = Abar_l(p)ᵀ w_{l+1}, w_L = c(p))."""
    f64 = torch.float64
    H, d = P_L.shape
    sum_c = torch.zeros(d, dtype=f64)
    sum_grad = torch.zeros(H, dtype=f64)
    sum_g = torch.zeros(L, dtype=f64)
    sum_g2 = torch.zeros(L, dtype=f64)
    Wo = torch.zeros(L + 1, d, d, dtype=f64)
    for i, ctx in enumerate(contexts):
        grad = readout.gradient(model, ctx.states[:, -1]).to("cpu", f64)  # [b, H]
        sum_grad += grad.sum(0)
        c_p = grad @ P_L  # [b, d]
        sum_c += c_p.sum(0)
        g_p = torch.einsum("bd,bdk->bk", c_p, R[i])  # [b, L]
        sum_g += g_p.sum(0)
        sum_g2 += g_p.pow(2).sum(0)
        w = c_p  # reduced observability recursion w_l = Abar_l(p)^T w_{l+1}
        Wo[L] += w.T @ w
        for layer in range(L - 1, -1, -1):
            w = torch.einsum("bij,bi->bj", Ab_all[i][layer], w)
            Wo[layer] += w.T @ w
    return sum_c, sum_grad, sum_g, sum_g2, Wo


def _truncated(contexts, readout, model, P, Ab_all, scale, o: int, n: int, reduce):
    """The order-o model inside an order-d fit: top-left blocks of every reduced matrix.

    Valid because the bases are nested (see `Surrogate.fit_orders`). Per-prompt gains by the
    backward recursion w_L = c(p), w_l = Abar_l(p)ᵀ w_{l+1}, g_l(p) = w_{l+1} · Bbar_l(p).
    """
    f64 = torch.float64
    L = len(Ab_all[0])
    sum_g = torch.zeros(L, dtype=f64)
    sum_g2 = torch.zeros(L, dtype=f64)
    sum_A = torch.zeros(L, o, o, dtype=f64)
    sum_c = torch.zeros(o, dtype=f64)
    Wc_o = torch.zeros(L + 1, o, o, dtype=f64)
    Wo_o = torch.zeros(L + 1, o, o, dtype=f64)
    for i, ctx in enumerate(contexts):
        R = torch.zeros(len(ctx), o, 0, dtype=f64)  # order-o responses, as in _fit_core
        for layer in range(L):
            Ab = Ab_all[i][layer][:, :o, :o]
            R = torch.cat([Ab @ R, scale[layer] * Ab[:, :, :1]], dim=2)
            Wc_o[layer + 1] += torch.einsum("bik,bjk->ij", R, R)
        grad = readout.gradient(model, ctx.states[:, -1]).to("cpu", f64)
        w = grad @ P[L][:, :o]  # [b, o]
        sum_c += w.sum(0)
        Wo_o[L] += w.T @ w
        g = torch.zeros(len(ctx), L, dtype=f64)
        for layer in range(L - 1, -1, -1):
            Ab = Ab_all[i][layer][:, :o, :o]
            g[:, layer] = scale[layer] * (w * Ab[:, :, 0]).sum(-1)
            w = torch.einsum("bij,bi->bj", Ab, w)
            Wo_o[layer] += w.T @ w
            sum_A[layer] += Ab.sum(0)
        sum_g += g.sum(0)
        sum_g2 += g.pow(2).sum(0)
    A = reduce(sum_A) / n
    B = scale[:L, None] * A[:, :, 0]
    c = reduce(sum_c) / n
    gains = reduce(sum_g) / n
    var = (reduce(sum_g2) / n - gains.pow(2)).clamp_min(0)
    Wc_o, Wo_o = reduce(Wc_o) / n, reduce(Wo_o) / n
    hankel = _hankel(Wc_o, Wo_o)
    return {
        "P": torch.stack(P)[:, :, :o],
        "A": A,
        "B": B,
        "c": c,
        "gains_prompt": gains,
        "gains_paper": linalg.gains_from_reduced(A, B, c),
        "gains_std": var.sqrt(),
        "hankel": hankel,
    }


def _hankel(Wc, Wo) -> torch.Tensor:
    """Hankel singular values per layer, NaN where a gramian is not finite (the fit then
    raises NonFiniteError on its gains, naming the layers)."""
    rows = []
    for wc, wo in zip(Wc, Wo, strict=True):
        if torch.isfinite(wc).all() and torch.isfinite(wo).all():
            rows.append(linalg.hankel_singular_values(wc, wo))
        else:
            rows.append(torch.full((wc.shape[0],), float("nan"), dtype=torch.float64))
    return torch.stack(rows)


def observability_grams(
    model, contexts: Iterable, readout: Readout, reduce, unit: Float[torch.Tensor, "Lp1 H"]
) -> tuple[Float[torch.Tensor, "Lp1 H H"], Float[torch.Tensor, " L"]]:
    """(gram, proj): gram[l] = Σ_p w_l(p) w_l(p)ᵀ for l = 0..L, the observability statistic of
    the two-sided basis, and proj[l] = Σ_p ⟨w_l(p), unit_l⟩ for l < L (`observability_stats`
    with the H x H grams always)."""
    gram, proj, _ = observability_stats(model, contexts, readout, reduce, unit, rows_ok=False)
    return gram, proj


def observability_stats(
    model,
    contexts: Iterable,
    readout: Readout,
    reduce,
    unit: Float[torch.Tensor, "Lp1 H"],
    *,
    rows_ok: bool = True,
) -> tuple[torch.Tensor, Float[torch.Tensor, " L"], bool]:
    """(stat, proj, rows): the observability statistic of the two-sided basis and
    proj[l] = Σ_p ⟨w_l(p), unit_l⟩ for l < L.

    w_L(p) = ∇_x y at the prompt's final state, w_l(p) = A_l(p)ᵀ w_{l+1}(p) = ∂y(p)/∂x_l: all
    of them from ONE backward pass per batch through the single-token chain
    (`state_gradients`, the pass `exact_gains` makes): what the per-layer VJP recursion
    `FrozenContext.vjp` computes one layer at a time, at ~3x the cost.

    With `rows_ok`, one process (`reduce` is `identity_reduce`) and n <= H prompts, stat is
    the rows W [L+1, n, H] (W[l, p] = w_l(p); rows = True): the gram G_l = W_lᵀ W_l is never
    formed, and its top eigenvectors are W_l's top right singular vectors (an n x H SVD, ~1 ms
    a layer, against ~0.9 s for the H x H eigenproblem at H = 2048). Otherwise (n > H, or the
    statistic is all-reduced over processes) stat is gram[l] = Σ_p w_l(p) w_l(p)ᵀ [L+1, H, H].

    scale_l proj[l] / n are the exact gains on these prompts, which this pass computes anyway
    (the fit keeps them as `gains_exact`).
    """
    L, H = model.cfg.n_layers, model.cfg.d_model
    rows: list[torch.Tensor] | None = [] if rows_ok and reduce is identity_reduce else None
    n_rows = 0
    gram = None
    proj = torch.zeros(L, dtype=torch.float64)
    unit64 = unit[:L].to("cpu", torch.float64)
    for ctx in contexts:
        # name the first broken thing before the backward pass smears it over every layer
        bad = (~torch.isfinite(ctx.states)).flatten(2).any(-1).any(0).nonzero().flatten()
        if len(bad):
            first = int(bad[0])
            raise NonFiniteError(
                f"surrogate: non-finite clean states x_l at layers {bad.tolist()}: the model's "
                f"forward at layer {max(first - 1, 0)} produced them"
            )
        w = readout.gradient(model, ctx.states[:, -1]).to(ctx.states.dtype)  # [b, H]
        if not torch.isfinite(w).all():
            raise NonFiniteError(
                f"surrogate: non-finite readout gradient ∇y at x_L (readout {readout.kind!r})"
            )
        w64 = w.to("cpu", torch.float64)
        W = state_gradients(ctx, readout, "vjp: non-finite vector-Jacobian product")
        W64 = W.detach().to("cpu", torch.float64)
        proj += torch.einsum("blh,lh->l", W64, unit64)
        block = torch.cat([W64.transpose(0, 1), w64[None]], dim=0)  # [L+1, b, H]
        blocks = [block]
        if rows is not None:
            rows.append(block)
            n_rows += block.shape[1]
            if n_rows <= H:
                continue
            blocks, rows = rows, None  # more prompts than H: fold them into the grams
        if gram is None:
            gram = torch.zeros(L + 1, H, H, dtype=torch.float64)
        for b in blocks:  # batch by batch, as the all-reduced path sums them
            gram += torch.einsum("lbh,lbg->lhg", b, b)
    if rows is not None:
        stat = torch.cat(rows, dim=1) if rows else torch.zeros(L + 1, 0, H, dtype=torch.float64)
        return stat, proj, True
    if gram is None:
        gram = torch.zeros(L + 1, H, H, dtype=torch.float64)
    return reduce(gram), reduce(proj), False


def adjoint_captured(
    P: Float[torch.Tensor, "Lp1 H d"], obs: torch.Tensor, *, rows: bool = False
) -> Float[torch.Tensor, " Lp1"]:
    """Share of the prompts' backward vectors' energy Σ_p ‖w_l(p)‖² that span(P_l) holds:
    tr(P_lᵀ G_l P_l) / tr(G_l), from the grams G_l [L+1, H, H], or with `rows` from the rows
    W_l [L+1, n, H] of G_l = W_lᵀ W_l as ‖W_l P_l‖²_F / ‖W_l‖²_F. Where it is low, no shared
    basis of this order carries the individual prompts' ∂y/∂x_l, and per-prompt gains of early
    injections depend on what the basis leaves out (docs/results.md, "the early layers")."""
    P = P.to(torch.float64)
    if rows:
        held = torch.einsum("lnh,lhd->lnd", obs, P).pow(2).sum((-2, -1))
        total = obs.pow(2).sum((-2, -1))
    else:
        held = torch.einsum("lhd,lhg,lgd->l", P, obs, P)
        total = torch.diagonal(obs, dim1=-2, dim2=-1).sum(-1)
    return held / total.clamp_min(1e-300)


def _e1(b: int, d: int, dtype) -> torch.Tensor:
    e = torch.zeros(b, d, 1, dtype=dtype)
    e[:, 0, 0] = 1.0
    return e


__all__ = [
    "adjoint_captured",
    "fit_core",
    "identify",
    "identity_reduce",
    "observability_grams",
    "observability_stats",
    "state_gradients",
]
