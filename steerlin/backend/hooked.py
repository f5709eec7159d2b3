"""The TransformerLens 3 backend: `HookedTransformer`.

The frozen single-token block is TransformerLens's own block called with a frozen
`TransformerLensKeyValueCacheEntry` (its `past_kv_cache_entry` path), so rotary embeddings, q/k
norms, pre/post norms, GQA and local/global attention are all the block's own. The context is
one full forward of a right-padded batch with a `TransformerLensKeyValueCache`; its keys/values
are then right-aligned and masked, so the appended last token sits at index T and cache-index
distances equal true token distances for every prompt of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.utilities.activation_functions import apply_softcap

from . import Backend, KVContext
from .common import block_pre_hooks, context_mask, greedy_generate


class HookedBackend(Backend):
    """`transformer_lens.HookedTransformer` (TransformerLens 3.x)."""

    name = "hooked"

    def accepts(self, model: Any) -> bool:
        return isinstance(model, HookedTransformer)

    def build_context(
        self,
        model: HookedTransformer,
        tokens: Int[torch.Tensor, "b T"],
        lengths: Int[torch.Tensor, " b"],
        hook_names: Sequence[str],
    ) -> KVContext:
        """One full forward of a right-padded batch, keeping the K/V cache and last-token states."""
        cfg = model.cfg
        b, T = tokens.shape
        cache = TransformerLensKeyValueCache.init_cache(cfg, cfg.device, b)
        rows = torch.arange(b, device=tokens.device)
        last = lengths.to(tokens.device) - 1
        got: dict[int, torch.Tensor] = {}

        def make(j: int):
            def hook(resid: torch.Tensor, hook) -> None:
                got[j] = resid[rows, last].detach()

            return hook

        with torch.no_grad():
            model.run_with_hooks(
                tokens,
                return_type=None,
                attention_mask=torch.ones_like(tokens),
                past_kv_cache=cache,
                fwd_hooks=[(n, make(j)) for j, n in enumerate(hook_names)],
            )
        states = torch.stack([got[j] for j in range(len(hook_names))], dim=1)
        align, mask = _alignment(T, lengths.to(tokens.device))
        keys = tuple(align(e.past_keys) for e in cache.entries)
        values = tuple(align(e.past_values) for e in cache.entries)
        return KVContext(states, keys, values, mask)

    def embed(self, model: HookedTransformer, tokens: Int[torch.Tensor, "b T"]) -> torch.Tensor:
        """x_0 at every position of a right-padded batch: the residual entering block 0."""
        with torch.no_grad():
            return model(tokens, attention_mask=torch.ones_like(tokens), stop_at_layer=0)

    def block_context(
        self,
        model: HookedTransformer,
        layer: int,
        resid: Float[torch.Tensor, "b T H"],
        lengths: Int[torch.Tensor, " b"],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block `layer` over a whole right-padded batch from its input residual: the output
        residual [b, T, H] and this block's right-aligned keys, values and mask (as
        `build_context` gives them for every block from one forward)."""
        b, T, _ = resid.shape
        entry = TransformerLensKeyValueCacheEntry.init_cache_entry(model.cfg, resid.device, b)
        ones = torch.ones(b, T, dtype=torch.long, device=resid.device)
        with torch.no_grad():
            out = model.blocks[layer](resid, past_kv_cache_entry=entry, attention_mask=ones)
        align, mask = _alignment(T, lengths.to(resid.device))
        return out, align(entry.past_keys), align(entry.past_values), mask

    def block(
        self,
        model: HookedTransformer,
        layer: int,
        x: Float[torch.Tensor, "n H"],
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: Int[torch.Tensor, "n Tp1"],
    ) -> Float[torch.Tensor, "n H"]:
        entry = TransformerLensKeyValueCacheEntry(keys, values, frozen=True)
        out = model.blocks[layer](x[:, None, :], past_kv_cache_entry=entry, attention_mask=mask)
        return out[:, 0, :]

    def logits(
        self,
        model: HookedTransformer,
        x: Float[torch.Tensor, "... H"],
        tokens: Sequence[int] | None,
    ) -> Float[torch.Tensor, "... k"]:
        cols = slice(None) if tokens is None else list(tokens)
        resid = model.ln_final(x[..., None, :])[..., 0, :] if model.cfg.normalization_type else x
        logits = resid @ model.unembed.W_U[:, cols] + model.unembed.b_U[cols]
        return apply_softcap(logits, model.cfg.output_logits_soft_cap)

    def hooks(self, model: HookedTransformer, fwd_hooks) -> AbstractContextManager:
        return model.hooks(fwd_hooks=fwd_hooks)

    def run_with_hooks(self, model: HookedTransformer, tokens, fwd_hooks, **kwargs) -> Any:
        # steerlin's batches are right-padded: no real token attends to the padding after it,
        # so the mask is all ones. Passing it explicitly keeps TransformerLens from deriving
        # one from the tokenizer's padding side (a user's left-padding tokenizer would shift
        # the positions of prompts that start with the pad id).
        kwargs.setdefault("attention_mask", torch.ones_like(tokens))
        return model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, **kwargs)

    @contextmanager
    def position_probe(self, model: HookedTransformer, layers: Sequence[int], record):
        """Forward pre-hooks on the blocks: TransformerLens passes each block its
        `past_kv_cache_entry` (keyword in `forward` and `generate`, third positional in a
        direct call), whose `past_keys` hold the positions already cached."""

        def make(layer: int):
            def pre_hook(module, args, kwargs):
                entry = kwargs.get("past_kv_cache_entry")
                if entry is None and len(args) > 2:
                    entry = args[2]
                record(layer, None if entry is None else int(entry.past_keys.shape[1]))

            return pre_hook

        with block_pre_hooks(model, layers, make):
            yield

    def count_hooks(self, model: HookedTransformer) -> int:
        total = sum(len(b._forward_pre_hooks) for b in model.blocks)
        for hp in model.hook_dict.values():
            total += len(hp._forward_hooks) + len(hp._backward_hooks)
            total += len(getattr(hp, "fwd_hooks", [])) + len(getattr(hp, "bwd_hooks", []))
        return total

    def generate(
        self, model: HookedTransformer, prompts: Sequence[str], *, max_new_tokens: int
    ) -> list[str]:
        return greedy_generate(model, prompts, max_new_tokens, tokens=False)

    def generate_tokens(
        self, model: HookedTransformer, prompts: Sequence[str], *, max_new_tokens: int
    ) -> torch.Tensor:
        return greedy_generate(model, prompts, max_new_tokens, tokens=True)


def _alignment(T: int, lengths: torch.Tensor):
    """Right-align each context (positions 0..len-2) so it ends at index T-1 and the appended
    token sits at index T: TransformerLens measures causal and sliding-window distances in
    cache indices, which then equal true token distances for every prompt of the batch.
    Returns (align: cached [b, T, ...] -> aligned, mask Int[b, T+1])."""
    dev = lengths.device
    shift = T - (lengths - 1)  # [b] context of length len-1 -> indices shift..T-1
    pos = torch.arange(T, device=dev)
    src = (pos[None, :] - shift[:, None]).clamp_min(0)  # [b, T]
    mask = context_mask(T, lengths)
    ctx_mask = mask[:, :T]

    def align(t: torch.Tensor) -> torch.Tensor:
        idx = src[:, :, None, None].expand(-1, -1, *t.shape[2:])
        return torch.gather(t.detach(), 1, idx) * ctx_mask[:, :, None, None].to(t.dtype)

    return align, mask


__all__ = ["HookedBackend", "HookedTransformer"]
