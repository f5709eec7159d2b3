"""What both backends share: the installed TransformerLens line, the right-aligned context
mask, and the error for a model no backend accepts."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from ..errors import ModelTypeError


@lru_cache(maxsize=1)
def tl_major() -> int:
    """Major version of the installed TransformerLens (3: HookedTransformer, 4: the bridge)."""
    try:
        return int(version("transformer-lens").split(".")[0])
    except (PackageNotFoundError, ValueError):  # a source checkout without metadata
        import transformer_lens

        return 4 if not hasattr(transformer_lens, "HookedTransformerConfig") else 3


def context_mask(T: int, lengths: torch.Tensor) -> torch.Tensor:
    """Int[b, T+1]: 1 on each prompt's context right-aligned to end at index T-1 (its first
    len-1 tokens) and on the appended last token at index T, 0 on the left padding.

    The layout of `KVContext.mask` for every backend; `mask.sum(1)` is each prompt's length."""
    b = lengths.shape[0]
    dev = lengths.device
    shift = T - (lengths - 1)
    pos = torch.arange(T, device=dev)
    ctx = (pos[None, :] >= shift[:, None]).long()
    return torch.cat([ctx, torch.ones(b, 1, dtype=torch.long, device=dev)], dim=1)


def reject(model: Any) -> ModelTypeError:
    """The error for a model no backend accepts, saying what came and what to do."""
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    want = (
        "a transformer_lens.HookedTransformer"
        if tl_major() < 4
        else "a transformer_lens.model_bridge.TransformerBridge"
    )
    hint = ""
    if isinstance(model, (str, os.PathLike)):
        hint = f"; to load a model by name use steerlin.load_model({str(model)!r})"
    elif type(model).__name__ == "TransformerBridge" and tl_major() < 4:
        hint = (
            "; steerlin drives TransformerBridge with TransformerLens 4 (pip install "
            "'steerlin[tl4]'); with TransformerLens 3 load a HookedTransformer instead"
        )
    elif type(model).__name__ == "HookedTransformer" and tl_major() >= 4:
        hint = "; TransformerLens 4 removed HookedTransformer, use TransformerBridge"
    return ModelTypeError(f"model: expected {want}, got {kind}{hint}")


@contextmanager
def block_pre_hooks(model: Any, layers: Sequence[int], make: Callable[[int], Callable]) -> Iterator:
    """Forward pre-hooks `make(layer)` (with kwargs) on `model.blocks[layer]`, removed on exit
    and on any exception (the backends' position probes)."""
    handles = []
    try:
        for layer in layers:
            handles.append(
                model.blocks[layer].register_forward_pre_hook(make(layer), with_kwargs=True)
            )
        yield
    finally:
        for h in handles:
            h.remove()


def greedy_generate(model: Any, prompts: Sequence[str], max_new_tokens: int, *, tokens: bool):
    """TransformerLens's own greedy generation with its KV cache, left-padded batches (both
    lines take the same arguments): texts, or with `tokens` the ids [b, T + new] (no stop at
    EOS, so every row has the same length)."""
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        verbose=False,
        use_past_kv_cache=True,
        padding_side="left",
    )
    if tokens:
        return model.generate(list(prompts), stop_at_eos=False, return_type="tokens", **kwargs)
    texts = model.generate(list(prompts), **kwargs)
    return [texts] if isinstance(texts, str) else list(texts)


__all__ = ["block_pre_hooks", "greedy_generate", "context_mask", "reject", "tl_major"]
