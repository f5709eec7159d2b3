"""Prompts -> token ids -> right-padded batches (no model run).

Batches are padded on the RIGHT and run without an attention mask: in a causal decoder a real
token never attends to a later (padding) position, so every real token's activations equal
those of the unpadded run. Prompts are sorted by length before batching so padding stays small.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int

from .backend import Model, check_model
from .errors import InputError, ShapeError
from .validate import check_int

PromptsLike = Sequence[str] | Sequence[Sequence[int]] | torch.Tensor


def tokenize(model: Model, prompts: PromptsLike) -> list[list[int]]:
    """Token ids for each prompt.

    Strings go through the model's tokenizer with its BOS convention (`model.to_tokens`);
    sequences of ints are used exactly as given (tiny test models have no tokenizer).
    """
    check_model(model)
    if isinstance(prompts, torch.Tensor):
        if prompts.ndim != 2:
            raise ShapeError(f"prompts: expected a [n, pos] token tensor, got {prompts.shape}")
        prompts = prompts.tolist()
    if isinstance(prompts, str):
        raise InputError("prompts: expected a list of prompts, got a single string; use [text]")
    try:
        prompts = list(prompts)
    except TypeError:
        raise InputError(
            f"prompts: expected a list of prompts (texts or token-id lists), got "
            f"{type(prompts).__name__}"
        ) from None
    if not prompts:
        raise InputError("prompts: expected at least one prompt, got an empty list")
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise InputError(
                    "prompts: got strings but the model has no tokenizer; pass token ids"
                )
            ids = model.to_tokens(p, truncate=False)[0].tolist()
        else:
            try:
                raw = p.tolist() if isinstance(p, torch.Tensor) else list(p)
            except TypeError:
                raise InputError(
                    f"prompts[{i}]: expected a text or a list of token ids, got {type(p).__name__}"
                ) from None
            if not all(hasattr(t, "__index__") and not isinstance(t, bool) for t in raw):
                raise InputError(f"prompts[{i}]: token ids must be integers")
            ids = [t.__index__() for t in raw]
            if any(t < 0 or t >= model.cfg.d_vocab for t in ids):
                raise InputError(f"prompts[{i}]: token ids must lie in 0..{model.cfg.d_vocab - 1}")
        if not ids:
            raise InputError(f"prompts[{i}]: empty prompt (no tokens)")
        if len(ids) > model.cfg.n_ctx:
            raise InputError(
                f"prompts[{i}]: {len(ids)} tokens is longer than the model's context "
                f"n_ctx={model.cfg.n_ctx}; shorten or truncate it"
            )
        out.append(ids)
    return out


def pad_id(model: Model) -> int:
    """Token used for right padding (never attended to by real tokens)."""
    tok = model.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return 0


@dataclass(frozen=True)
class Batch:
    """One right-padded batch: `index` maps its rows back to the caller's prompt order."""

    index: Int[torch.Tensor, " b"]
    tokens: Int[torch.Tensor, "b T"]
    lengths: Int[torch.Tensor, " b"]


def iter_batches(
    ids: list[list[int]],
    batch_size: int,
    *,
    pad: int = 0,
    device: str | torch.device = "cpu",
) -> Iterator[Batch]:
    """Right-padded batches of prompts sorted by length (longest first)."""
    batch_size = check_int("batch_size", batch_size, min=1)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        T = len(ids[chunk[0]])
        tokens = torch.full((len(chunk), T), pad, dtype=torch.long)
        for r, i in enumerate(chunk):
            tokens[r, : len(ids[i])] = torch.tensor(ids[i])
        lengths = torch.tensor([len(ids[i]) for i in chunk])
        yield Batch(torch.tensor(chunk), tokens.to(device), lengths.to(device))


__all__ = ["PromptsLike", "tokenize", "pad_id", "Batch", "iter_batches"]
