"""Prompts -> token ids -> the last token's residual trajectory x_0..x_L.

Batches are padded on the RIGHT and run without an attention mask: in a causal decoder a real
token never attends to a later (padding) position, so every real token's activations equal
those of the unpadded run. Each prompt's state is read at its own last real token. Prompts are
sorted by length before batching so padding stays small.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from . import backend
from .backend import Model, check_model
from .errors import InputError, NonFiniteError, ShapeError
from .hooks import resid_post_name, resid_pre_name
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


def state_hook_names(n_layers: int) -> list[str]:
    """Hook names of x_0..x_L: resid_pre of every block, then the last block's resid_post."""
    return [resid_pre_name(l) for l in range(n_layers)] + [resid_post_name(n_layers - 1)]


@dataclass(frozen=True)
class Trajectory:
    """Last-token residual trajectory of a set of prompts.

    Attributes:
        states: Float[n, L+1, H], x_l at the last real token: `blocks.{l}.hook_resid_pre` for
            l = 0..L-1 and `blocks.{L-1}.hook_resid_post` for l = L.
        lengths: Int[n], tokens per prompt.
    """

    states: Float[torch.Tensor, "n Lp1 H"]
    lengths: Int[torch.Tensor, " n"]

    @property
    def norms(self) -> Float[torch.Tensor, "n Lp1"]:
        """‖x_l‖ per prompt and layer."""
        return self.states.norm(dim=-1)

    @property
    def n_layers(self) -> int:
        return self.states.shape[1] - 1

    def __len__(self) -> int:
        return self.states.shape[0]


def capture(
    model: Model,
    prompts: PromptsLike,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> Trajectory:
    """Run the prompts and keep only the last real token's residual at every layer.

    Only the L+1 needed hook points are read, and only one position of each, so memory is
    O(n · L · H) whatever the prompt lengths.
    """
    check_model(model)
    ids = tokenize(model, prompts)
    L, H = model.cfg.n_layers, model.cfg.d_model
    states = torch.empty(len(ids), L + 1, H, dtype=model.cfg.dtype)
    names = state_hook_names(L)
    engine = backend.get(model)
    for batch in tqdm(
        list(
            iter_batches(
                ids,
                batch_size,
                pad=pad_id(model),
                device=model.cfg.device,
            )
        ),
        desc="capture",
        disable=not progress,
        leave=False,
    ):
        rows = torch.arange(len(batch.index), device=batch.tokens.device)
        last = batch.lengths - 1
        got: dict[int, torch.Tensor] = {}

        def make(j: int, got=got, rows=rows, last=last):
            def hook(resid: torch.Tensor, hook) -> None:
                got[j] = resid[rows, last].detach().to("cpu")

            return hook

        with torch.no_grad():
            engine.run_with_hooks(
                model,
                batch.tokens,
                [(name, make(j)) for j, name in enumerate(names)],
                return_type=None,
            )
        states[batch.index] = torch.stack([got[j] for j in range(L + 1)], dim=1).to(states)
    if not torch.isfinite(states).all():
        bad = (~torch.isfinite(states)).any(-1).any(0).nonzero().flatten().tolist()
        raise NonFiniteError(f"capture: non-finite residual states at layers {bad}")
    return Trajectory(states=states, lengths=torch.tensor([len(i) for i in ids]))


__all__ = ["capture", "Trajectory", "tokenize", "iter_batches", "Batch", "state_hook_names"]
