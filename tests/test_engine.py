"""steerlin.backend.fast: the frozen-context engine against TransformerLens's own block.

The reference is `model.blocks[l](x[:, None], past_kv_cache_entry=..., attention_mask=mask)`
on the same right-aligned cached context (FrozenContext's TL path). The tiny float64 models
cover every feature the engine implements: gpt2_like (LayerNorm, absolute positions, MHA) and
gemma_like (RMS pre+post norms, rotary with local/global bases, GQA 4:2, q/k norm, a sliding
window of 6 with prompts up to 12 tokens, score soft-cap 50). The weights are 0.3-scaled
Gaussians, so the blocks are visibly non-linear.

Tolerances: both paths compute the same arithmetic in a different order (fused projections,
the self column appended to the softmax, no head expansion), ~1e-16 relative in float64 before
amplification by one block; 1e-12 relative (to the output's max) is the goal and is what is
asserted. On Gemma-3-270m (float32) the bound is float32 round-off amplified by one block:
the measured relative error is ~1e-6 (see docs/performance.md); 2e-5 is asserted. A wrong mask,
position or head grouping gives errors of order 1 (checked by the negative test below).
"""

from __future__ import annotations

import pytest

from steerlin.backend.common import tl_major

if tl_major() >= 4:
    pytest.skip("HookedTransformer-only module (TransformerLens 3 leg)", allow_module_level=True)
import torch
from conftest import make_gemma_like, random_prompts

from steerlin.backend import fast
from steerlin.directions import ConceptDirections
from steerlin.frozen import iter_contexts


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _ref_block(ctx, layer, x):
    """TransformerLens's block on the frozen context: FrozenContext's reference path."""
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entry = TransformerLensKeyValueCacheEntry(ctx.keys[layer], ctx.values[layer], frozen=True)
    out = ctx.model.blocks[layer](x[:, None, :], past_kv_cache_entry=entry, attention_mask=ctx.mask)
    return out[:, 0, :]


def _ref_many(ctx, layer, z):
    b, k, H = z.shape
    rows = [_ref_block(ctx, layer, z[:, j]) for j in range(k)]
    return torch.stack(rows, dim=1)


@pytest.fixture
def setup(tiny):
    prompts = random_prompts(tiny, 9, 1, 12, seed=3)
    assert max(len(p) for p in prompts) > 6  # longer than gemma_like's window
    ctxs = list(iter_contexts(tiny, prompts, batch_size=5, engine="tl"))
    kvs = [fast.prepare(tiny, c.keys, c.values, c.mask) for c in ctxs]
    return tiny, ctxs, kvs


def _perturbed(ctx, layer, k, seed=0, rel=0.3):
    g = torch.Generator().manual_seed(seed)
    x = ctx.states[:, layer]
    noise = torch.randn(len(ctx), k, x.shape[-1], generator=g, dtype=x.dtype)
    return x[:, None] + rel * x.norm(dim=-1)[:, None, None] * noise / noise.shape[-1] ** 0.5


def test_block_equals_tl_block(setup):
    model, ctxs, kvs = setup
    for ctx, kv in zip(ctxs, kvs, strict=True):
        for layer in range(model.cfg.n_layers):
            x = ctx.states[:, layer]
            assert _rel(fast.block(model, kv, layer, x), _ref_block(ctx, layer, x)) < 1e-12
            # the clean chain: f_l(x_l) = x_{l+1}
            assert _rel(fast.block(model, kv, layer, x), ctx.states[:, layer + 1]) < 1e-10


def test_block_many_equals_tl_block_per_state(setup):
    model, ctxs, kvs = setup
    for ctx, kv in zip(ctxs, kvs, strict=True):
        for layer in range(model.cfg.n_layers):
            z = _perturbed(ctx, layer, 4, seed=layer)
            assert _rel(fast.block_many(model, kv, layer, z), _ref_many(ctx, layer, z)) < 1e-12


def test_jvp_and_vmap_equal_tl_jvp(setup):
    model, ctxs, kvs = setup
    ctx, kv = ctxs[-1], kvs[-1]
    g = torch.Generator().manual_seed(5)
    for layer in range(model.cfg.n_layers):
        x = ctx.states[:, layer]
        tang = torch.randn(len(ctx), 3, x.shape[-1], generator=g, dtype=x.dtype)

        def f_fast(x_):
            return fast.block(model, kv, layer, x_)

        def f_ref(x_):
            return _ref_block(ctx, layer, x_)

        one = lambda f: lambda v: torch.func.jvp(f, (x,), (v,))[1]
        got = torch.vmap(one(f_fast), in_dims=1, out_dims=1)(tang)
        want = torch.stack([one(f_ref)(tang[:, j]) for j in range(3)], dim=1)
        assert _rel(got, want) < 1e-12
        # linearize: one primal, a linear map for the tangents (exact: same derivative)
        _, lin = torch.func.linearize(f_fast, x)
        assert _rel(torch.vmap(lin, in_dims=1, out_dims=1)(tang), want) < 1e-12
        # autograd (VJP) through the engine: the transpose of the same Jacobian
        w = torch.randn(x.shape, generator=g, dtype=x.dtype)
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((f_fast(xg) * w).sum(), xg)
        jv = one(f_ref)(tang[:, 0])
        assert abs((grad * tang[:, 0]).sum() - (w * jv).sum()) < 1e-10 * (w * jv).abs().sum()


def test_inputs_not_modified(setup):
    model, ctxs, kvs = setup
    ctx, kv = ctxs[0], kvs[0]
    z = _perturbed(ctx, 1, 2)
    before = z.clone()
    keys = [t.clone() for t in kv.keys]
    fast.block_many(model, kv, 1, z)
    assert torch.equal(z, before)
    assert all(torch.equal(a, b) for a, b in zip(keys, kv.keys, strict=True))


def test_wrong_window_is_detected(gemma_like):
    """The oracle can fail: the same context with the sliding window switched off differs."""
    prompts = random_prompts(gemma_like, 4, 10, 12, seed=7)
    ctx = next(iter(iter_contexts(gemma_like, prompts, batch_size=4, engine="tl")))
    kv = fast.prepare(gemma_like, ctx.keys, ctx.values, ctx.mask)
    local = [i for i, t in enumerate(gemma_like.cfg.attn_types) if t == "local"][0]
    no_window = fast.FastKV(
        kv.keys,
        kv.values,
        tuple(kv.allowed[-1] if i == local else a for i, a in enumerate(kv.allowed)),
        kv.cos,
        kv.sin,
        kv.weights,
    )
    x = ctx.states[:, local]
    assert gemma_like.cfg.attn_types[-1] == "global"
    assert _rel(fast.block(gemma_like, no_window, local, x), _ref_block(ctx, local, x)) > 1e-3


def test_float32_tiny_model():
    model = make_gemma_like(dtype=torch.float32, seed=2)
    prompts = random_prompts(model, 6, 2, 12, seed=2)
    ctx = next(iter(iter_contexts(model, prompts, batch_size=6, engine="tl")))
    kv = fast.prepare(model, ctx.keys, ctx.values, ctx.mask)
    for layer in range(model.cfg.n_layers):
        z = _perturbed(ctx, layer, 3)
        assert _rel(fast.block_many(model, kv, layer, z), _ref_many(ctx, layer, z)) < 2e-5


def test_unsupported_feature_is_named():
    model = make_gemma_like(seed=4)
    model.cfg.use_logn_attn = True  # own model: built for this test
    try:
        with pytest.raises(fast.UnsupportedFeatureError, match="use_logn_attn"):
            fast.check_supported(model)
    finally:
        model.cfg.use_logn_attn = False


@pytest.mark.gemma
def test_gemma_block_equals_tl_block(gemma):
    texts = [
        "a gorgeous , witty , seductive movie .",
        "the plot is nothing but boilerplate clichés from start to finish , and the script "
        "assumes that not only would subtlety be lost on the target audience , but that it's "
        "also too stupid to realize that they've already seen this exact same movie a hundred "
        "times",
        "it 's a charming and often affecting journey .",
    ]
    ctx = next(iter(iter_contexts(gemma, texts, batch_size=3, engine="tl")))
    kv = fast.prepare(gemma, ctx.keys, ctx.values, ctx.mask)
    worst = 0.0
    for layer in range(gemma.cfg.n_layers):
        z = _perturbed(ctx, layer, 2, rel=0.1)
        worst = max(worst, _rel(fast.block_many(gemma, kv, layer, z), _ref_many(ctx, layer, z)))
        x = ctx.states[:, layer]
        v = torch.randn_like(x)
        got = torch.func.jvp(lambda x_: fast.block(gemma, kv, layer, x_), (x,), (v,))[1]
        want = torch.func.jvp(lambda x_: _ref_block(ctx, layer, x_), (x,), (v,))[1]
        worst = max(worst, _rel(got, want))
    print(f"gemma max relative error vs TL: {worst:.2e}")
    assert worst < 2e-5, worst


def test_block_jvp_equals_torch_func_jvp(setup):
    """The written-out forward mode: same primal, same derivative as torch.func.jvp."""
    model, ctxs, kvs = setup
    g = torch.Generator().manual_seed(11)
    for ctx, kv in zip(ctxs, kvs, strict=True):
        for layer in range(model.cfg.n_layers):
            x = _perturbed(ctx, layer, 1, seed=layer)[:, 0]
            tang = torch.randn(len(ctx), 5, x.shape[-1], generator=g, dtype=x.dtype)
            y, jv = fast.block_jvp(model, kv, layer, x, tang)
            f = lambda x_: _ref_block(ctx, layer, x_)
            want = torch.stack([torch.func.jvp(f, (x,), (tang[:, j],))[1] for j in range(5)], dim=1)
            assert _rel(y, _ref_block(ctx, layer, x)) < 1e-12
            assert _rel(jv, want) < 1e-12


# ------------------------------------------------------------------------------ wired in: the
# public functions on engine="fast" against engine="tl" (TransformerLens's block), end to end


def _gains_rel(a, b):
    """max |a - b| / max |b| over layers (gains near zero make a per-layer ratio meaningless)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def wired(tiny):
    from steerlin import ConceptDirections

    prompts = random_prompts(tiny, 9, 2, 12, seed=13)
    assert max(len(p) for p in prompts) > 6  # longer than gemma_like's sliding window
    dirs = ConceptDirections.fit(tiny, random_prompts(tiny, 10, seed=14), [0, 1] * 5)
    return tiny, prompts, dirs


def test_default_engine_is_fast_where_supported(wired):
    from steerlin.frozen import layerwise_contexts

    model, prompts, _ = wired
    ctx = next(iter(iter_contexts(model, prompts, batch_size=4)))
    assert ctx.engine_name == "fast" and ctx.kv is not None
    ref = next(iter(iter_contexts(model, prompts, batch_size=4, engine="tl")))
    assert ref.engine_name == "tl" and ref.kv is None
    assert layerwise_contexts(model, prompts, batch_size=4)[0].engine_name == "fast"
    # the clean chain on the fast context: f_l(x_l) = x_{l+1} from the same forward
    for layer in range(model.cfg.n_layers):
        x = ctx.states[:, layer]
        assert _rel(ctx.block(layer, x), ctx.states[:, layer + 1]) < 1e-10


def test_context_methods_fast_equal_tl(wired):
    """block, block_many, jvp, vjp and central_difference dispatch to the fast engine and
    agree with TransformerLens's block (full and layer-wise contexts)."""
    from steerlin.frozen import layerwise_contexts

    model, prompts, _ = wired
    g = torch.Generator().manual_seed(3)
    fast_ctx = list(iter_contexts(model, prompts, batch_size=4))
    tl_ctx = list(iter_contexts(model, prompts, batch_size=4, engine="tl"))
    lazy = layerwise_contexts(model, prompts, batch_size=4)
    for f, t, z in zip(fast_ctx, tl_ctx, lazy, strict=True):
        assert torch.equal(f.states, t.states)
        for layer in range(model.cfg.n_layers):
            x = f.states[:, layer]
            v = torch.randn(len(f), 3, x.shape[-1], generator=g, dtype=x.dtype)
            zz = _perturbed(f, layer, 5, seed=layer)
            assert _rel(f.block_many(layer, zz), t.block_many(layer, zz)) < 1e-12
            assert _rel(f.jvp(layer, v), t.jvp(layer, v)) < 1e-12
            assert _rel(f.jvp(layer, v, chunk=2), t.jvp(layer, v)) < 1e-12  # chunked tangents
            assert _rel(z.jvp(layer, v), t.jvp(layer, v)) < 1e-12  # layer-wise (streamed)
            assert _rel(f.vjp(layer, v), t.vjp(layer, v)) < 1e-12
            assert _rel(z.vjp(layer, v), t.vjp(layer, v)) < 1e-12
            # + and - states in one batch: the central difference approximates the JVP
            cd = f.central_difference(layer, v, rel_step=1e-5)
            assert _rel(cd, f.jvp(layer, v)) < 1e-6


def test_scan_and_exact_gains_fast_equal_tl(wired):
    from steerlin import exact_gains, scan_gains

    model, prompts, dirs = wired
    kw = dict(batch_size=4)
    for layers in (None, [2, 0]):
        fast_g = scan_gains(model, prompts, dirs, layers=layers, **kw)
        tl_g = scan_gains(model, prompts, dirs, layers=layers, engine="tl", **kw)
        assert _gains_rel(fast_g, tl_g) < 1e-12
    fast_e = exact_gains(model, prompts, dirs, per_prompt=True, **kw)
    tl_e = exact_gains(model, prompts, dirs, per_prompt=True, engine="tl", **kw)
    assert _gains_rel(fast_e, tl_e) < 1e-12
    # logit readout: the same chain, another readout
    words = [5, 7]
    fast_l = scan_gains(model, prompts, dirs, readout="logits", label_words=words, **kw)
    tl_l = scan_gains(model, prompts, dirs, readout="logits", label_words=words, engine="tl", **kw)
    assert _gains_rel(fast_l, tl_l) < 1e-12


@pytest.mark.parametrize("basis", ["krylov", "two-sided", "pod"])
def test_surrogate_fit_fast_equals_tl(wired, basis):
    import warnings

    from steerlin import Surrogate

    model, prompts, dirs = wired
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Krylov breakdown on a 3-4 layer toy: same on both
        a = Surrogate.fit(model, prompts, dirs, d=5, basis=basis, batch_size=4)
        b = Surrogate.fit(model, prompts, dirs, d=5, basis=basis, batch_size=4, engine="tl")
    for k in ("gains", "gains_paper", "B", "c"):
        assert _gains_rel(getattr(a, k), getattr(b, k)) < 1e-12, k
    assert _gains_rel(a.A, b.A) < 1e-11
    assert _gains_rel(a.P, b.P) < 1e-11


def test_measure_shift_and_calibrate_fast_equal_tl(wired):
    from steerlin import Controller, Surrogate, exact_gains
    from steerlin.measure import calibrate, measure_shift

    model, prompts, dirs = wired
    sur = Surrogate.fit(model, prompts, dirs, d=4, batch_size=4)
    target = 0.3 * float(exact_gains(model, prompts, dirs).abs().max())
    sched = Controller(sur, target, units="raw").schedule
    a = measure_shift(model, prompts, sched, batch_size=4)
    b = measure_shift(model, prompts, sched, batch_size=4, engine="tl")
    assert _gains_rel(a, b) < 1e-12
    ca = calibrate(model, prompts, sched, target, tol=1e-8, batch_size=4)
    cb = calibrate(model, prompts, sched, target, tol=1e-8, batch_size=4, engine="tl")
    assert abs(ca.multiplier - cb.multiplier) < 1e-9 * abs(cb.multiplier)


def test_engine_choice_errors_and_fallback(wired):
    from steerlin import exact_gains
    from steerlin.errors import InputError
    from steerlin.frozen import resolve_engine

    model, prompts, dirs = wired
    with pytest.raises(InputError, match="engine"):
        exact_gains(model, prompts, dirs, engine="quick")
    unsupported = make_gemma_like(seed=4)
    unsupported.cfg.use_logn_attn = True  # own model: built for this test
    assert resolve_engine(unsupported, "auto") == "tl"  # falls back to the reference path
    with pytest.raises(fast.UnsupportedFeatureError, match="use_logn_attn.*engine='tl'"):
        resolve_engine(unsupported, "fast")
    with pytest.raises(fast.UnsupportedFeatureError, match="use_logn_attn"):
        next(iter(iter_contexts(unsupported, prompts, engine="fast")))
    ctx = next(iter(iter_contexts(unsupported, prompts[:2])))
    assert ctx.engine_name == "tl"


@pytest.mark.gemma
def test_gemma_gains_fast_equal_tl(gemma):
    """scan_gains, exact_gains and Surrogate.fit gains on Gemma-3-270m, fast vs TL, with one
    prompt longer than the 512-token sliding window (local layers then mask the oldest keys).

    Tolerance: float32 round-off of one block is ~4e-6 relative (test above); through 18
    blocks, a central difference at eps = 0.1 and the reduced algebra the gains differed by
    3e-7 to 1.2e-6 of the largest gain (printed); 2e-5 is asserted."""
    from steerlin import ConceptDirections, Surrogate, exact_gains, scan_gains

    pos = [
        "a gorgeous , witty , seductive movie .",
        "it 's a charming and often affecting journey .",
    ]
    neg = ["one long string of cliches .", "the plot is nothing but boilerplate clichés ."]
    dirs = ConceptDirections.fit(gemma, pos + neg, [1, 1, 0, 0])
    long_text = " ".join(pos + neg) * 17  # ~560 tokens
    n_long = gemma.to_tokens(long_text).shape[1]
    assert n_long > gemma.cfg.window_size
    prompts = pos + neg + ["the acting is wooden and the jokes fall flat .", long_text]
    worst = {}
    worst["scan"] = _gains_rel(
        scan_gains(gemma, prompts, dirs, batch_size=3),
        scan_gains(gemma, prompts, dirs, batch_size=3, engine="tl"),
    )
    worst["exact"] = _gains_rel(
        exact_gains(gemma, prompts, dirs, batch_size=3, per_prompt=True),
        exact_gains(gemma, prompts, dirs, batch_size=3, per_prompt=True, engine="tl"),
    )
    for basis in ("krylov", "two-sided"):
        a = Surrogate.fit(gemma, prompts, dirs, d=4, basis=basis, batch_size=3)
        b = Surrogate.fit(gemma, prompts, dirs, d=4, basis=basis, batch_size=3, engine="tl")
        worst[f"fit {basis}"] = _gains_rel(a.gains, b.gains)
    print(f"gemma fast vs TL (long prompt {n_long} tokens):", worst)
    assert max(worst.values()) < 2e-5, worst


@pytest.mark.gemma
def test_gemma_sliding_window_block_equals_tl(gemma):
    """The block itself on a context longer than the window (local and global layers)."""
    text = "it 's a charming and often affecting journey . " * 60
    assert gemma.to_tokens(text).shape[1] > gemma.cfg.window_size
    ctx = next(iter(iter_contexts(gemma, [text, "a short one ."], batch_size=2, engine="tl")))
    kv = fast.prepare(gemma, ctx.keys, ctx.values, ctx.mask)
    worst = 0.0
    for layer in range(gemma.cfg.n_layers):
        z = _perturbed(ctx, layer, 2, rel=0.1)
        worst = max(worst, _rel(fast.block_many(gemma, kv, layer, z), _ref_many(ctx, layer, z)))
    print(f"gemma (> window) max relative error vs TL: {worst:.2e}")
    assert worst < 2e-5, worst


@pytest.mark.parametrize("name", ["gpt2_like", "gemma_like"])
def test_observability_backward_equals_the_vjp_recursion(name, request):
    """The two-sided basis' statistic from one backward pass per batch equals the per-layer
    recursion w_l = A_lᵀ w_{l+1} through `FrozenContext.vjp` (float64 tiny models)."""
    from steerlin.identify import identity_reduce, observability_grams
    from steerlin.readouts import make_readout

    model = request.getfixturevalue(name)
    L, H = model.cfg.n_layers, model.cfg.d_model
    prompts = random_prompts(model, 6, 3, 12, seed=11)
    dirs = ConceptDirections.fit(model, random_prompts(model, 8, seed=2), [0, 1] * 4)
    rd = make_readout(model, "concept", dirs.unit[-1])
    contexts = list(iter_contexts(model, prompts, batch_size=4))
    got, _ = observability_grams(model, contexts, rd, identity_reduce, dirs.unit)
    want = torch.zeros(L + 1, H, H, dtype=torch.float64)
    for ctx in contexts:
        w = rd.gradient(model, ctx.states[:, -1])
        want[L] += w.T @ w
        for layer in range(L - 1, -1, -1):
            w = ctx.vjp(layer, w[:, None])[:, 0]
            want[layer] += w.T @ w
    assert _rel(got, want) < 1e-10
