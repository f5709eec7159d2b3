"""Full-model ground truth: gain scans, exact first-order gains, fidelity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .directions import ConceptDirections
from .errors import InputError, NonFiniteError
from .hooks import check_layer, check_model, inject
from .jacobians import Readout, iter_contexts, make_readout, per_prompt_gains, scan_context
from .trajectory import PromptsLike, iter_batches, pad_id, tokenize

METHODS = ("cached", "hooks")


def _layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    out = [check_layer(layer, n_layers) for layer in layers]
    if not out:
        raise InputError("layers: expected at least one layer, got an empty list")
    return out


def scan_gains(
    model: HookedTransformer,
    prompts: PromptsLike,
    directions: ConceptDirections,
    *,
    eps: float = 0.1,
    readout: str | Readout = "concept",
    method: str = "cached",
    layers: Sequence[int] | None = None,
    label_words: Sequence[str] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> Float[torch.Tensor, " L"]:
    """Measured gains g_l: inject ±eps·scale_l·unit_l at layer l alone on the full model,
    central difference of the mean readout over the prompts.

    method="cached": the frozen-context single-token path (exact for a causal decoder; an
    injection at layer l costs L - l single-token block passes). method="hooks": the brute force
    the paper replaces, TransformerLens hooks and one full forward per layer and sign.

    Returns float64 gains for `layers` (default all L).
    """
    check_model(model)
    directions.check_for(model)
    if not eps > 0:
        raise InputError(f"eps: expected a positive step, got {eps}")
    if method not in METHODS:
        raise InputError(f"method: expected one of {METHODS}, got {method!r}")
    L = model.cfg.n_layers
    layers = _layers(layers, L)
    rd = make_readout(model, readout, directions.unit[-1], label_words=label_words)
    b = directions.b[:L].to(model.cfg.dtype)
    total = torch.zeros(len(layers), 2, dtype=torch.float64)
    n = 0
    if method == "cached":
        for ctx in iter_contexts(
            model, prompts, batch_size=batch_size, progress=progress and "scan"
        ):
            y = scan_context(ctx, b, rd, eps, layers)  # [b, nl, 2]
            total += y.to(torch.float64).sum(0)
            n += len(ctx)
    else:
        ids = tokenize(model, prompts)
        batches = list(iter_batches(ids, batch_size, pad=pad_id(model), device=model.cfg.device))
        name = f"blocks.{L - 1}.hook_resid_post"
        steps = [(bt, j, s) for bt in batches for j in range(len(layers)) for s in (0, 1)]
        for bt, j, s in tqdm(steps, desc="hook scan", disable=not progress, leave=False):
            sign = 1.0 if s == 0 else -1.0
            rows = torch.arange(len(bt.index))
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
                model.run_with_hooks(
                    bt.tokens,
                    return_type=None,
                    fwd_hooks=[
                        (name, lambda r, hook: got.setdefault("x", r[rows, bt.lengths - 1]))
                    ],
                )
            total[j, s] += rd(model, got["x"]).to(torch.float64).sum()
        n = len(ids)
    mean = total / n
    g = (mean[:, 0] - mean[:, 1]) / (2 * eps)
    if not torch.isfinite(g).all():
        bad = [layers[i] for i in (~torch.isfinite(g)).nonzero().flatten().tolist()]
        raise NonFiniteError(f"scan_gains: non-finite readout at layers {bad}")
    return g


def exact_gains(
    model: HookedTransformer,
    prompts: PromptsLike,
    directions: ConceptDirections,
    *,
    readout: str | Readout = "concept",
    label_words: Sequence[str] | None = None,
    batch_size: int = 16,
    per_prompt: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Exact first-order gains ∂ȳ/∂u_l for all layers from ONE backward pass per batch.

    Returns Float[L] (mean over prompts), or Float[n, L] in prompt order with per_prompt=True.
    """
    check_model(model)
    directions.check_for(model)
    L = model.cfg.n_layers
    rd = make_readout(model, readout, directions.unit[-1], label_words=label_words)
    b = directions.b[:L].to(model.cfg.dtype)
    rows: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    for ctx in iter_contexts(model, prompts, batch_size=batch_size, progress=progress and "exact"):
        rows.append(per_prompt_gains(ctx, b, rd).to(torch.float64))
        index.append(ctx.index)
    g = torch.cat(rows)
    g = g[torch.argsort(torch.cat(index))]
    return g if per_prompt else g.mean(0)


@dataclass(frozen=True)
class Fidelity:
    """Agreement of predicted and measured gains across layers."""

    spearman: float
    pearson: float

    def __str__(self) -> str:
        return f"Spearman {self.spearman:.3f}, Pearson {self.pearson:.3f}"


def fidelity(predicted, measured) -> Fidelity:
    """Spearman and Pearson correlation (scipy.stats) of two per-layer gain curves."""
    p = np.asarray(torch.as_tensor(predicted, dtype=torch.float64))
    m = np.asarray(torch.as_tensor(measured, dtype=torch.float64))
    if p.shape != m.shape or p.ndim != 1:
        raise InputError(f"fidelity: expected two equal-length curves, got {p.shape}, {m.shape}")
    if p.shape[0] < 3:
        raise InputError(f"fidelity: need at least 3 layers to correlate, got {p.shape[0]}")
    if not (np.isfinite(p).all() and np.isfinite(m).all()):
        raise NonFiniteError("fidelity: non-finite gains")
    return Fidelity(
        spearman=float(scipy.stats.spearmanr(p, m).statistic),
        pearson=float(scipy.stats.pearsonr(p, m).statistic),
    )


__all__ = ["scan_gains", "exact_gains", "fidelity", "Fidelity"]
