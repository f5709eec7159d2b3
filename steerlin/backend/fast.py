"""The frozen-context engine: one transformer block for the last token against a cached context.

`FrozenContext` evaluates f_l (block l for the last token, every earlier position's keys and
values frozen to the clean run) thousands of times per prompt batch: the scan pushes 2 x (l+1)
perturbed trajectories through each block, the fit d tangents. TransformerLens's own block
(`past_kv_cache_entry` path) recomputes, on every call, work that depends only on the context:
it rotates every cached key again (it caches keys before rotary), repeats the K/V heads for
grouped-query attention, and the caller repeats the whole context once per trajectory.

This engine does that work once per prompt batch and layer (`prepare`): the context keys are
rotated at their true positions (after TransformerLens's q/k-norm), kept with their K/V heads
unexpanded, and the padding / causal / sliding-window mask is built once. A call
(`block_many`) then takes k states per prompt, Float[b, k, H], and computes one query per
state: the queries of a prompt, shaped [b, kv_heads, k * group, d_head], are multiplied with
that prompt's single copy of the keys [b, kv_heads, T, d_head] read in place (no per-state or
per-head copies), and the state's own key/value (from its perturbed input) is appended as one
extra softmax column. Everything else follows TransformerLens's block operation by operation
(norms, attention scale, score soft-cap, post-norms, MLP), so results equal its block to
float round-off (tests/test_engine.py).

All functions are pure (no hooks, no in-place writes on inputs, no module state): they work
under `torch.func.jvp`, `vmap`, `linearize` and autograd. A model with a feature this engine
does not implement raises `UnsupportedFeatureError` naming it; callers then use the reference
path (`engine="tl"`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer
from transformer_lens.components import (
    Attention,
    GroupedQueryAttention,
    LayerNorm,
    LayerNormPre,
    RMSNorm,
    RMSNormPre,
)
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.components.mlps.mlp import MLP
from transformer_lens.utilities.activation_functions import apply_softcap

from ..errors import UnsupportedFeatureError

# ------------------------------------------------------------------------------ feature check

# config flags the engine does not implement (any value but None/False): flag -> description
_FLAGS = {
    "use_attn_in": "use_attn_in (per-head attention inputs)",
    "use_split_qkv_input": "use_split_qkv_input (split q/k/v inputs)",
    "parallel_attn_mlp": "parallel_attn_mlp (GPT-J style parallel block)",
    "use_logn_attn": "use_logn_attn (Qwen log-n query scaling)",
    "clip_qkv": "clip_qkv (clamped q/k/v)",
    "use_attention_sinks": "use_attention_sinks (learned sink logits)",
    "load_in_4bit": "load_in_4bit (quantised weights)",
    "use_dynamic_ntk_rope": "use_dynamic_ntk_rope (length-dependent rotary base)",
}
_NORMS = (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre, torch.nn.Identity)


def unsupported_feature(model: HookedTransformer) -> str | None:
    """The first feature of `model` the fast engine does not implement, or None."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    for name, what in _FLAGS.items():
        if getattr(cfg, name, None) not in (None, False):
            return what
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return f"post-norm architecture {cfg.original_architecture}"
    if cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"):
        return f"full-width q/k norm of {cfg.original_architecture}"
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        return f"positional_embedding_type={cfg.positional_embedding_type!r}"
    if cfg.attention_dir != "causal":
        return f"attention_dir={cfg.attention_dir!r} (the frozen context needs a causal model)"
    if cfg.is_layer_norm_activation():
        return f"act_fn={cfg.act_fn!r} (layer-norm activation)"
    for i, blk in enumerate(model.blocks):
        if type(blk.attn) not in (Attention, GroupedQueryAttention):
            return f"attention module {type(blk.attn).__name__} in block {i}"
        if not cfg.attn_only and type(blk.mlp) not in (MLP, GatedMLP):
            return f"MLP module {type(blk.mlp).__name__} in block {i}"
        norms = [blk.ln1] + ([] if cfg.attn_only else [blk.ln2])
        if cfg.use_normalization_before_and_after:
            norms += [blk.ln1_post] + ([] if cfg.attn_only else [blk.ln2_post])
        for norm in norms:
            if type(norm) not in _NORMS:
                return f"normalisation module {type(norm).__name__} in block {i}"
    return None


def check_supported(model: HookedTransformer) -> None:
    """Raise UnsupportedFeatureError naming the first feature the engine does not implement."""
    what = unsupported_feature(model)
    if what is not None:
        raise UnsupportedFeatureError(
            f"engine='fast': {what} is not implemented for {model.cfg.model_name!r}; "
            "use engine='tl' (TransformerLens's own block)"
        )


# ------------------------------------------------------------------------------ weights


@dataclass(frozen=True)
class _LayerWeights:
    """Block weights in the layouts the single-token path multiplies with (views or copies
    made once per model; the model itself is never modified)."""

    W_qkv: Float[torch.Tensor, "H qkv"]  # [W_Q | W_K | W_V] heads flattened, kv heads unexpanded
    b_qkv: Float[torch.Tensor, " qkv"]
    W_O: Float[torch.Tensor, "hd H"]  # view of W_O [heads, d_head, H] as [(heads d_head), H]
    b_O: Float[torch.Tensor, " H"]


_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _param_key(model: HookedTransformer) -> tuple:
    """Identity and version of every attention weight, to notice a model edited in place."""
    out = []
    for blk in model.blocks:
        a = blk.attn
        for t in (a.W_Q, a.b_Q, _raw(a, "W_K"), _raw(a, "b_K"), _raw(a, "W_V"), _raw(a, "b_V")):
            out.append((t.data_ptr(), t._version, t.dtype, t.device))
    return tuple(out)


def _raw(attn, name: str) -> torch.Tensor:
    """Unexpanded K/V weights (GroupedQueryAttention keeps them as `_W_K` etc.)."""
    return (
        getattr(attn, "_" + name)
        if isinstance(attn, GroupedQueryAttention)
        else getattr(attn, name)
    )


def layer_weights(model: HookedTransformer) -> list[_LayerWeights]:
    """The fused projection weights of every block, cached per model (rebuilt if edited)."""
    key = _param_key(model)
    hit = _WEIGHTS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = [fuse_weights(blk, model.cfg.d_model) for blk in model.blocks]
    _WEIGHTS[model] = (key, out)
    return out


def fuse_weights(blk, H: int) -> _LayerWeights:
    """One block's fused projection weights (in the block's own dtype)."""
    with torch.no_grad():
        a = blk.attn
        mats = [a.W_Q, _raw(a, "W_K"), _raw(a, "W_V")]  # [heads, H, d_head]
        W = torch.cat([m.permute(1, 0, 2).reshape(H, -1) for m in mats], dim=1)
        b = torch.cat([a.b_Q.reshape(-1), _raw(a, "b_K").reshape(-1), _raw(a, "b_V").reshape(-1)])
        return _LayerWeights(
            W_qkv=W.contiguous(),
            b_qkv=b.contiguous(),
            W_O=a.W_O.detach().reshape(-1, H),
            b_O=a.b_O.detach(),
        )


# ------------------------------------------------------------------------------ the context


@dataclass(frozen=True)
class FastKV:
    """One prompt batch's context, prepared once for every later single-token call.

    keys[l], values[l]: Float[b, kv_heads, T, d_head], keys rotated at their true positions
        (after q/k-norm), kv heads unexpanded; left padding is zero.
    allowed[l]: Bool[b, 1, 1, T], which context slots the last token may attend to at block l
        (not padding; inside the sliding window on local layers).
    cos[l], sin[l]: Float[b, 1, 1, rotary_dim], the rotary angle of the last token's true
        position at block l (local and global layers use different bases), or None.
    weights: every block's fused weights (`layer_weights`); empty with `upcast`.
    upcast: for a half-precision model, the source of float32 block copies
        (`steerlin.frozen.BlockUpcast`: `.block(layer)`, `.derived(layer, name, build)`): every
        block module and weight is then read from the current block's float32 copy.
    """

    keys: tuple[torch.Tensor | None, ...]  # None: a block not held (layer-wise contexts)
    values: tuple[torch.Tensor | None, ...]
    allowed: tuple[torch.Tensor | None, ...]
    cos: tuple[torch.Tensor | None, ...]
    sin: tuple[torch.Tensor | None, ...]
    weights: tuple[_LayerWeights, ...]
    upcast: Any = None

    @property
    def n_layers(self) -> int:
        return len(self.keys)


def _blk(model: HookedTransformer, kv: FastKV, layer: int):
    """Block `layer`'s module: the model's, or its float32 copy for a half-precision model."""
    return model.blocks[layer] if kv.upcast is None else kv.upcast.block(layer)


def _w(model: HookedTransformer, kv: FastKV, layer: int) -> _LayerWeights:
    """Block `layer`'s fused weights (from the float32 copy for a half-precision model)."""
    if kv.upcast is None:
        return kv.weights[layer]
    H = model.cfg.d_model
    return kv.upcast.derived(layer, "fast_weights", lambda blk: fuse_weights(blk, H))


def _heads(model: HookedTransformer, kv: FastKV, layer: int) -> tuple:
    """What `attention` and its JVP read for block `layer`: (attention module, fused weights,
    context keys and values [b, kvh, T, dh], query heads nh, kv heads kvh, query heads per kv
    head g, head size dh, context length T)."""
    K, V = kv.keys[layer], kv.values[layer]
    nh, kvh = model.cfg.n_heads, K.shape[1]
    attn = _blk(model, kv, layer).attn
    return attn, _w(model, kv, layer), K, V, nh, kvh, nh // kvh, model.cfg.d_head, K.shape[2]


def _split_heads(qkv: torch.Tensor, nh: int, kvh: int, dh: int) -> tuple:
    """A fused projection [..., (nh + 2 kvh) dh] -> q [..., nh, dh], k and v [..., kvh, dh]."""
    return (
        qkv[..., : nh * dh].unflatten(-1, (nh, dh)),
        qkv[..., nh * dh : (nh + kvh) * dh].unflatten(-1, (kvh, dh)),
        qkv[..., (nh + kvh) * dh :].unflatten(-1, (kvh, dh)),
    )


def merge(parts: Sequence[FastKV]) -> FastKV:
    """One FastKV from per-block ones (part l holds block l; built one block at a time)."""
    L = len(parts)
    pick = lambda f: tuple(getattr(parts[i], f)[i] for i in range(L))
    return FastKV(
        pick("keys"),
        pick("values"),
        pick("allowed"),
        pick("cos"),
        pick("sin"),
        parts[0].weights,
        parts[0].upcast,
    )


def _rotary_rows(attn, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TransformerLens's rotary sin/cos rows at `positions` (its table, or the same formula
    if the table is shorter; the module's buffers are never extended here)."""
    need = int(positions.max()) + 1 if positions.numel() else 1
    sin, cos = attn.rotary_sin, attn.rotary_cos
    if need > cos.shape[0]:
        sin, cos = attn.calculate_sin_cos_rotary(
            attn.cfg.rotary_dim, need, base=attn._rotary_base(), dtype=attn.cfg.dtype
        )
        sin, cos = sin.to(attn.rotary_sin.device), cos.to(attn.rotary_cos.device)
    return sin[positions], cos[positions]


def prepare(
    model: HookedTransformer,
    keys: Sequence[torch.Tensor | None],  # None: a block not held; released in place
    values: Sequence[torch.Tensor | None],
    mask: Int[torch.Tensor, "b Tp1"],
    *,
    release: bool = False,
    upcast: Any = None,
) -> FastKV:
    """Rotate, lay out and mask the cached context once.

    Args:
        keys, values: per block Float[b, T, kv_heads, d_head], TransformerLens's cached K/V
            (pre-rotary, post q/k-norm), right-aligned so the context ends at slot T-1; None
            for a block not held (the layer-wise contexts of the streaming fit hold one), whose
            entries are then None too.
        mask: Int[b, T+1], 1 on the context and on the appended last token (slot T), 0 on
            the left padding (FrozenContext.mask).
        release: `keys` and `values` are lists the caller hands over: each block's entries
            are set to None once prepared, so both layouts are never held for every block.
        upcast: for a half-precision model, the float32 block copies (see `FastKV`); the
            keys are then rotated with the copy's float32 rotary tables.
    """
    check_supported(model)
    cfg = model.cfg
    held = [k for k in keys if k is not None]
    if not held:
        raise ValueError("prepare: no block's keys/values given")
    mask = mask.to(held[0].device)
    ctx = mask[:, :-1]  # [b, T]
    T = ctx.shape[1]
    allowed_global = ctx.bool()[:, None, None, :]
    slots = torch.arange(T, device=ctx.device)
    pos_last = (mask.sum(1) - 1).long()  # true position of the last token
    ks, vs, allowed, coss, sins = [], [], [], [], []
    with torch.no_grad():
        for layer in range(cfg.n_layers):
            if keys[layer] is None:
                for out in (ks, vs, allowed, coss, sins):
                    out.append(None)
                continue
            attn = (model.blocks[layer] if upcast is None else upcast.block(layer)).attn
            k = keys[layer].detach()
            if cfg.positional_embedding_type == "rotary":
                # exactly TransformerLens's rotation of the cached keys (positions from the mask)
                k = attn.apply_rotary(k, 0, ctx)
                sin, cos = _rotary_rows(attn, pos_last)
                coss.append(cos[:, None, None, :].contiguous())
                sins.append(sin[:, None, None, :].contiguous())
            else:
                coss.append(None)
                sins.append(None)
            ks.append(k.permute(0, 2, 1, 3).contiguous())
            vs.append(values[layer].detach().permute(0, 2, 1, 3).contiguous())
            if release:
                keys[layer] = values[layer] = None
            del k
            if attn.attn_type == "local":
                # the query sits at slot T: keys strictly within window_size of it
                window = slots > T - cfg.window_size
                allowed.append(allowed_global & window[None, None, None, :])
            else:
                allowed.append(allowed_global)
    weights = () if upcast is not None else tuple(layer_weights(model))
    return FastKV(tuple(ks), tuple(vs), tuple(allowed), tuple(coss), tuple(sins), weights, upcast)


# ------------------------------------------------------------------------------ the block


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    """TransformerLens's LayerNorm / LayerNormPre / RMSNorm / RMSNormPre / Identity, same
    operations in the same order, without hook points."""
    if isinstance(module, torch.nn.Identity):
        return x
    cfg = module.cfg
    in_dtype = cfg.dtype
    if in_dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    if isinstance(module, (LayerNorm, LayerNormPre)):
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + module.eps).sqrt()
    x = (x / scale).to(in_dtype)
    if isinstance(module, LayerNorm):
        return x * module.w + module.b
    if isinstance(module, RMSNorm):
        return x * module.w
    return x


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg) -> torch.Tensor:
    """TransformerLens's apply_rotary for given cos/sin rows, written without in-place ops."""
    r = cfg.rotary_dim
    x_rot, x_pass = x[..., :r], x[..., r:]
    if cfg.rotary_adjacent_pairs:
        pairs = x_rot.unflatten(-1, (r // 2, 2))
        flip = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    else:
        n = r // 2
        flip = torch.cat([-x_rot[..., n:], x_rot[..., :n]], dim=-1)
    return torch.cat([x_rot * cos + flip * sin, x_pass], dim=-1)


def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """TransformerLens's MLP / GatedMLP (x @ W + b; no per-call weight copies)."""
    if isinstance(mlp, GatedMLP):
        pre = x @ mlp.W_gate
        post = mlp.act_fn(pre) * (x @ mlp.W_in) + mlp.b_in
        return post @ mlp.W_out + mlp.b_out
    return mlp.act_fn(x @ mlp.W_in + mlp.b_in) @ mlp.W_out + mlp.b_out


def attention(
    model: HookedTransformer,
    kv: FastKV,
    layer: int,
    h: Float[torch.Tensor, "b k H"],
) -> Float[torch.Tensor, "b k H"]:
    """Attention output of block `layer` for k normalised last-token inputs per prompt.

    The context keys/values are read in place and shared by the k states; each state's own
    key/value (computed from h) is the last softmax column.
    """
    cfg = model.cfg
    attn, w, K, V, nh, kvh, g, dh, T = _heads(model, kv, layer)  # K, V: [b, kvh, T, dh]
    b, k, _ = h.shape
    # q [b, k, nh, dh]; the states' own key and value [b, k, kvh, dh]
    q, k_new, v_new = _split_heads(h @ w.W_qkv + w.b_qkv, nh, kvh, dh)
    if cfg.use_qk_norm:
        q = _norm(attn.q_norm, q)
        k_new = _norm(attn.k_norm, k_new)
    if kv.cos[layer] is not None:
        cos, sin = kv.cos[layer], kv.sin[layer]  # [b, 1, 1, r]
        q = _rotate(q, cos, sin, cfg)
        k_new = _rotate(k_new, cos, sin, cfg)
    # queries grouped by their kv head: query head j uses kv head j // g (repeat_interleave)
    qg = q.unflatten(2, (kvh, g))  # [b, k, kvh, g, dh]
    scale = attn.attn_scale
    s_ctx = qg.permute(0, 2, 1, 3, 4).reshape(b, kvh, k * g, dh) @ K.transpose(-1, -2)
    s_ctx = s_ctx / scale  # [b, kvh, k g, T]
    s_self = (qg * k_new[:, :, :, None, :]).sum(-1) / scale  # [b, k, kvh, g]
    s_self = s_self.permute(0, 2, 1, 3).reshape(b, kvh, k * g, 1)
    cap = cfg.attn_scores_soft_cap
    s_ctx = apply_softcap(s_ctx, cap)
    s_self = apply_softcap(s_self, cap)
    neg = torch.tensor(float("-inf"), dtype=s_ctx.dtype, device=s_ctx.device)
    s_ctx = torch.where(kv.allowed[layer], s_ctx, neg)
    p = torch.softmax(torch.cat([s_ctx, s_self], dim=-1), dim=-1)  # [b, kvh, k g, T + 1]
    z = p[..., :T] @ V  # [b, kvh, k g, dh]
    z = (
        z.unflatten(2, (k, g))
        + p[..., T:].unflatten(2, (k, g)) * v_new.permute(0, 2, 1, 3)[:, :, :, None, :]
    )  # [b, kvh, k, g, dh]
    z = z.permute(0, 2, 1, 3, 4).reshape(b, k, nh * dh)
    return z @ w.W_O + w.b_O


def block_many(
    model: HookedTransformer, kv: FastKV, layer: int, z: Float[torch.Tensor, "b k H"]
) -> Float[torch.Tensor, "b k H"]:
    """f_layer for k last-token states per prompt: TransformerLens's block, operation by
    operation, with the single-query attention above."""
    cfg = model.cfg
    blk = _blk(model, kv, layer)
    attn_out = attention(model, kv, layer, _norm(blk.ln1, z))
    if cfg.use_normalization_before_and_after:
        attn_out = _norm(blk.ln1_post, attn_out)
    if cfg.attn_only:
        return z + attn_out
    mid = z + attn_out
    mlp_out = _mlp(blk.mlp, _norm(blk.ln2, mid))
    if cfg.use_normalization_before_and_after:
        mlp_out = _norm(blk.ln2_post, mlp_out)
    return mid + mlp_out


def block(
    model: HookedTransformer, kv: FastKV, layer: int, x: Float[torch.Tensor, "b H"]
) -> Float[torch.Tensor, "b H"]:
    """f_layer(x) for one state per prompt."""
    return block_many(model, kv, layer, x[:, None, :])[:, 0, :]


# ------------------------------------------------------------------------------ forward mode
#
# block_jvp: the primal for ONE state per prompt and the tangents of k directions, written out
# (the derivative of each operation above). torch.func.jvp under vmap computes the same numbers
# but pays a fixed cost per call (dual-tensor bookkeeping, zero tangents of every weight) that
# is ~4x the primal's on Gemma-3-270m; here the primal runs once on b rows and the tangents are
# plain batched products on b*k rows, the context keys/values still read in place.


def _norm_jvp(module, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """_norm(module, x) and its derivative along dx (x [..., 1, n] broadcasts over dx's k)."""
    if isinstance(module, torch.nn.Identity):
        return x, dx
    if isinstance(module, (LayerNorm, LayerNormPre)):
        x = x - x.mean(-1, keepdim=True)
        dx = dx - dx.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + module.eps).sqrt()
    y = x / scale
    dy = (dx - y * (y * dx).mean(-1, keepdim=True)) / scale
    if isinstance(module, LayerNorm):
        return y * module.w + module.b, dy * module.w
    if isinstance(module, RMSNorm):
        return y * module.w, dy * module.w
    return y, dy


def _softcap_jvp(s: torch.Tensor, ds: torch.Tensor, cap) -> tuple[torch.Tensor, torch.Tensor]:
    if cap is None or not cap > 0:
        return s, ds
    t = torch.tanh(s / cap)
    return cap * t, (1 - t * t) * ds


def _act_and_slope(act, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """act(pre) and act'(pre) for an elementwise activation (one forward-mode pass)."""
    return torch.func.jvp(act, (pre,), (torch.ones_like(pre),))


def _mlp_jvp(mlp, h: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(mlp, GatedMLP):
        pre, dpre = h @ mlp.W_gate, dh @ mlp.W_gate
        lin, dlin = h @ mlp.W_in, dh @ mlp.W_in
        a, slope = _act_and_slope(mlp.act_fn, pre)
        post = a * lin + mlp.b_in
        dpost = slope * dpre * lin + a * dlin
        return post @ mlp.W_out + mlp.b_out, dpost @ mlp.W_out
    pre, dpre = h @ mlp.W_in + mlp.b_in, dh @ mlp.W_in
    a, slope = _act_and_slope(mlp.act_fn, pre)
    return a @ mlp.W_out + mlp.b_out, (slope * dpre) @ mlp.W_out


def _attention_jvp(
    model: HookedTransformer, kv: FastKV, layer: int, h: torch.Tensor, dh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """attention() for h [b, 1, H] and its derivative along dh [b, k, H]."""
    cfg = model.cfg
    attn, w, K, V, nh, kvh, g, dh_, T = _heads(model, kv, layer)  # K, V: [b, kvh, T, dh]
    b, k, _ = dh.shape
    q, kn, vn = _split_heads(h @ w.W_qkv + w.b_qkv, nh, kvh, dh_)
    dq, dkn, dvn = _split_heads(dh @ w.W_qkv, nh, kvh, dh_)
    if cfg.use_qk_norm:
        q, dq = _norm_jvp(attn.q_norm, q, dq)
        kn, dkn = _norm_jvp(attn.k_norm, kn, dkn)
    if kv.cos[layer] is not None:
        cos, sin = kv.cos[layer], kv.sin[layer]
        q, dq = _rotate(q, cos, sin, cfg), _rotate(dq, cos, sin, cfg)
        kn, dkn = _rotate(kn, cos, sin, cfg), _rotate(dkn, cos, sin, cfg)
    qg, dqg = q.unflatten(2, (kvh, g)), dq.unflatten(2, (kvh, g))  # [b, 1|k, kvh, g, dh]
    scale = attn.attn_scale
    Kt = K.transpose(-1, -2)
    # scores kept as [b, kvh, 1|k, g, T] so the primal broadcasts over the k tangents
    s_ctx = (qg.permute(0, 2, 1, 3, 4).reshape(b, kvh, g, dh_) @ Kt / scale)[:, :, None]
    ds_ctx = (dqg.permute(0, 2, 1, 3, 4).reshape(b, kvh, k * g, dh_) @ Kt / scale).unflatten(
        2, (k, g)
    )
    s_self = (qg * kn[:, :, :, None, :]).sum(-1) / scale  # [b, 1, kvh, g]
    ds_self = ((dqg * kn[:, :, :, None, :]).sum(-1) + (qg * dkn[:, :, :, None, :]).sum(-1)) / scale
    s_self = s_self.permute(0, 2, 1, 3)[..., None]  # [b, kvh, 1, g, 1]
    ds_self = ds_self.permute(0, 2, 1, 3)[..., None]  # [b, kvh, k, g, 1]
    cap = cfg.attn_scores_soft_cap
    s_ctx, ds_ctx = _softcap_jvp(s_ctx, ds_ctx, cap)
    s_self, ds_self = _softcap_jvp(s_self, ds_self, cap)
    allowed = kv.allowed[layer][:, :, None]  # [b, 1, 1, 1, T]
    neg = torch.tensor(float("-inf"), dtype=s_ctx.dtype, device=s_ctx.device)
    s_ctx = torch.where(allowed, s_ctx, neg)
    ds_ctx = torch.where(allowed, ds_ctx, torch.zeros((), dtype=ds_ctx.dtype, device=ds_ctx.device))
    p_ = torch.softmax(torch.cat([s_ctx, s_self], dim=-1), dim=-1)  # [b, kvh, 1, g, T + 1]
    dS = torch.cat([ds_ctx, ds_self], dim=-1)  # [b, kvh, k, g, T + 1]
    dp = p_ * (dS - (p_ * dS).sum(-1, keepdim=True))
    v_self = vn.permute(0, 2, 1, 3)[:, :, :, None, :]  # [b, kvh, 1, 1, dh]
    dv_self = dvn.permute(0, 2, 1, 3)[:, :, :, None, :]  # [b, kvh, k, 1, dh]
    z = (p_[:, :, 0, :, :T] @ V)[:, :, None] + p_[..., T:] * v_self  # [b, kvh, 1, g, dh]
    dz = (dp[..., :T].reshape(b, kvh, k * g, T) @ V).unflatten(2, (k, g))
    dz = dz + dp[..., T:] * v_self + p_[..., T:] * dv_self  # [b, kvh, k, g, dh]
    z = z.permute(0, 2, 1, 3, 4).reshape(b, 1, nh * dh_)
    dz = dz.permute(0, 2, 1, 3, 4).reshape(b, k, nh * dh_)
    return z @ w.W_O + w.b_O, dz @ w.W_O


def block_jvp(
    model: HookedTransformer,
    kv: FastKV,
    layer: int,
    x: Float[torch.Tensor, "b H"],
    tangents: Float[torch.Tensor, "b k H"],
) -> tuple[Float[torch.Tensor, "b H"], Float[torch.Tensor, "b k H"]]:
    """(f_layer(x), A_layer v) for k tangents per prompt: one primal pass, batched tangents.

    Needs float32/float64 blocks (the norms' up-casting of other dtypes is not mirrored): a
    float32/float64 model, or a half-precision one through its float32 block copies."""
    cfg = model.cfg
    blk = _blk(model, kv, layer)
    if blk.cfg.dtype not in (torch.float32, torch.float64):
        raise UnsupportedFeatureError(f"block_jvp: dtype {blk.cfg.dtype} (use torch.func.jvp)")
    x = x[:, None, :]
    h, dh = _norm_jvp(blk.ln1, x, tangents)
    a, da = _attention_jvp(model, kv, layer, h, dh)
    if cfg.use_normalization_before_and_after:
        a, da = _norm_jvp(blk.ln1_post, a, da)
    mid, dmid = x + a, tangents + da
    if cfg.attn_only:
        return mid[:, 0], dmid
    m, dm = _mlp_jvp(blk.mlp, *_norm_jvp(blk.ln2, mid, dmid))
    if cfg.use_normalization_before_and_after:
        m, dm = _norm_jvp(blk.ln2_post, m, dm)
    return (mid + m)[:, 0], dmid + dm


__all__ = [
    "FastKV",
    "UnsupportedFeatureError",
    "attention",
    "block",
    "block_jvp",
    "block_many",
    "check_supported",
    "fuse_weights",
    "merge",
    "prepare",
    "unsupported_feature",
]
