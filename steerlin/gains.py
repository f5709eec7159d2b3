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

from .backend import Model, check_model
from .directions import ConceptDirections
from .errors import InputError, ModelTypeError, NonFiniteError
from .frozen import FrozenContext, compute_dtype, iter_contexts
from .hooks import check_layer
from .identify import state_gradients
from .measure import check_method, last_token_states
from .readouts import Readout, make_readout
from .tokens import PromptsLike, iter_batches, pad_id, tokenize
from .validate import check_directions


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
    check_method(method)
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
        steps = [(bt, j, s) for bt in batches for j in range(len(layers)) for s in (0, 1)]
        for bt, j, s in tqdm(steps, desc="hook scan", disable=not progress, leave=False):
            vec = torch.zeros_like(b)
            vec[layers[j]] = (1.0 if s == 0 else -1.0) * eps * b[layers[j]]
            x = last_token_states(model, bt, vectors=vec)[:, 0]
            total[j, s] += rd(model, x).to("cpu", torch.float64).sum()
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
    "cross_gains",
    "exact_gains",
    "per_prompt_gains",
    "scan_context",
    "scan_gains",
]
