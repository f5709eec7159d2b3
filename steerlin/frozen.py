"""The frozen-context last-token block maps f_l and their Jacobians through JVPs.

Definitions (used everywhere in steerlin):
    x_l     last real token's residual entering block l (l = 0..L-1); x_L the final resid_post.
    f_l     block l applied to the last token only, every earlier position's keys and values
            fixed to the unperturbed run: x_{l+1} = f_l(x_l). In a causal decoder this is exact,
            since a change to the last token never reaches an earlier position.
    A_l(p)  ∂f_l/∂x_l at the clean state of prompt p, used only through JVPs.

One evaluation of f_l is a single-token pass of the model's own block against the cached
keys/values of the context (through `steerlin.backend`: for TransformerLens its
`past_kv_cache_entry` path), so rotary embeddings, q/k norms, pre/post norms, GQA and
local/global attention are all the block's own. Batches are padded on the right for the one
full forward; the cached context is then right-aligned and masked, and the clean last token's
own key/value is replaced by the one the perturbed state produces.

Two engines evaluate f_l (`engine=` on every function that builds contexts):
    "fast"  `steerlin.backend.fast`: the context's keys rotated and laid out once per batch and
            block, single-query attention that reads them in place for every trajectory and
            tangent, a written-out forward-mode JVP (one primal pass, batched tangents).
    "tl"    TransformerLens's own block on its `past_kv_cache_entry` path: the reference.
    "auto"  (default) "fast" when the engine implements every feature of the model, else "tl".
Both give the same numbers to float round-off (tests/test_engine.py).

Half-precision models (bfloat16/float16) are computed in float32 one block at a time:
`steerlin.halfprec` (`BlockUpcast`, `upcast_stats`; re-exported here).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from . import backend
from .backend import Backend, Model, check_model
from .errors import InputError, NonFiniteError, UnsupportedFeatureError
from .halfprec import (
    HALF_DTYPES,
    JVP_DTYPES,
    BlockUpcast,
    check_jvp_dtype,
    compute_dtype,
    upcast_stats,
    upcaster,
)
from .hooks import state_hook_names
from .tokens import PromptsLike, iter_batches, pad_id, tokenize

ENGINES = ("auto", "fast", "tl")


class _LazyFast:
    """steerlin.backend.fast, imported on first use: it is built on TransformerLens 3's
    HookedTransformer classes, which TransformerLens 4 does not have."""

    def __getattr__(self, name: str):
        from .backend import fast

        return getattr(fast, name)


_fast = _LazyFast()


def resolve_engine(model: Model, engine: str = "auto") -> str:
    """The engine, "fast" or "tl", that evaluates `model`'s frozen-context blocks.

    "auto" picks "fast" when `steerlin.backend.fast` implements every feature of the model (a
    TransformerLens `HookedTransformer` of a supported architecture, float32/float64), else
    "tl". "fast" on a model it does not implement raises UnsupportedFeatureError naming the
    feature (never a silently different block).
    """
    if engine not in ENGINES:
        raise InputError(f"engine: expected one of {ENGINES}, got {engine!r}")
    if engine == "tl":
        return "tl"
    why = _fast_unsupported(model)
    if why is None:
        return "fast"
    if engine == "auto":
        return "tl"
    raise UnsupportedFeatureError(
        f"engine='fast': {why}; use engine='tl' (TransformerLens's own block) or 'auto'"
    )


def _fast_unsupported(model: Model) -> str | None:
    """Why the fast engine cannot run `model` (None: it can)."""
    if backend.get(model).name != "hooked":
        return f"the fast engine drives HookedTransformer models only, not {type(model).__name__}"
    if model.cfg.dtype not in JVP_DTYPES + HALF_DTYPES:
        return f"dtype {model.cfg.dtype} (the fast engine computes in float32/float64)"
    what = _fast.unsupported_feature(model)
    return None if what is None else f"{what} is not implemented for {model.cfg.model_name!r}"


@dataclass(frozen=True)
class FrozenContext:
    """One right-padded batch with its clean last-token states and cached keys/values.

    Attributes:
        index: rows -> positions in the caller's prompt list.
        lengths: tokens per prompt.
        states: Float[b, L+1, H] clean x_0..x_L at the last real token.
        keys, values: per block the context's cached K/V in the engine's layout. engine "tl":
            Float[b, T, kv_heads, d_head], pre-rotary, post q/k-norm, exactly what
            TransformerLens caches. engine "fast": `kv.keys` / `kv.values` (the same tensors,
            Float[b, kv_heads, T, d_head], keys rotated). None for a block not held.
        mask: Int[b, T+1] 1 on the context (right-aligned: indices T-len+1..T-1) and on the
            appended last token at index T; 0 on the left padding.
        kv: the fast engine's prepared context (`steerlin.backend.fast.FastKV`), or None on
            the TransformerLens path.
        upcast: for a bf16/fp16 model, the float32 block copies every call runs on
            (`BlockUpcast`; states, keys and values are then float32); None otherwise.
    """

    model: Model
    index: Int[torch.Tensor, " b"]
    lengths: Int[torch.Tensor, " b"]
    states: Float[torch.Tensor, "b Lp1 H"]
    keys: tuple[torch.Tensor | None, ...]  # None: a block not held (layer-wise contexts)
    values: tuple[torch.Tensor | None, ...]
    mask: Int[torch.Tensor, "b Tp1"]

    backend: Backend | None = field(default=None, repr=False, compare=False)
    kv: _fast.FastKV | None = field(default=None, repr=False, compare=False)
    upcast: BlockUpcast | None = field(default=None, repr=False, compare=False)

    def _module(self, layer: int):
        return None if self.upcast is None else self.upcast.block(layer)

    def _prewarm(self, layer: int) -> None:
        """Build block `layer`'s float32 copy (and the fast engine's weights) before a
        torch.func transform: a copy made inside one would hold its wrapped tensors."""
        if self.upcast is not None:
            self.upcast.block(layer)
            if self.kv is not None:
                _fast._w(self.model, self.kv, layer)

    def __post_init__(self) -> None:
        if self.backend is None:  # the backend that runs this model's blocks
            object.__setattr__(self, "backend", backend.get(self.model))

    @property
    def engine_name(self) -> str:
        """The engine in use: "fast" (steerlin.backend.fast) or "tl" (TransformerLens's block)."""
        return "tl" if self.kv is None else "fast"

    def block(self, layer: int, x: Float[torch.Tensor, "b H"]) -> Float[torch.Tensor, "b H"]:
        """f_layer(x): a pure single-token pass of block `layer` against the frozen context."""
        if self.kv is not None:
            return _fast.block(self.model, self.kv, layer, x)
        if self.upcast is not None:
            return self.backend.block(
                self.model,
                layer,
                x,
                self.keys[layer],
                self.values[layer],
                self.mask,
                module=self._module(layer),
            )
        return self.backend.block(
            self.model, layer, x, self.keys[layer], self.values[layer], self.mask
        )

    def run(self, x: Float[torch.Tensor, "b H"], start: int, stop: int | None = None):
        """x_stop from x_start through f_start ... f_{stop-1} (stop defaults to L)."""
        stop = self.n_layers if stop is None else stop
        for layer in range(start, stop):
            x = self.block(layer, x)
        return x

    def block_many(
        self, layer: int, z: Float[torch.Tensor, "b k H"]
    ) -> Float[torch.Tensor, "b k H"]:
        """f_layer applied to k states per prompt at once.

        engine "fast": one call, the k states' queries against the prompt's single copy of
        the context. engine "tl": the k states are folded into the batch against a repeated
        context (measured 1.3-3x faster than vmapping TransformerLens's block over k).
        """
        b, k, H = z.shape
        if self.kv is not None:
            return _fast.block_many(self.model, self.kv, layer, z)
        if k == 1:
            return self.block(layer, z[:, 0])[:, None]
        rep = lambda t: t.repeat_interleave(k, 0)
        extra = {} if self.upcast is None else {"module": self._module(layer)}
        out = self.backend.block(
            self.model,
            layer,
            z.reshape(b * k, H),
            rep(self.keys[layer]),
            rep(self.values[layer]),
            rep(self.mask),
            **extra,
        )
        return out.reshape(b, k, H)

    def jvp(
        self, layer: int, tangents: Float[torch.Tensor, "b k H"], *, chunk: int = 64
    ) -> Float[torch.Tensor, "b k H"]:
        """A_layer(p) v for k tangents per prompt.

        engine "fast": `fast.block_jvp`, one primal pass and the k tangents as one batch (in
        chunks of `chunk`); engine "tl": `torch.func.jvp` of TransformerLens's block, vmapped
        over the tangents.
        """
        x = self.states[:, layer]
        if self.kv is not None:
            outs = [
                _fast.block_jvp(self.model, self.kv, layer, x, tangents[:, s : s + chunk])[1]
                for s in range(0, tangents.shape[1], chunk)
            ]
            out = torch.cat(outs, dim=1) if len(outs) != 1 else outs[0]
            if not torch.isfinite(out).all():
                raise NonFiniteError(f"jvp: non-finite Jacobian-vector product at layer {layer}")
            return out
        f = lambda x_: self.block(layer, x_)
        self._prewarm(layer)

        def one(v: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(f, (x,), (v,))[1]

        outs = [
            torch.vmap(one, in_dims=1, out_dims=1)(tangents[:, s : s + chunk])
            for s in range(0, tangents.shape[1], chunk)
        ]
        out = torch.cat(outs, dim=1)
        if not torch.isfinite(out).all():
            raise NonFiniteError(f"jvp: non-finite Jacobian-vector product at layer {layer}")
        return out

    def vjp(
        self, layer: int, cotangents: Float[torch.Tensor, "b k H"]
    ) -> Float[torch.Tensor, "b k H"]:
        """A_layer(p)ᵀ w for k cotangents per prompt: one `torch.func.vjp`, vmapped over k.

        The observability recursion w_l = A_lᵀ w_{l+1} runs on this: the readout gradient
        propagated backwards through the frozen-context block maps (`block`, so either engine).
        """
        x = self.states[:, layer]
        self._prewarm(layer)
        _, pull = torch.func.vjp(lambda x_: self.block(layer, x_), x)
        if cotangents.shape[1] == 1:
            out = pull(cotangents[:, 0])[0][:, None]
        else:
            out = torch.vmap(lambda w: pull(w)[0], in_dims=1, out_dims=1)(cotangents)
        if not torch.isfinite(out).all():
            raise NonFiniteError(f"vjp: non-finite vector-Jacobian product at layer {layer}")
        return out

    def central_difference(
        self, layer: int, tangents: Float[torch.Tensor, "b k H"], *, rel_step: float = 1e-3
    ) -> Float[torch.Tensor, "b k H"]:
        """Check for `jvp`: central differences with a step relative to ‖x_l‖ (per prompt).

        An absolute step is wrong on models whose residual norm grows by 1000x over depth.
        """
        x = self.states[:, layer]
        step = (
            rel_step
            * x.norm(dim=-1)[:, None, None]
            / tangents.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        )
        k = tangents.shape[1]
        # the + and - states as one batch of 2k states per prompt
        z = torch.cat([x[:, None, :] + step * tangents, x[:, None, :] - step * tangents], dim=1)
        out = self.block_many(layer, z)
        return (out[:, :k] - out[:, k:]) / (2 * step)

    @property
    def n_layers(self) -> int:
        return self.states.shape[1] - 1

    def __len__(self) -> int:
        return self.states.shape[0]


def build_context(
    model: Model,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    index: torch.Tensor | None = None,
    *,
    engine: str = "auto",
) -> FrozenContext:
    """One full forward of a right-padded batch, keeping the K/V cache and last-token states
    (prepared once for the fast engine: see the module docstring for `engine`)."""
    name = resolve_engine(model, engine)
    be = backend.get(model)
    if index is None:
        index = torch.arange(tokens.shape[0])
    up = upcaster(model)
    if up is not None:
        return _build_upcast(model, tokens, lengths, index, name, up)
    kv = be.build_context(model, tokens, lengths, state_hook_names(model.cfg.n_layers))
    if name == "tl":
        return FrozenContext(model, index, lengths, kv.states, kv.keys, kv.values, kv.mask, be)
    states, mask, keys, values = kv.states, kv.mask, list(kv.keys), list(kv.values)
    del kv  # the lists hold the only references: prepare releases each block's as it goes
    fkv = _fast.prepare(model, keys, values, mask, release=True)
    return FrozenContext(model, index, lengths, states, fkv.keys, fkv.values, mask, be, fkv)


def _build_upcast(model, tokens, lengths, index, name: str, up: BlockUpcast) -> FrozenContext:
    """`build_context` for a half-precision model: a float32 forward one block at a time
    (each block's float32 copy builds its keys/values, prepared at once for the fast engine,
    then released), the states, keys and values kept in float32."""
    be = backend.get(model)
    L, H = model.cfg.n_layers, model.cfg.d_model
    rows = torch.arange(len(tokens), device=tokens.device)
    last = lengths.to(tokens.device) - 1
    resid = be.embed(model, tokens, dtype=up.dtype)
    states = torch.empty(len(tokens), L + 1, H, dtype=up.dtype, device=resid.device)
    states[:, 0] = resid[rows, last]
    keys: list[torch.Tensor | None] = [None] * L
    values: list[torch.Tensor | None] = [None] * L
    parts, mask = [], None
    for layer in range(L):
        out, k, v, mask = be.block_context(model, layer, resid, lengths, module=up.block(layer))
        states[:, layer + 1] = out[rows, last]
        if name == "fast":
            ks: list[torch.Tensor | None] = [None] * L
            vs: list[torch.Tensor | None] = [None] * L
            ks[layer], vs[layer] = k, v
            del k, v
            part = _fast.prepare(model, ks, vs, mask, release=True, upcast=up)
            keys[layer], values[layer] = part.keys[layer], part.values[layer]
            parts.append(part)
        else:
            keys[layer], values[layer] = k, v
        resid = out
    del resid
    fkv = _fast.merge(parts) if name == "fast" else None
    return FrozenContext(
        model, index, lengths, states, tuple(keys), tuple(values), mask, be, fkv, up
    )


class LayerwiseContext:
    """A batch whose frozen context is built one block at a time (the streaming fit).

    Holds the batch's full-sequence residual at the current layer ([b, T, H]) and that ONE
    block's keys/values; moving to the next layer runs the block over the batch, which frees
    the previous block's K/V. Visiting layers 0, 1, ..., L-1 in order costs one forward in
    total; a layer behind the current one is rebuilt from the embedding (the cost of a
    forward up to it). `states[:, l]` (last-token x_l) is filled when layer l is reached and
    `states[:, L]` when block L-1 is built, so after a forward sweep it equals
    `FrozenContext.states`. `block`, `block_many`, `jvp` work at the current layer only (they
    move there first); results are identical to `FrozenContext`'s.

    Memory per batch: b·T·H (residual) + one block's K/V, against L blocks' K/V for a
    `FrozenContext`.
    """

    def __init__(
        self,
        model: Model,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        index,
        *,
        engine: str = "auto",
    ):
        self.model = model
        self.backend = backend.get(model)
        self.engine_name = resolve_engine(model, engine)
        self.tokens = tokens
        self.lengths = lengths
        self.index = index
        L, H = model.cfg.n_layers, model.cfg.d_model
        self.upcast = upcaster(model)
        self.states = torch.zeros(
            len(tokens), L + 1, H, dtype=compute_dtype(model), device=tokens.device
        )
        self._rows = torch.arange(len(tokens), device=tokens.device)
        self._last = lengths.to(tokens.device) - 1
        self._layer = -1  # the block whose K/V are held (-1: none)
        self._resid = None  # input residual of block self._layer + 1 ... see _goto
        self._ctx: FrozenContext | None = None

    def _goto(self, layer: int) -> FrozenContext:
        if layer == self._layer and self._ctx is not None:
            return self._ctx
        up = self.upcast
        if layer <= self._layer or self._resid is None:
            if up is None:
                self._resid = self.backend.embed(self.model, self.tokens)
            else:
                self._resid = self.backend.embed(self.model, self.tokens, dtype=up.dtype)
            self._layer = -1
            self.states[:, 0] = self._resid[self._rows, self._last]
        while self._layer < layer:
            nxt = self._layer + 1
            self._ctx = None  # free the previous block's K/V before building the next
            extra = {} if up is None else {"module": up.block(nxt)}
            out, k, v, mask = self.backend.block_context(
                self.model, nxt, self._resid, self.lengths, **extra
            )
            self.states[:, nxt + 1] = out[self._rows, self._last]
            keys = [None] * self.n_layers
            values = [None] * self.n_layers
            keys[nxt], values[nxt] = k, v
            del k, v
            fkv = None
            if self.engine_name == "fast":
                fkv = _fast.prepare(self.model, keys, values, mask, release=True, upcast=up)
                keys, values = fkv.keys, fkv.values
            self._ctx = FrozenContext(
                self.model,
                self.index,
                self.lengths,
                self.states,
                tuple(keys),
                tuple(values),
                mask,
                self.backend,
                fkv,
                up,
            )
            self._resid = out
            self._layer = nxt
        return self._ctx

    def block(self, layer: int, x):
        return self._goto(layer).block(layer, x)

    def block_many(self, layer: int, z):
        return self._goto(layer).block_many(layer, z)

    def jvp(self, layer: int, tangents, *, chunk: int = 64):
        return self._goto(layer).jvp(layer, tangents, chunk=chunk)

    def vjp(self, layer: int, cotangents):
        return self._goto(layer).vjp(layer, cotangents)

    def done_with(self, layer: int) -> None:
        """The caller is done with block `layer`: free its K/V now (the residual that feeds
        the next block stays), so a layer-major sweep holds one block's K/V per batch only
        while it is used. Asking for `layer` again rebuilds it from the embedding."""
        if layer == self._layer and self._ctx is not None:
            self._ctx = None

    def release(self) -> None:
        """Drop the residual and K/V (the last-token states stay)."""
        self._ctx = self._resid = None
        self._layer = -1

    @property
    def n_layers(self) -> int:
        return self.states.shape[1] - 1

    def __len__(self) -> int:
        return self.states.shape[0]


def context_nbytes(ctx: FrozenContext) -> int:
    """Bytes a frozen context holds: its keys/values (either layout), states and mask."""
    seen: set[int] = set()
    total = 0
    parts = [ctx.states, ctx.mask, *ctx.keys, *ctx.values]
    if ctx.kv is not None:
        parts += [*ctx.kv.keys, *ctx.kv.values, *ctx.kv.allowed]
    for t in parts:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class ContextPool:
    """The prompts' frozen contexts for an algorithm that passes over them many times (the
    calibration's bisection): batches are kept while their total size fits `budget` bytes,
    the rest are rebuilt on every pass (memory O(batch) beyond the budget, one forward per
    batch and pass). Iterate it like `iter_contexts`."""

    def __init__(
        self,
        model: Model,
        prompts: PromptsLike,
        *,
        batch_size: int = 16,
        engine: str = "auto",
        budget: int = 256 * 2**20,
    ):
        check_model(model)
        check_jvp_dtype(model)
        self.model = model
        self.engine = resolve_engine(model, engine)  # resolved once: "fast" or "tl"
        ids = tokenize(model, prompts)
        self.n_prompts = len(ids)
        self.batches = list(
            iter_batches(ids, batch_size, pad=pad_id(model), device=model.cfg.device)
        )
        self.held: list[FrozenContext] = []
        self._spare: FrozenContext | None = None  # the first batch over budget, built already
        used = 0
        for bt in self.batches:
            ctx = self._build(bt)
            used += context_nbytes(ctx)
            if used > budget:
                self._spare = ctx  # served once by the first pass instead of rebuilt
                break
            self.held.append(ctx)

    def _build(self, bt) -> FrozenContext:
        return build_context(self.model, bt.tokens, bt.lengths, bt.index, engine=self.engine)

    def __iter__(self) -> Iterator[FrozenContext]:
        yield from self.held
        for i, bt in enumerate(self.batches[len(self.held) :]):
            spare, self._spare = self._spare, None
            yield spare if i == 0 and spare is not None else self._build(bt)

    def __len__(self) -> int:
        return len(self.batches)


def layerwise_contexts(
    model: Model, prompts: PromptsLike, *, batch_size: int = 16, engine: str = "auto"
) -> list[LayerwiseContext]:
    """One `LayerwiseContext` per batch (nothing is run until a layer is asked for).

    For layer-major algorithms over all prompts (the surrogate fit): peak memory is the
    prompts' residuals at one layer (n·T·H) plus one batch's keys/values of one block,
    instead of every prompt's keys/values at every block.
    """
    check_model(model)
    check_jvp_dtype(model)
    resolve_engine(model, engine)  # a bad engine fails here, before any work
    ids = tokenize(model, prompts)
    return [
        LayerwiseContext(model, bt.tokens, bt.lengths, bt.index, engine=engine)
        for bt in iter_batches(ids, batch_size, pad=pad_id(model), device=model.cfg.device)
    ]


def iter_contexts(
    model: Model,
    prompts: PromptsLike,
    *,
    batch_size: int = 16,
    progress: bool | str = False,
    engine: str = "auto",
) -> Iterator[FrozenContext]:
    """Frozen contexts of the prompts, batch by batch (memory: one batch's K/V at a time).

    engine: "auto" (default), "fast" or "tl" (see the module docstring)."""
    check_model(model)
    check_jvp_dtype(model)
    resolve_engine(model, engine)
    ids = tokenize(model, prompts)
    batches = list(iter_batches(ids, batch_size, pad=pad_id(model), device=model.cfg.device))
    desc = progress if isinstance(progress, str) else "batches"
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        yield build_context(model, batch.tokens, batch.lengths, batch.index, engine=engine)


__all__ = [
    "ENGINES",
    "ContextPool",
    "FrozenContext",
    "LayerwiseContext",
    "build_context",
    "BlockUpcast",
    "HALF_DTYPES",
    "check_jvp_dtype",
    "compute_dtype",
    "context_nbytes",
    "iter_contexts",
    "layerwise_contexts",
    "resolve_engine",
    "upcast_stats",
    "upcaster",
]
