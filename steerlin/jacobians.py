"""The frozen-context last-token block maps f_l, their Jacobians through JVPs, and readouts.

Definitions (used everywhere in steerlin):
    x_l     last real token's residual entering block l (l = 0..L-1); x_L the final resid_post.
    f_l     block l applied to the last token only, every earlier position's keys and values
            fixed to the unperturbed run: x_{l+1} = f_l(x_l). In a causal decoder this is exact,
            since a change to the last token never reaches an earlier position.
    A_l(p)  ∂f_l/∂x_l at the clean state of prompt p, used only through JVPs.

One evaluation of f_l is a single-token pass of TransformerLens's own block against the cached
keys/values of the context (its `past_kv_cache_entry` path), so rotary embeddings, q/k norms,
pre/post norms, GQA and local/global attention are all the block's own. Batches are padded on
the right for the one full forward; the cached context is then right-aligned and masked, and
the clean last token's own key/value is replaced by the one the perturbed state produces.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.utilities.activation_functions import apply_softcap

from .errors import InputError, NonFiniteError
from .hooks import check_model
from .trajectory import PromptsLike, iter_batches, pad_id, state_hook_names, tokenize


@dataclass(frozen=True)
class FrozenContext:
    """One right-padded batch with its clean last-token states and cached keys/values.

    Attributes:
        index: rows -> positions in the caller's prompt list.
        lengths: tokens per prompt.
        states: Float[b, L+1, H] clean x_0..x_L at the last real token.
        keys, values: per block, Float[b, T, kv_heads, d_head], the context's cached K/V
            (pre-rotary, post q/k-norm, exactly what TransformerLens caches).
        mask: Int[b, T+1] 1 on the context (right-aligned: indices T-len+1..T-1) and on the
            appended last token at index T; 0 on the left padding.
    """

    model: HookedTransformer
    index: Int[torch.Tensor, " b"]
    lengths: Int[torch.Tensor, " b"]
    states: Float[torch.Tensor, "b Lp1 H"]
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    mask: Int[torch.Tensor, "b Tp1"]

    def block(self, layer: int, x: Float[torch.Tensor, "b H"]) -> Float[torch.Tensor, "b H"]:
        """f_layer(x): a pure single-token pass of block `layer` against the frozen context."""
        entry = TransformerLensKeyValueCacheEntry(self.keys[layer], self.values[layer], frozen=True)
        out = self.model.blocks[layer](
            x[:, None, :], past_kv_cache_entry=entry, attention_mask=self.mask
        )
        return out[:, 0, :]

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

        The k states are folded into the batch against a repeated context: measured 1.3-3x
        faster than vmapping TransformerLens's block over k on Gemma-3-270m (CPU).
        """
        b, k, H = z.shape
        if k == 1:
            return self.block(layer, z[:, 0])[:, None]
        rep = lambda t: t.repeat_interleave(k, 0)
        entry = TransformerLensKeyValueCacheEntry(
            rep(self.keys[layer]), rep(self.values[layer]), frozen=True
        )
        out = self.model.blocks[layer](
            z.reshape(b * k, 1, H), past_kv_cache_entry=entry, attention_mask=rep(self.mask)
        )
        return out.reshape(b, k, H)

    def jvp(
        self, layer: int, tangents: Float[torch.Tensor, "b k H"], *, chunk: int = 64
    ) -> Float[torch.Tensor, "b k H"]:
        """A_layer(p) v for k tangents per prompt: `torch.func.jvp` vmapped over tangents."""
        x = self.states[:, layer]
        f = lambda x_: self.block(layer, x_)

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
        z = x[:, None, :] + step * tangents
        plus = self.block_many(layer, z)
        minus = self.block_many(layer, x[:, None, :] - step * tangents)
        return (plus - minus) / (2 * step)

    @property
    def n_layers(self) -> int:
        return self.states.shape[1] - 1

    def __len__(self) -> int:
        return self.states.shape[0]


def build_context(
    model: HookedTransformer,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    index: torch.Tensor | None = None,
) -> FrozenContext:
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

    names = state_hook_names(cfg.n_layers)
    with torch.no_grad():
        model.run_with_hooks(
            tokens,
            return_type=None,
            attention_mask=torch.ones_like(tokens),
            past_kv_cache=cache,
            fwd_hooks=[(n, make(j)) for j, n in enumerate(names)],
        )
    states = torch.stack([got[j] for j in range(len(names))], dim=1)
    # Right-align each context (positions 0..len-2) so it ends at index T-1 and the appended
    # token sits at index T: TransformerLens measures causal and sliding-window distances in
    # cache indices, which then equal true token distances for every prompt of the batch.
    shift = T - last  # [b] context of length last -> indices shift..T-1
    pos = torch.arange(T, device=tokens.device)
    src = (pos[None, :] - shift[:, None]).clamp_min(0)  # [b, T]
    ctx_mask = (pos[None, :] >= shift[:, None]).long()
    mask = torch.cat([ctx_mask, torch.ones(b, 1, dtype=torch.long, device=tokens.device)], dim=1)

    def align(t: torch.Tensor) -> torch.Tensor:
        idx = src[:, :, None, None].expand(-1, -1, *t.shape[2:])
        return torch.gather(t.detach(), 1, idx) * ctx_mask[:, :, None, None].to(t.dtype)

    keys = tuple(align(e.past_keys) for e in cache.entries)
    values = tuple(align(e.past_values) for e in cache.entries)
    if index is None:
        index = torch.arange(b)
    return FrozenContext(model, index, lengths, states, keys, values, mask)


def iter_contexts(
    model: HookedTransformer,
    prompts: PromptsLike,
    *,
    batch_size: int = 16,
    progress: bool | str = False,
) -> Iterator[FrozenContext]:
    """Frozen contexts of the prompts, batch by batch (memory: one batch's K/V at a time)."""
    check_model(model)
    ids = tokenize(model, prompts)
    batches = list(iter_batches(ids, batch_size, pad=pad_id(model), device=model.cfg.device))
    desc = progress if isinstance(progress, str) else "batches"
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        yield build_context(model, batch.tokens, batch.lengths, batch.index)


# ----------------------------------------------------------------------------------- readouts

ReadoutKind = Literal["concept", "logits"]


@dataclass(frozen=True)
class Readout:
    """The scalar y read from x_L.

    "concept": y = <direction, x_L> with direction = unit_L (ConceptDirections).
    "logits": y = logit(pos_token) - logit(neg_token) through ln_final and the unembedding
    (with the model's logit soft-cap, if any).
    """

    kind: ReadoutKind
    direction: Float[torch.Tensor, " H"] | None = None
    pos_token: int | None = None
    neg_token: int | None = None

    def __call__(self, model: HookedTransformer, x: Float[torch.Tensor, "... H"]) -> torch.Tensor:
        if self.kind == "concept":
            return x @ self.direction.to(x)
        resid = model.ln_final(x[..., None, :])[..., 0, :] if model.cfg.normalization_type else x
        cols = [self.pos_token, self.neg_token]
        logits = resid @ model.unembed.W_U[:, cols] + model.unembed.b_U[cols]
        logits = apply_softcap(logits, model.cfg.output_logits_soft_cap)
        return logits[..., 0] - logits[..., 1]

    def gradient(self, model: HookedTransformer, x: Float[torch.Tensor, "b H"]) -> torch.Tensor:
        """∂y/∂x_L at each row of x: the readout's linearisation (constant for "concept")."""
        if self.kind == "concept":
            return self.direction.to(x).expand_as(x).clone()
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self(model, xg).sum(), xg)
        return g

    def to_meta(self) -> dict:
        return {"kind": self.kind, "pos_token": self.pos_token, "neg_token": self.neg_token}


def make_readout(
    model: HookedTransformer,
    kind: str | Readout,
    unit_final: torch.Tensor,
    *,
    label_words: Sequence[str] | Sequence[int] | None = None,
) -> Readout:
    """Build a Readout: "concept" from unit_L, "logits" from two label words or token ids."""
    if isinstance(kind, Readout):
        return kind
    if kind == "concept":
        return Readout("concept", direction=unit_final)
    if kind != "logits":
        raise InputError(f"readout: expected 'concept' or 'logits', got {kind!r}")
    words = tuple(label_words) if label_words is not None else (" positive", " negative")
    if len(words) != 2:
        raise InputError(f"label_words: expected (positive, negative), got {words!r}")
    ids = []
    for w in words:
        if hasattr(w, "__index__") and not isinstance(w, bool | str):
            ids.append(int(w.__index__()))
            continue
        if model.tokenizer is None:
            raise InputError("label_words: the model has no tokenizer; pass two token ids")
        toks = model.to_tokens(w, prepend_bos=False)[0].tolist()
        if len(toks) != 1:
            raise InputError(
                f"label_words: {w!r} is {len(toks)} tokens for this tokenizer; the logit "
                "readout needs single-token words"
            )
        ids.append(toks[0])
    for t in ids:
        if not 0 <= t < model.cfg.d_vocab:
            raise InputError(f"label_words: token id {t} outside 0..{model.cfg.d_vocab - 1}")
    return Readout("logits", pos_token=ids[0], neg_token=ids[1])


def per_prompt_gains(
    ctx: FrozenContext,
    b: Float[torch.Tensor, "L H"],
    readout: Readout,
) -> Float[torch.Tensor, "b L"]:
    """Exact first-order gains ∂y(p)/∂u_l for every layer at once: ONE backward pass.

    u_l enters as x_l + u_l b_l on the single-token chain x_{l+1} = f_l(x_l), so the gradient
    of y with respect to the (zero) amplitudes u[p, l] is the per-prompt gain.
    """
    model = ctx.model
    L = ctx.n_layers
    with torch.enable_grad():
        u = torch.zeros(
            len(ctx), L, dtype=ctx.states.dtype, device=ctx.states.device, requires_grad=True
        )
        x = ctx.states[:, 0]
        for layer in range(L):
            x = ctx.block(layer, x + u[:, layer, None] * b[layer].to(x))
        y = readout(model, x)
        (g,) = torch.autograd.grad(y.sum(), u)
    if not torch.isfinite(g).all():
        bad = (~torch.isfinite(g)).any(0).nonzero().flatten().tolist()
        raise NonFiniteError(f"exact gains: non-finite gradient at layers {bad}")
    return g.detach()


def scan_context(
    ctx: FrozenContext,
    b: Float[torch.Tensor, "L H"],
    readout: Readout,
    eps: float,
    layers: Sequence[int],
) -> Float[torch.Tensor, "b nl 2"]:
    """Full-model readouts with ±eps·b_l injected at each listed layer (single-token path).

    All perturbed trajectories alive at block m are pushed through f_m together (vmapped), so
    injecting at layer l costs L - l single-token block passes.
    """
    model = ctx.model
    L = ctx.n_layers
    layers = list(layers)
    z = ctx.states[:, :0]  # [b, 0, H] perturbed states alive so far
    order: list[int] = []
    with torch.no_grad():
        for m in range(L):
            if m in layers:
                x = ctx.states[:, m]
                bm = b[m].to(x)
                new = torch.stack([x + eps * bm, x - eps * bm], dim=1)
                z = torch.cat([z, new], dim=1)
                order.append(m)
            if z.shape[1]:
                z = ctx.block_many(m, z)
        y = readout(model, z)  # [b, 2 * nl]
    y = y.reshape(len(ctx), len(order), 2)
    perm = [order.index(l) for l in layers]
    return y[:, perm]


__all__ = [
    "FrozenContext",
    "build_context",
    "iter_contexts",
    "Readout",
    "make_readout",
    "per_prompt_gains",
    "scan_context",
]
