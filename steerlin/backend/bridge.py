"""The TransformerLens 4 backend: `TransformerBridge` (a Hugging Face model behind TL's hooks).

TransformerBridge has no public single-token block call against a frozen cache (extra keyword
arguments go to the wrapped Hugging Face module, so TL3's `past_kv_cache_entry=` is silently
ignored). The frozen map f_l is therefore computed by the exact full-sequence route: block l is
re-run over the whole right-padded context with the last real token's input replaced by the
perturbed state. In a causal decoder no earlier position sees the last token, so every earlier
position's keys and values are exactly the clean run's and the output at the last position is
f_l(x); the cost is about T single-token calls.

The block is called with the arguments the Hugging Face model itself passed it (attention
masks including sliding windows, rotary tables per layer type, position ids), recorded once
per sequence length T from a forward and replayed with the Hugging Face cache removed. With an
all-ones attention mask and right padding these depend on T only, so a batch-1 copy broadcasts
over any batch. The first context of each model is checked: replaying every block on the clean
inputs must reproduce the forward's `hook_resid_post` (else an error names the architecture).

Accordingly `KVContext.keys[l]` holds block l's input residual over the context, Float[b, T, H]
(natural layout: prompt tokens at 0..len-1), `values[l]` is empty ([b, 0]) and `mask` has the
layout every backend shares (`common.context_mask`: `mask.sum(1)` is each prompt's length).
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from jaxtyping import Float, Int
from transformer_lens.model_bridge import TransformerBridge

from ..errors import SteerlinError
from . import Backend, KVContext
from .common import block_pre_hooks, context_mask, greedy_generate


class UnsupportedArchitectureError(SteerlinError, NotImplementedError):
    """steerlin's bridge backend does not (yet) drive this Hugging Face architecture."""


#: Hugging Face architectures the bridge backend is verified on: the frozen block map, hooks,
#: logits and cached generation agree with the TransformerLens 3 backend (GPT-2, Llama, Gemma-3:
#: tests/test_bridge.py) and with ground truth on a tiny random model of each family
#: (tests/test_arch_matrix.py, docs/support.md). Any other architecture is refused by name.
SUPPORTED_ARCHITECTURES = (
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "Gemma3ForCausalLM",
    "GPTNeoXForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "Olmo2ForCausalLM",
    "Gemma2ForCausalLM",
)

#: verified architectures TransformerLens 4.3's bridge cannot run in half precision without a
#: K/V cache (steerlin's forwards): architecture -> what fails
HALF_PRECISION_UNSUPPORTED = {
    "Olmo2ForCausalLM": (
        "without a K/V cache TransformerLens 4.3's attention bridge multiplies OLMo-2's "
        "float32 attention weights (after its full-width q/k-norm) with half-precision "
        "values, a dtype error"
    ),
}

#: transformers release from which decoder layers hand their attention the K/V cache as `cache=`
#: (before: `past_key_values=`); TransformerLens 4.3's attention bridges read only the old
#: names, so the cache stays empty and cached generation silently ignores the prompt unless the
#: cache is also passed under the old name (`cache_alias`).
_CACHE_RENAMED = (5, 24)

_LAYOUT_SLOTS = 8  # sequence lengths whose block arguments are kept per model


def architecture(model: TransformerBridge) -> str:
    """The wrapped Hugging Face architecture's class name (e.g. "Gemma3ForCausalLM")."""
    arch = getattr(model.cfg, "architecture", None)
    if arch:
        return str(arch)
    hf = getattr(getattr(model, "_driver", None), "underlying_model", None)
    return type(hf).__name__ if hf is not None else type(model.adapter).__name__


def check_architecture(model: TransformerBridge) -> None:
    """UnsupportedArchitectureError naming the architecture unless it is one steerlin tests (or
    naming the feature, for a verified architecture in a dtype the bridge cannot run)."""
    arch = architecture(model)
    dtype = getattr(model.cfg, "dtype", None)
    if arch in HALF_PRECISION_UNSUPPORTED and dtype in (torch.bfloat16, torch.float16):
        raise UnsupportedArchitectureError(
            f"model: {arch} in {dtype} is not supported by steerlin's TransformerBridge backend: "
            f"{HALF_PRECISION_UNSUPPORTED[arch]}; load it in float32, or use TransformerLens 3 "
            "(pip install 'steerlin[tl3]'), where steerlin drives it in half precision"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model: steerlin's TransformerBridge backend (TransformerLens 4) is not verified on "
            f"the {arch} architecture (verified: {', '.join(SUPPORTED_ARCHITECTURES)}); with "
            "TransformerLens 3 (pip install 'steerlin[tl3]') steerlin drives a HookedTransformer "
            f"of it if TransformerLens 3 converts {arch}"
        )


def _transformers_version() -> tuple[int, int]:
    try:
        major, minor = version("transformers").split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except (PackageNotFoundError, ValueError):
        return (0, 0)


@contextmanager
def cache_alias(model: TransformerBridge):
    """While open, each attention bridge of `model` also receives the Hugging Face cache under
    the name TransformerLens 4.3 reads (`past_key_values`) when transformers >= 5.24 passes it
    as `cache` (forward pre-hooks, removed on exit and on any exception; a no-op before 5.24).
    Without it TransformerLens 4.3's cached generation computes every new token without the
    prompt. steerlin's generation and every steering context (`position_probe`) open it."""
    if _transformers_version() < _CACHE_RENAMED:
        yield
        return

    def pre_hook(module, args, kwargs):
        cache = kwargs.get("cache")
        if cache is None or kwargs.get("past_key_values") is not None:
            return None
        return args, {**kwargs, "past_key_values": cache}

    handles = []
    try:
        for blk in model.blocks:
            attn = getattr(blk, "attn", None)
            if attn is not None:
                handles.append(attn.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- block arguments


def _is_cache(obj: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers always ships it
        return False
    return isinstance(obj, Cache)


def _map_nested(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """`leaf` applied to everything in nested tuples, lists and dicts (the block arguments),
    the nesting kept."""
    if isinstance(value, tuple):
        return tuple(_map_nested(v, leaf) for v in value)
    if isinstance(value, list):
        return [_map_nested(v, leaf) for v in value]
    if isinstance(value, dict):
        return {k: _map_nested(v, leaf) for k, v in value.items()}
    return leaf(value)


def _freeze_arg(value: Any, batch: int) -> Any:
    """A recorded block argument made replayable: caches dropped, masks cut to one row."""

    def leaf(v: Any) -> Any:
        if _is_cache(v):
            return None
        if torch.is_tensor(v):
            v = v.detach()
            # 4-D attention masks [b, 1, T, T]: identical rows (all-ones mask, right padding)
            if v.ndim == 4 and v.shape[0] == batch and batch > 1:
                v = v[:1]
        return v

    return _map_nested(value, leaf)


class _Layouts:
    """Per model: for each recent sequence length T, every block's recorded call arguments."""

    def __init__(self) -> None:
        self._by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model, T: int):
        return self._by_model.get(model, {}).get(T)

    def put(self, model, T: int, calls: list) -> None:
        slots = self._by_model.setdefault(model, OrderedDict())
        slots[T] = calls
        slots.move_to_end(T)
        while len(slots) > _LAYOUT_SLOTS:
            slots.popitem(last=False)


_LAYOUTS = _Layouts()
_CHECKED: weakref.WeakSet = weakref.WeakSet()


@contextmanager
def _recording(model: TransformerBridge, batch: int, T: int):
    """While open, forwards record each block's call arguments for sequence length T."""
    calls: list = [None] * model.cfg.n_layers

    def make(layer: int):
        def pre_hook(module, args, kwargs):
            if calls[layer] is None and args and torch.is_tensor(args[0]):
                if args[0].shape[1] == T:
                    rest = tuple(_freeze_arg(a, batch) for a in args[1:])
                    kw = {k: _freeze_arg(v, batch) for k, v in kwargs.items()}
                    if "use_cache" in kw:
                        kw["use_cache"] = False
                    calls[layer] = (rest, kw)

        return pre_hook

    handles = [
        blk.register_forward_pre_hook(make(i), with_kwargs=True)
        for i, blk in enumerate(model.blocks)
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
    if all(c is not None for c in calls):
        _LAYOUTS.put(model, T, calls)


def _layout(model: TransformerBridge, T: int) -> list:
    """The recorded block arguments for length T (recorded by a batch-1 forward if missing)."""
    calls = _LAYOUTS.get(model, T)
    if calls is None:
        tokens = torch.zeros(1, T, dtype=torch.long, device=model.cfg.device)
        with torch.no_grad(), _recording(model, 1, T):
            model(tokens, return_type=None, attention_mask=torch.ones_like(tokens), use_cache=False)
        calls = _LAYOUTS.get(model, T)
        if calls is None:
            raise UnsupportedArchitectureError(
                f"model: the {architecture(model)} blocks were not called with a [batch, {T}, "
                "d_model] residual; steerlin's bridge backend cannot replay them"
            )
    return calls


def _call_block(
    model: TransformerBridge, layer: int, hidden: torch.Tensor, module: Any = None
) -> torch.Tensor:
    """Block `layer` over a full right-padded sequence, with the model's own arguments
    (`module`: a float32 copy of the block, given the recorded arguments cast to float32)."""
    args, kwargs = _layout(model, hidden.shape[1])[layer]
    if module is None:
        module = model.blocks[layer]
    elif hidden.dtype != model.cfg.dtype:
        args, kwargs = _cast_floats(args, hidden.dtype), _cast_floats(kwargs, hidden.dtype)
    out = module(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (masks, rotary cos/sin) in nested arguments cast to `dtype`."""
    return _map_nested(
        value, lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
    )


def _upcast_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of a bridge component computing in `dtype`: parameters and floating buffers
    cast (never copied in the model's dtype first), hook points without hooks."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    for m in module.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            memo[id(getattr(m, attr))] = OrderedDict()
        for buf in m.buffers(recurse=False):
            if buf is not None and id(buf) not in memo:  # masks shared, never copied
                memo[id(buf)] = buf.to(dtype) if buf.is_floating_point() else buf
    return copy.deepcopy(module, memo)


def _at(t: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """t[i, last[i]] for t [n, T, H] (a gather: fine under vmap)."""
    idx = last[:, None, None].expand(-1, 1, t.shape[-1])
    return torch.gather(t, 1, idx)[:, 0]


# --------------------------------------------------------------------------- the backend


class BridgeBackend(Backend):
    """`transformer_lens.model_bridge.TransformerBridge` (TransformerLens 4.x)."""

    name = "bridge"

    def accepts(self, model: Any) -> bool:
        if not isinstance(model, TransformerBridge):
            return False
        check_architecture(model)
        return True

    def build_context(
        self,
        model: TransformerBridge,
        tokens: Int[torch.Tensor, "b T"],
        lengths: Int[torch.Tensor, " b"],
        hook_names: Sequence[str],
    ) -> KVContext:
        """One full forward of a right-padded batch: last-token states at `hook_names` and
        every block's input residual over the whole context."""
        b, T = tokens.shape
        L = model.cfg.n_layers
        rows = torch.arange(b, device=tokens.device)
        last = lengths.to(tokens.device) - 1
        got: dict[int, torch.Tensor] = {}
        resid: list[torch.Tensor | None] = [None] * L

        def state(j: int):
            def hook(t: torch.Tensor, hook) -> None:
                got[j] = t[rows, last].detach()

            return hook

        def keep(layer: int):
            def hook(t: torch.Tensor, hook) -> None:
                resid[layer] = t.detach()

            return hook

        fwd = [(n, state(j)) for j, n in enumerate(hook_names)]
        fwd += [(f"blocks.{l}.hook_resid_pre", keep(l)) for l in range(L)]
        with torch.no_grad(), _recording(model, b, T):
            self.run_with_hooks(model, tokens, fwd, return_type=None, use_cache=False)
        states = torch.stack([got[j] for j in range(len(hook_names))], dim=1)
        empty = torch.zeros(b, 0, dtype=states.dtype, device=states.device)
        kv = KVContext(
            states, tuple(resid), tuple(empty for _ in range(L)), context_mask(T, last + 1)
        )
        if model not in _CHECKED:
            self._self_check(model, kv, hook_names)
        return kv

    def _self_check(self, model: TransformerBridge, kv: KVContext, hook_names) -> None:
        """Replaying each block on the clean inputs must give the forward's next state."""
        L = model.cfg.n_layers
        if len(hook_names) != L + 1:  # not the x_0..x_L layout of `state_hook_names`
            return
        with torch.no_grad():
            for layer in range(L):
                y = self.block(
                    model, layer, kv.states[:, layer], kv.keys[layer], kv.values[layer], kv.mask
                )
                ref = kv.states[:, layer + 1]
                err = float((y - ref).abs().max())
                if not err <= 1e-5 * (1 + float(ref.abs().max())):
                    raise UnsupportedArchitectureError(
                        f"model: replaying block {layer} of the {architecture(model)} bridge "
                        f"does not reproduce its forward (max error {err:.3g}); steerlin's "
                        "bridge backend cannot compute its frozen block maps"
                    )
        _CHECKED.add(model)

    def embed(
        self,
        model: TransformerBridge,
        tokens: Int[torch.Tensor, "b T"],
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """x_0 at every position of a right-padded batch (records the block arguments too);
        `dtype`: returned in that dtype (a half-precision model's embedding, as it computes it)."""
        b, T = tokens.shape
        got: list[torch.Tensor] = []
        # the bridge stops before block `stop`'s input hook: stop after block 0 (if the block
        # arguments for T are known already, else run the whole forward to record them)
        stop = 1 if _LAYOUTS.get(model, T) is not None and model.cfg.n_layers > 1 else None

        def hook(t: torch.Tensor, hook) -> None:
            got.append(t.detach())

        with torch.no_grad(), _recording(model, b, T):
            self.run_with_hooks(
                model,
                tokens,
                [("blocks.0.hook_resid_pre", hook)],
                return_type=None,
                use_cache=False,
                stop_at_layer=stop,
            )
        return got[0] if dtype is None else got[0].to(dtype)

    def block_context(
        self,
        model: TransformerBridge,
        layer: int,
        resid: Float[torch.Tensor, "b T H"],
        lengths: Int[torch.Tensor, " b"],
        module: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        b, T, _ = resid.shape
        with torch.no_grad():
            out = _call_block(model, layer, resid, module)
        empty = torch.zeros(b, 0, dtype=resid.dtype, device=resid.device)
        return out, resid, empty, context_mask(T, lengths.to(resid.device))

    def block(
        self,
        model: TransformerBridge,
        layer: int,
        x: Float[torch.Tensor, "n H"],
        keys: Float[torch.Tensor, "n T H"],
        values: torch.Tensor,
        mask: Int[torch.Tensor, "n Tp1"],
        module: torch.nn.Module | None = None,
    ) -> Float[torch.Tensor, "n H"]:
        """f_layer(x): block `layer` over the frozen context with the last token's input x
        (`module`: the block's float32 copy for a half-precision model)."""
        T = keys.shape[1]
        last = mask.sum(1) - 1
        at_last = torch.arange(T, device=keys.device)[None, :] == last[:, None]
        hidden = torch.where(at_last[..., None], x[:, None, :].to(keys.dtype), keys)
        return _at(_call_block(model, layer, hidden, module), last)

    def upcast_block(
        self, model: TransformerBridge, layer: int, dtype: torch.dtype
    ) -> torch.nn.Module:
        """A copy of block `layer` computing in `dtype` (float32 for a bf16/fp16 model; its
        recorded rotary tables stay the model's own, cast): only this block is copied."""
        return _upcast_module(model.blocks[layer], dtype)

    def logits(
        self,
        model: TransformerBridge,
        x: Float[torch.Tensor, "... H"],
        tokens: Sequence[int] | None,
    ) -> Float[torch.Tensor, "... k"]:
        """Final norm, the unembedding rows `tokens` and the model's final-logit soft-cap
        (for a half-precision model given float32 states: in float32, the norm copied and the
        unembedding rows cast a chunk at a time)."""
        head = model.unembed.original_component
        bias = getattr(head, "bias", None)
        if x.dtype != model.cfg.dtype and model.cfg.dtype in (torch.bfloat16, torch.float16):
            h = _upcast_module(model.ln_final, x.dtype)(x[..., None, :])[..., 0, :]
            rows = None if tokens is None else list(tokens)
            out = _rows_matmul(h, head.weight, bias, rows)
        else:
            h = model.ln_final(x[..., None, :])[..., 0, :]
            w = head.weight if tokens is None else head.weight[list(tokens)]
            out = h @ w.T
            if bias is not None:
                out = out + (bias if tokens is None else bias[list(tokens)])
        cap = getattr(_hf_config(model), "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    @contextmanager
    def position_probe(self, model: TransformerBridge, layers: Sequence[int], record):
        """Forward pre-hooks on the blocks: the Hugging Face cache each block receives
        (keyword `past_key_values`, `layer_past` for GPT-NeoX, or positional for GPT-2) holds
        the positions cached so far; a forward without a cache reports None."""

        def make(layer: int):
            def pre_hook(module, args, kwargs):
                cache = kwargs.get("past_key_values")
                if cache is None:
                    found = [v for v in kwargs.values() if _is_cache(v)]
                    found += [a for a in args[1:] if _is_cache(a)]
                    cache = found[0] if found else None
                if cache is None or not kwargs.get("use_cache", True):
                    record(layer, None)
                else:
                    record(layer, int(cache.get_seq_length(layer)))

            return pre_hook

        with cache_alias(model), block_pre_hooks(model, layers, make):
            yield

    def generate(
        self, model: TransformerBridge, prompts: Sequence[str], *, max_new_tokens: int
    ) -> list[str]:
        if _pads_in_float64(model, prompts):
            return [
                t for p in prompts for t in self.generate(model, [p], max_new_tokens=max_new_tokens)
            ]
        with cache_alias(model):
            return greedy_generate(model, prompts, max_new_tokens, tokens=False)

    def generate_tokens(
        self, model: TransformerBridge, prompts: Sequence[str], *, max_new_tokens: int
    ) -> torch.Tensor:
        if _pads_in_float64(model, prompts):
            rows = [
                self.generate_tokens(model, [p], max_new_tokens=max_new_tokens)[0] for p in prompts
            ]
            width = max(len(r) for r in rows)
            pad = model.tokenizer.pad_token_id or 0
            return torch.stack([torch.cat([r.new_full((width - len(r),), pad), r]) for r in rows])
        with cache_alias(model):
            return greedy_generate(model, prompts, max_new_tokens, tokens=True)


def _rows_matmul(h, weight, bias, rows, chunk: int = 32768) -> torch.Tensor:
    """h @ weight[rows].T (+ bias) in h's dtype, the rows cast a chunk at a time."""
    dt = h.dtype
    if rows is not None:
        out = h @ weight[rows].to(dt).T
        return out if bias is None else out + bias[rows].to(dt)
    parts = []
    for s in range(0, weight.shape[0], chunk):
        part = h @ weight[s : s + chunk].to(dt).T
        parts.append(part if bias is None else part + bias[s : s + chunk].to(dt))
    return torch.cat(parts, dim=-1)


def _pads_in_float64(model: TransformerBridge, prompts: Sequence[str]) -> bool:
    """Whether a batched generation would left-pad a float64 bridge.

    TransformerLens 4.3 adds Hugging Face's float64 mask minimum to the scores and takes the
    softmax in float32, where it becomes -inf: a padded query row is all -inf, its softmax NaN,
    and the NaN reaches every real token through the values (float32 masks stay finite). Such
    batches are generated one prompt at a time instead (the same tokens, unpadded).
    """
    if model.cfg.dtype != torch.float64 or len(prompts) < 2:
        return False
    lengths = {model.to_tokens(p).shape[-1] for p in prompts}
    return len(lengths) > 1


def _hf_config(model: TransformerBridge) -> Any:
    hf = getattr(getattr(model, "_driver", None), "underlying_model", None)
    return getattr(hf, "config", None)


__all__ = [
    "HALF_PRECISION_UNSUPPORTED",
    "SUPPORTED_ARCHITECTURES",
    "BridgeBackend",
    "TransformerBridge",
    "UnsupportedArchitectureError",
    "architecture",
    "cache_alias",
    "check_architecture",
]
