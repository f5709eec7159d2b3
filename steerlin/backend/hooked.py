"""The TransformerLens 3 backend: `HookedTransformer`.

The frozen single-token block is TransformerLens's own block called with a frozen
`TransformerLensKeyValueCacheEntry` (its `past_kv_cache_entry` path), so rotary embeddings, q/k
norms, pre/post norms, GQA and local/global attention are all the block's own. The context is
one full forward of a right-padded batch with a `TransformerLensKeyValueCache`; its keys/values
are then right-aligned and masked, so the appended last token sits at index T and cache-index
distances equal true token distances for every prompt of the batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager
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

    def embed(
        self,
        model: HookedTransformer,
        tokens: Int[torch.Tensor, "b T"],
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """x_0 at every position of a right-padded batch: the residual entering block 0.

        dtype (half-precision models): the token and position embeddings (lookups, exact) are
        summed in `dtype` instead of the model's dtype."""
        ones = torch.ones_like(tokens)
        with torch.no_grad():
            if dtype is None or dtype == model.cfg.dtype:
                return model(tokens, attention_mask=ones, stop_at_layer=0)
            got: dict[str, torch.Tensor] = {}
            grab = lambda t, hook: got.__setitem__(hook.name, t.detach())
            names = ["hook_embed"]
            if model.cfg.positional_embedding_type == "standard":
                names.append("hook_pos_embed")
            model.run_with_hooks(
                tokens,
                attention_mask=ones,
                stop_at_layer=0,
                fwd_hooks=[(n, grab) for n in names],
            )
            x = got["hook_embed"].to(dtype)
            if "hook_pos_embed" in got:
                x = x + got["hook_pos_embed"].to(dtype)
            return x

    def block_context(
        self,
        model: HookedTransformer,
        layer: int,
        resid: Float[torch.Tensor, "b T H"],
        lengths: Int[torch.Tensor, " b"],
        module: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block `layer` over a whole right-padded batch from its input residual: the output
        residual [b, T, H] and this block's right-aligned keys, values and mask (as
        `build_context` gives them for every block from one forward). `module`: the block to
        run instead of model.blocks[layer] (its float32 copy, `upcast_block`)."""
        b, T, _ = resid.shape
        blk = model.blocks[layer] if module is None else module
        entry = TransformerLensKeyValueCacheEntry.init_cache_entry(blk.cfg, resid.device, b)
        ones = torch.ones(b, T, dtype=torch.long, device=resid.device)
        with torch.no_grad():
            out = blk(resid, past_kv_cache_entry=entry, attention_mask=ones)
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
        module: torch.nn.Module | None = None,
    ) -> Float[torch.Tensor, "n H"]:
        blk = model.blocks[layer] if module is None else module
        entry = TransformerLensKeyValueCacheEntry(keys, values, frozen=True)
        out = blk(x[:, None, :], past_kv_cache_entry=entry, attention_mask=mask)
        return out[:, 0, :]

    def upcast_block(
        self, model: HookedTransformer, layer: int, dtype: torch.dtype
    ) -> torch.nn.Module:
        """A copy of block `layer` that computes in `dtype` (float32 for a bf16/fp16 model):
        its weights cast, its rotary tables recomputed in `dtype`, no hooks; the model itself is
        untouched. Only this block is copied (memory: one block in `dtype`)."""
        return _upcast_module(model.blocks[layer], model.cfg, dtype)

    def logits(
        self,
        model: HookedTransformer,
        x: Float[torch.Tensor, "... H"],
        tokens: Sequence[int] | None,
    ) -> Float[torch.Tensor, "... k"]:
        cols = slice(None) if tokens is None else list(tokens)
        if model.cfg.dtype in (torch.bfloat16, torch.float16) and x.dtype != model.cfg.dtype:
            return _upcast_logits(model, x, tokens)
        resid = model.ln_final(x[..., None, :])[..., 0, :] if model.cfg.normalization_type else x
        logits = resid @ model.unembed.W_U[:, cols] + model.unembed.b_U[cols]
        return apply_softcap(logits, model.cfg.output_logits_soft_cap)

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

    def generate(
        self, model: HookedTransformer, prompts: Sequence[str], *, max_new_tokens: int
    ) -> list[str]:
        return greedy_generate(model, prompts, max_new_tokens, tokens=False)

    def generate_tokens(
        self, model: HookedTransformer, prompts: Sequence[str], *, max_new_tokens: int
    ) -> torch.Tensor:
        return greedy_generate(model, prompts, max_new_tokens, tokens=True)


def _upcast_module(module: torch.nn.Module, cfg, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of a TransformerLens module computing in `dtype`: a config copy with that dtype,
    parameters and floating buffers cast (never copied in the model's dtype first), rotary
    tables recomputed in `dtype`, hook points without hooks."""
    from collections import OrderedDict

    cfg2 = copy.copy(cfg)
    cfg2.dtype = dtype
    memo: dict[int, Any] = {id(cfg): cfg2}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    for m in module.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            memo[id(getattr(m, attr))] = OrderedDict()
        for attr in ("fwd_hooks", "bwd_hooks"):  # HookPoint's handles
            if isinstance(getattr(m, attr, None), list):
                memo[id(getattr(m, attr))] = []
        for name, buf in m.named_buffers(recurse=False):
            if buf is None:
                continue
            if not buf.is_floating_point():  # masks: shared with the model, never copied
                memo[id(buf)] = buf
                continue
            if name in ("rotary_sin", "rotary_cos"):
                sin, cos = m.calculate_sin_cos_rotary(
                    cfg.rotary_dim, m.rotary_cos.shape[0], base=m._rotary_base(), dtype=dtype
                )
                memo[id(m.rotary_sin)] = sin.to(m.rotary_sin.device)
                memo[id(m.rotary_cos)] = cos.to(m.rotary_cos.device)
            elif id(buf) not in memo:
                memo[id(buf)] = buf.to(dtype)
    return copy.deepcopy(module, memo)


def _upcast_logits(
    model: HookedTransformer, x: torch.Tensor, tokens: Sequence[int] | None, chunk: int = 32768
) -> torch.Tensor:
    """Logits of a half-precision model computed in x's dtype: the final norm copied in that
    dtype, the unembedding columns cast `chunk` at a time (never the whole W_U at once)."""
    dt = x.dtype
    resid = x
    if model.cfg.normalization_type:
        ln = _upcast_module(model.ln_final, model.cfg, dt)
        resid = ln(x[..., None, :])[..., 0, :]
    W_U, b_U = model.unembed.W_U, model.unembed.b_U
    if tokens is not None:
        cols = list(tokens)
        logits = resid @ W_U[:, cols].to(dt) + b_U[cols].to(dt)
    else:
        logits = torch.cat(
            [
                resid @ W_U[:, s : s + chunk].to(dt) + b_U[s : s + chunk].to(dt)
                for s in range(0, W_U.shape[1], chunk)
            ],
            dim=-1,
        )
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


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
