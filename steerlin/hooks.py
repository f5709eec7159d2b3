"""Live hooks on a HookedTransformer: add vectors to the residual stream, as context managers.

Every hook here returns a new tensor (never writes in place, so it is safe under autograd and
`torch.func`) and is registered through TransformerLens's own `model.hooks()` context, which
tags hooks with a context level: nested `with` blocks remove only their own hooks, and the
hooks are removed on exit and on any exception, KeyboardInterrupt included.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from transformer_lens import HookedTransformer

from .errors import InputError, LayerError, ModelTypeError, NonFiniteError, ShapeError
from .models import check_model

Positions = Literal["last", "all", "generated"]
POSITIONS = ("last", "all", "generated")


def resid_pre_name(layer: int) -> str:
    """Hook name of the residual stream entering block `layer`."""
    return f"blocks.{layer}.hook_resid_pre"


def check_layer(layer, n_layers: int, *, what: str = "layer", allow_final: bool = False) -> int:
    """Validate a block index (0..n_layers-1, or ..n_layers for states when allow_final)."""
    top = n_layers if allow_final else n_layers - 1
    if isinstance(layer, bool) or not hasattr(layer, "__index__"):
        raise LayerError(f"{what}: expected an int in 0..{top}, got {type(layer).__name__}")
    layer = layer.__index__()
    if not 0 <= layer <= top:
        raise LayerError(
            f"{what}: expected a layer index in 0..{top} (the model has {n_layers} blocks), "
            f"got {layer}"
        )
    return layer


def check_vector(vec, d_model: int, *, what: str, batched: bool = False) -> torch.Tensor:
    """Validate a direction: a finite tensor of shape [d_model] (or [n, d_model] if batched)."""
    vec = torch.as_tensor(vec)
    ok = vec.ndim == 1 or (batched and vec.ndim == 2)
    if not ok or vec.shape[-1] != d_model:
        want = f"[{d_model}]" + (f" or [n, {d_model}]" if batched else "")
        raise ShapeError(f"{what}: expected a vector of shape {want}, got {tuple(vec.shape)}")
    if not torch.isfinite(vec).all():
        raise NonFiniteError(f"{what}: contains NaN or inf")
    return vec


@dataclass
class _GenerationState:
    """Tracks the prompt across the forwards of one generation (positions="generated")."""

    prompt_len: int | None = None
    total: int = 0

    def positions_for(self, seq_len: int) -> slice:
        """Positions to steer in a forward over `seq_len` tokens.

        A KV-cached generation step is a one-token forward: steer it. An uncached step is a
        forward over everything so far plus one token: steer from the last prompt token on.
        Anything else starts a new prompt: steer its last token. (A new prompt exactly one
        token longer than everything processed so far looks like an uncached step: call
        `Injection.reset()` between generations to be sure.)
        """
        if self.prompt_len is not None and seq_len == 1:
            self.total += 1
            return slice(0, 1)
        if self.prompt_len is not None and seq_len == self.total + 1:
            self.total = seq_len
            return slice(self.prompt_len - 1, seq_len)
        self.prompt_len = self.total = seq_len
        return slice(seq_len - 1, seq_len)


class Injection:
    """Handle yielded by `inject`: the hooks' bookkeeping. `reset()` forgets the prompt length."""

    def __init__(self, positions: str, lengths: torch.Tensor | None) -> None:
        self.positions = positions
        self.lengths = lengths
        self._gen = _GenerationState()
        self._first_layer: int | None = None

    def reset(self) -> None:
        """Start a new generation: the next forward is taken as a new prompt."""
        self._gen = _GenerationState()

    def _mask(self, resid: torch.Tensor, layer: int) -> torch.Tensor:
        """[batch, pos, 1] 0/1 mask of the positions that receive the addition."""
        batch, seq, _ = resid.shape
        mask = torch.zeros(batch, seq, 1, dtype=resid.dtype, device=resid.device)
        if self.positions == "all":
            return mask + 1
        if self.positions == "last":
            if self.lengths is None:
                mask[:, -1] = 1
            else:
                if self.lengths.shape[0] != batch:
                    raise ShapeError(
                        f"lengths: expected {batch} entries (the batch), got "
                        f"{self.lengths.shape[0]}"
                    )
                idx = (self.lengths.to(resid.device) - 1).clamp(0, seq - 1)
                mask[torch.arange(batch, device=resid.device), idx] = 1
            return mask
        # generated: one state update per forward, made by the earliest hooked layer
        if self._first_layer is None or layer == self._first_layer:
            self._cur = self._gen.positions_for(seq)
        mask[:, self._cur] = 1
        return mask


@contextmanager
def inject(
    model: HookedTransformer,
    additions: Mapping[int, torch.Tensor],
    *,
    positions: Positions = "last",
    lengths: Sequence[int] | torch.Tensor | None = None,
) -> Iterator[Injection]:
    """Add `additions[l]` to `blocks.{l}.hook_resid_pre` while the context is open.

    Args:
        model: the model to steer.
        additions: layer -> vector Float[d_model] (same for every sequence) or
            Float[batch, d_model] (one per sequence of the batch that will run).
        positions: "last" (each sequence's last real token: position `lengths-1` when
            `lengths` is given for a right-padded batch, else the last position, which is right
            for unpadded and left-padded batches), "all", or "generated" (the last prompt token
            and every token generated after it; `model.generate` gives identical tokens with
            `use_past_kv_cache=True` and `False`).
        lengths: real lengths of a right-padded batch, for positions="last".

    Yields:
        An `Injection` handle (`reset()` before reusing one context for a second generation
        with the KV cache off).
    """
    check_model(model)
    if positions not in POSITIONS:
        raise InputError(f"positions: expected one of {POSITIONS}, got {positions!r}")
    if not isinstance(additions, Mapping):
        raise ModelTypeError(
            f"additions: expected a mapping layer -> vector, got {type(additions).__name__}"
        )
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    checked: dict[int, torch.Tensor] = {}
    for layer, vec in additions.items():
        layer = check_layer(layer, n_layers, what="additions layer")
        vec = check_vector(vec, d_model, what=f"additions[{layer}]", batched=True)
        checked[layer] = vec
    len_t = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
    handle = Injection(positions, len_t)
    handle._first_layer = min(checked) if checked else None

    def make_hook(layer: int, vec: torch.Tensor):
        def hook(resid: torch.Tensor, hook) -> torch.Tensor:
            v = vec.to(device=resid.device, dtype=resid.dtype)
            if v.ndim == 2:
                if v.shape[0] != resid.shape[0]:
                    raise ShapeError(
                        f"additions[{layer}]: {v.shape[0]} per-sequence vectors for a batch "
                        f"of {resid.shape[0]}"
                    )
                v = v[:, None, :]
            return resid + handle._mask(resid, layer) * v

        return hook

    fwd_hooks = [(resid_pre_name(l), make_hook(l, v)) for l, v in sorted(checked.items())]
    with model.hooks(fwd_hooks=fwd_hooks):
        yield handle


def count_hooks(model: HookedTransformer) -> int:
    """Number of live forward/backward hooks on every hook point of `model` (0 when clean)."""
    total = 0
    for hp in model.hook_dict.values():
        total += len(hp._forward_hooks) + len(hp._backward_hooks)
        total += len(getattr(hp, "fwd_hooks", [])) + len(getattr(hp, "bwd_hooks", []))
    return total


__all__ = ["inject", "Injection", "count_hooks", "resid_pre_name", "check_model", "POSITIONS"]
