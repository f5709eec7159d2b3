"""The one seam between steerlin and the model library (TransformerLens).

Only this package touches TransformerLens internals (`HookedTransformer`/`TransformerBridge`
type checks, the K/V cache classes, `past_kv_cache_entry`, `apply_softcap`, hook-point
bookkeeping). Every other
module reaches the model through `get(model)` -> a `Backend`, or through the model's public
API (`model.cfg`, `model.to_tokens`, `model.tokenizer`, `model.generate`). The one exception is
`steerlin.loading`, which constructs models (`HookedTransformer`, `TransformerBridge`).

A backend is an object with these methods (model first, tensors on the model's device):

    accepts(model) -> bool
        whether this backend drives `model`.
    build_context(model, tokens[b, T], lengths[b], hook_names) -> KVContext
        one full forward of a right-padded batch: the residual at each prompt's last real token
        at every hook name (states[b, len(hook_names), H]), and per block the context's keys
        and values right-aligned so the context ends at index T-1, with mask[b, T+1] (1 on the
        context and on the appended token at index T, 0 on the left padding).
    embed(model, tokens[b, T]) -> [b, T, H]
        the residual entering block 0 at every position.
    block_context(model, layer, resid[b, T, H], lengths[b]) -> (resid_out, keys, values, mask)
        block `layer` over the whole batch from its input residual, with this block's keys and
        values aligned as `build_context` aligns them (one block at a time: the layer-wise
        contexts of the streaming fit).
    block(model, layer, x[n, H], keys, values, mask) -> [n, H]
        block `layer` applied to one appended token per row against the frozen keys/values
        (the single-token map f_l); pure and differentiable (used under torch.func.jvp/vmap).
    logits(model, x[..., H], tokens) -> [..., len(tokens)]
        the final norm, the unembedding columns `tokens` and the model's logit soft-cap
        (computed in x's dtype for a half-precision model given float32 states).
    upcast_block(model, layer, dtype) -> module
        a copy of block `layer` computing in `dtype`, for half-precision (bf16/fp16) models:
        `embed(..., dtype=)`, `block_context(..., module=)` and `block(..., module=)` then run
        the frozen maps in float32 one block at a time (`steerlin.frozen.BlockUpcast`).
    hooks(model, fwd_hooks) -> context manager
        forward hooks [(hook name, fn(resid, hook) -> resid | None)] live while open, removed
        on exit and on any exception; nested contexts remove only their own hooks.
    run_with_hooks(model, tokens, fwd_hooks, **kwargs)
        one forward with temporary hooks (kwargs as TransformerLens's `run_with_hooks`).
    position_probe(model, layers, record) -> context manager
        while open, every call of block l in `layers` first calls record(l, offset), offset the
        number of positions already in that forward's KV cache (None: no cache), before the
        block's `hook_resid_pre` fires; how `steerlin.hooks` steers "generated" and ("from", i)
        positions from the cache's own position, with no state between forwards.
    count_hooks(model) -> int
        live forward/backward hooks on every hook point, plus live position probes (0 when
        clean).
    generate(model, prompts, *, max_new_tokens) -> list[str]
        greedy continuations of text prompts (prompt text included), one left-padded batch,
        the K/V cache on; hooks live at the time apply to every forward.
    generate_tokens(model, prompts, *, max_new_tokens) -> LongTensor[b, T + max_new_tokens]
        the same greedy generation as token ids (prompt tokens included), never stopping at EOS.

Two backends ship: `hooked` (TransformerLens 3.x `HookedTransformer`) and `bridge`
(TransformerLens 4.x `TransformerBridge`). Each is registered only when the installed
TransformerLens provides its model class, so `import steerlin` works with either line.

Hook names follow TransformerLens's `blocks.{l}.hook_resid_pre` / `hook_resid_post` scheme
(`steerlin.hooks.resid_pre_name`). Backends are tried in registration order: `register` a
new one (a fast attention engine, say) with `first=True` to take precedence. `Model` is the
type annotation for "a model some backend accepts" (the installed line's model class).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int


@dataclass(frozen=True)
class KVContext:
    """What `Backend.build_context` returns (see the module docstring for the layout)."""

    states: Float[torch.Tensor, "b S H"]
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    mask: Int[torch.Tensor, "b Tp1"]


class Backend:
    """The interface every backend implements (see the module docstring)."""

    name = "abstract"

    def accepts(self, model: Any) -> bool:
        raise NotImplementedError

    def build_context(
        self, model, tokens: torch.Tensor, lengths: torch.Tensor, hook_names: Sequence[str]
    ) -> KVContext:
        raise NotImplementedError

    def embed(self, model, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block_context(self, model, layer: int, resid: torch.Tensor, lengths: torch.Tensor):
        raise NotImplementedError

    def block(
        self,
        model,
        layer: int,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, model, x: torch.Tensor, tokens: Sequence[int] | None) -> torch.Tensor:
        raise NotImplementedError

    def upcast_block(self, model, layer: int, dtype: torch.dtype) -> torch.nn.Module:
        raise NotImplementedError

    # hooks, run_with_hooks and count_hooks: TransformerLens's API, the same on
    # HookedTransformer (TL3) and TransformerBridge (TL4); a backend for another library
    # overrides them.

    def hooks(self, model, fwd_hooks) -> AbstractContextManager:
        return model.hooks(fwd_hooks=fwd_hooks)

    def run_with_hooks(self, model, tokens: torch.Tensor, fwd_hooks, **kwargs) -> Any:
        # steerlin's batches are right-padded: no real token attends to the padding after it,
        # so the mask is all ones. Passing it explicitly keeps TransformerLens from deriving
        # one from the tokenizer's padding side (a user's left-padding tokenizer would shift
        # the positions of prompts that start with the pad id).
        kwargs.setdefault("attention_mask", torch.ones_like(tokens))
        return model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, **kwargs)

    def position_probe(self, model, layers: Sequence[int], record) -> AbstractContextManager:
        raise NotImplementedError

    def count_hooks(self, model) -> int:
        """Live hooks on the distinct hook points (aliases counted once) plus forward
        pre-hooks on the blocks."""
        total = sum(len(b._forward_pre_hooks) for b in model.blocks)
        seen: set[int] = set()
        for hp in model.hook_dict.values():
            if id(hp) in seen:
                continue
            seen.add(id(hp))
            # a hook added through TransformerLens is in torch's dict and in TL's handle list
            # (both lines); a raw torch hook only in the former: count each hook once
            total += max(len(hp._forward_hooks), len(getattr(hp, "fwd_hooks", [])))
            total += max(len(hp._backward_hooks), len(getattr(hp, "bwd_hooks", [])))
        return total

    def generate(self, model, prompts: Sequence[str], *, max_new_tokens: int) -> list[str]:
        raise NotImplementedError

    def generate_tokens(
        self, model, prompts: Sequence[str], *, max_new_tokens: int
    ) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<steerlin backend {self.name!r}>"


from .common import reject, tl_major  # noqa: E402

_BACKENDS: list[Backend] = []
_MODEL_TYPES: list[type] = []

if tl_major() < 4:
    from .hooked import HookedBackend, HookedTransformer  # noqa: E402

    _BACKENDS.append(HookedBackend())
    _MODEL_TYPES.append(HookedTransformer)
else:
    from .bridge import BridgeBackend, TransformerBridge  # noqa: E402

    _BACKENDS.append(BridgeBackend())
    _MODEL_TYPES.append(TransformerBridge)

#: Type annotation for a model steerlin accepts (the union of the backends' model types).
Model = _MODEL_TYPES[0]


_RESOLVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its Backend


def register(backend: Backend, *, first: bool = False) -> None:
    """Add a backend; with `first=True` it is tried before the ones registered so far."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend: expected a steerlin.backend.Backend, got {type(backend)!r}")
    if first:
        _BACKENDS.insert(0, backend)
    else:
        _BACKENDS.append(backend)
    _RESOLVED.clear()


def get(model: Any) -> Backend:
    """The backend that drives `model`; ModelTypeError (saying what came) if none does.

    Resolved once per model object (the architecture check included) and remembered while the
    model lives, so the many entry points that check their model pay for it once."""
    try:
        return _RESOLVED[model]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable (never a model)
        pass
    for backend in _BACKENDS:
        if backend.accepts(model):
            try:
                _RESOLVED[model] = backend
            except TypeError:
                pass
            return backend
    raise reject(model)


def check_model(model: Any) -> Model:
    """Return `model` if a backend drives it, else raise ModelTypeError saying what came.

    Every steerlin entry point calls this first, so a wrong argument fails at the boundary with a
    readable message rather than deep inside a hook.
    """
    get(model)
    return model


def count_hooks(model: Model) -> int:
    """Number of live forward/backward hooks on every hook point of `model` (0 when clean)."""
    return get(model).count_hooks(model)


__all__ = [
    "Backend",
    "KVContext",
    "Model",
    "check_model",
    "count_hooks",
    "get",
    "register",
    "tl_major",
]
