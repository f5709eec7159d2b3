"""Full-model ground truth for the per-layer gains: scans, exact first-order gains, cross-gains.

The kernels work on one `FrozenContext` (one batch): `per_prompt_gains` (exact gains from one
backward pass) and `scan_context` (±eps injections on the single-token path); `scan_gains`,
`exact_gains` and `cross_gains` run them over a prompt set.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from . import backend
from .backend import Model, check_model
from .directions import ConceptDirections
from .errors import InputError, ModelTypeError, NonFiniteError
from .frozen import FrozenContext, compute_dtype, iter_contexts
from .hooks import check_layer, inject, resid_post_name
from .readouts import Readout, make_readout
from .trajectory import PromptsLike, iter_batches, pad_id, tokenize
from .validate import check_directions

METHODS = ("cached", "hooks")


def _layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, torch.Tensor) and layers.ndim == 1:
        layers = layers.tolist()
    if isinstance(layers, str) or not isinstance(layers, Sequence | range):
        raise InputError(f"layers: expected a list of layer indices, got {layers!r}")
    out = [check_layer(layer, n_layers) for layer in layers]
    if not out:
        raise InputError("layers: expected at least one layer, got an empty list")
    return out


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


def per_prompt_gains(
    ctx: FrozenContext,
    b: Float[torch.Tensor, "L H"],
    readout: Readout,
) -> Float[torch.Tensor, "b L"]:
    """Exact first-order gains ∂y(p)/∂u_l = ⟨∂y(p)/∂x_l, b_l⟩ for every layer at once, from
    the one backward pass of `state_gradients` (u_l enters as x_l + u_l b_l)."""
    W = state_gradients(ctx, readout)
    return torch.einsum("blh,lh->bl", W, b.to(W))


def scan_context(
    ctx: FrozenContext,
    b: Float[torch.Tensor, "L H"],
    readout: Readout,
    eps: float,
    layers: Sequence[int],
) -> Float[torch.Tensor, "b nl 2"]:
    """Full-model readouts with ±eps·b_l injected at each listed layer (single-token path).

    All perturbed trajectories alive at block m are pushed through f_m together (vmapped), so
    injecting at layer l costs L - l single-token block passes.
    """
    model = ctx.model
    L = ctx.n_layers
    layers = list(layers)
    z = ctx.states[:, :0]  # [b, 0, H] perturbed states alive so far
    order: list[int] = []
    with torch.no_grad():
        for m in range(L):
            if m in layers:
                x = ctx.states[:, m]
                bm = b[m].to(x)
                new = torch.stack([x + eps * bm, x - eps * bm], dim=1)
                z = torch.cat([z, new], dim=1)
                order.append(m)
            if z.shape[1]:
                z = ctx.block_many(m, z)
        y = readout(model, z)  # [b, 2 * nl]
    y = y.reshape(len(ctx), len(order), 2)
    perm = [order.index(l) for l in layers]
    return y[:, perm]


def scan_gains(
    model: Model,
    prompts: PromptsLike,
    directions: ConceptDirections,
    *,
    eps: float = 0.1,
    readout: str | Readout = "concept",
    method: str = "cached",
    layers: Sequence[int] | None = None,
    label_words: Sequence[str] | Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    engine: str = "auto",
) -> Float[torch.Tensor, " L"]:
    """Measured gains g_l: inject ±eps·scale_l·unit_l at layer l alone on the full model,
    central difference of the mean readout over the prompts.

    method="cached": the frozen-context single-token path (exact for a causal decoder; an
    injection at layer l costs L - l single-token block passes). method="hooks": the brute force
    the paper replaces, TransformerLens hooks and one full forward per layer and sign.
    engine: the frozen-context engine of method="cached" ("auto", "fast" or "tl"; see
    `steerlin.frozen`).

    Returns float64 gains for `layers` (default all L).
    """
    check_model(model)
    check_directions("directions", directions).check_for(model)
    real = isinstance(eps, numbers.Real) and not isinstance(eps, bool)
    real = real or (isinstance(eps, torch.Tensor) and eps.numel() == 1 and eps.is_floating_point())
    if not (real and math.isfinite(float(eps)) and float(eps) > 0):
        raise InputError(f"eps: expected a positive step, got {eps!r}")
    eps = float(eps)
    if method not in METHODS:
        raise InputError(f"method: expected one of {METHODS}, got {method!r}")
    L = model.cfg.n_layers
    layers = _layers(layers, L)
    rd = make_readout(model, readout, directions.unit[-1], label_words=label_words)
    b = directions.b[:L].to(device=model.cfg.device, dtype=compute_dtype(model))
    total = torch.zeros(len(layers), 2, dtype=torch.float64)
    n = 0
    if method == "cached":
        for ctx in iter_contexts(
            model, prompts, batch_size=batch_size, progress=progress and "scan", engine=engine
        ):
            y = scan_context(ctx, b, rd, eps, layers)  # [b, nl, 2]
            total += y.to("cpu", torch.float64).sum(0)
            n += len(ctx)
    else:
        ids = tokenize(model, prompts)
        batches = list(iter_batches(ids, batch_size, pad=pad_id(model), device=model.cfg.device))
        name = resid_post_name(L - 1)
        engine = backend.get(model)
        steps = [(bt, j, s) for bt in batches for j in range(len(layers)) for s in (0, 1)]
        for bt, j, s in tqdm(steps, desc="hook scan", disable=not progress, leave=False):
            sign = 1.0 if s == 0 else -1.0
            rows = torch.arange(len(bt.index), device=bt.tokens.device)
            got = {}
            with (
                torch.no_grad(),
                inject(
                    model,
                    {layers[j]: sign * eps * b[layers[j]]},
                    positions="last",
                    lengths=bt.lengths,
                ),
            ):
                engine.run_with_hooks(
                    model,
                    bt.tokens,
                    return_type=None,
                    fwd_hooks=[
                        (name, lambda r, hook: got.__setitem__("x", r[rows, bt.lengths - 1]))
                    ],
                )
            total[j, s] += rd(model, got["x"]).to("cpu", torch.float64).sum()
        n = len(ids)
    mean = total / n
    g = (mean[:, 0] - mean[:, 1]) / (2 * eps)
    if not torch.isfinite(g).all():
        bad = [layers[i] for i in (~torch.isfinite(g)).nonzero().flatten().tolist()]
        raise NonFiniteError(f"scan_gains: non-finite readout at layers {bad}")
    return g


def exact_gains(
    model: Model,
    prompts: PromptsLike,
    directions: ConceptDirections,
    *,
    readout: str | Readout = "concept",
    label_words: Sequence[str] | Sequence[int] | None = None,
    batch_size: int = 16,
    per_prompt: bool = False,
    progress: bool = False,
    engine: str = "auto",
) -> torch.Tensor:
    """Exact first-order gains ∂ȳ/∂u_l for all layers from ONE backward pass per batch.

    Returns Float[L] (mean over prompts), or Float[n, L] in prompt order with per_prompt=True.
    engine: the frozen-context engine ("auto", "fast" or "tl"; see `steerlin.frozen`).
    """
    check_model(model)
    check_directions("directions", directions).check_for(model)
    L = model.cfg.n_layers
    rd = make_readout(model, readout, directions.unit[-1], label_words=label_words)
    b = directions.b[:L].to(device=model.cfg.device, dtype=compute_dtype(model))
    rows: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    contexts = iter_contexts(
        model, prompts, batch_size=batch_size, progress=progress and "exact", engine=engine
    )
    for ctx in contexts:
        rows.append(per_prompt_gains(ctx, b, rd).to("cpu", torch.float64))
        index.append(ctx.index)
    g = torch.cat(rows)
    g = g[torch.argsort(torch.cat(index))]
    return g if per_prompt else g.mean(0)


def cross_gains(
    model: Model,
    prompts: PromptsLike,
    directions: Sequence[ConceptDirections],
    *,
    batch_size: int = 16,
    engine: str = "auto",
) -> Float[torch.Tensor, "k k L"]:
    """Exact first-order gain tensor G[i, j, l] = ∂<unit^i_L, x_L>/∂u_{j,l} (one backward per
    concept and batch): the measured coupling for a multi-concept Controller."""
    if isinstance(directions, str) or not isinstance(directions, Sequence):
        raise ModelTypeError(
            f"directions: expected a list of ConceptDirections, got {type(directions).__name__}"
        )
    for i, di in enumerate(directions):
        check_directions(f"directions[{i}]", di)
    k = len(directions)
    L = model.cfg.n_layers
    G = torch.zeros(k, k, L, dtype=torch.float64)
    for i, di in enumerate(directions):
        rd = make_readout(model, "concept", di.unit[-1])
        for j, dj in enumerate(directions):
            G[i, j] = exact_gains(
                model, prompts, dj, readout=rd, batch_size=batch_size, engine=engine
            )
    return G


__all__ = [
    "METHODS",
    "cross_gains",
    "exact_gains",
    "per_prompt_gains",
    "scan_context",
    "state_gradients",
    "scan_gains",
]
