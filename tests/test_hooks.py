"""steerlin.hooks.inject: where the vector lands, hook hygiene, nesting, generation, errors.

Tolerances: an injected hook computes resid + mask * v, so positions with mask 0 are bit-exact
(compared with torch.equal) and positions with mask 1 differ from the clean run by v up to one
float64 rounding of |resid| (atol 1e-12 for residual norms of order 10).
"""

from __future__ import annotations

import pytest
import torch

from steerlin.backend import count_hooks
from steerlin.errors import InputError, LayerError, ModelTypeError, NonFiniteError, ShapeError
from steerlin.hooks import inject, resid_pre_name, steering_hooks

ATOL = 1e-12


def _resid_pre(model, tokens, layer):
    """blocks.{layer}.hook_resid_pre of a full forward (after any live hooks at that point)."""
    _, cache = model.run_with_cache(tokens, names_filter=resid_pre_name(layer))
    return cache[resid_pre_name(layer)]


def _vec(model, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(model.cfg.d_model, generator=g, dtype=model.cfg.dtype)


def _right_padded(model):
    ids = [[5, 9, 1, 4, 7, 2], [3, 8, 6], [11, 12, 13, 14]]
    lengths = torch.tensor([len(p) for p in ids])
    tokens = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(ids):
        tokens[i, : len(p)] = torch.tensor(p)
    return tokens, lengths


# ------------------------------------------------------------------ positions


def test_last_unpadded_adds_only_at_last_position(tiny):
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    v = _vec(tiny)
    clean = _resid_pre(tiny, tokens, 1)
    with inject(tiny, {1: v}):
        steered = _resid_pre(tiny, tokens, 1)
    assert torch.equal(steered[:, :-1], clean[:, :-1])
    torch.testing.assert_close(steered[:, -1] - clean[:, -1], v.expand(2, -1), rtol=0, atol=ATOL)


def test_last_with_lengths_right_padded(tiny):
    tokens, lengths = _right_padded(tiny)
    v = _vec(tiny)
    clean = _resid_pre(tiny, tokens, 2)
    with inject(tiny, {2: v}, positions="last", lengths=lengths.tolist()):
        steered = _resid_pre(tiny, tokens, 2)
    diff = steered - clean
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(diff[i, n - 1], v, rtol=0, atol=ATOL)
        mask = torch.ones(tokens.shape[1], dtype=torch.bool)
        mask[n - 1] = False
        assert torch.equal(diff[i, mask], torch.zeros_like(diff[i, mask]))


def test_last_without_lengths_steers_the_padding_not_the_real_token(gpt2_like):
    """Documented behaviour: without `lengths` the last *position* is steered."""
    tokens, lengths = _right_padded(gpt2_like)
    v = _vec(gpt2_like)
    clean = _resid_pre(gpt2_like, tokens, 1)
    with inject(gpt2_like, {1: v}):
        steered = _resid_pre(gpt2_like, tokens, 1)
    short = int(lengths.argmin())
    assert torch.equal(steered[short, lengths[short] - 1], clean[short, lengths[short] - 1])
    torch.testing.assert_close(steered[short, -1] - clean[short, -1], v, rtol=0, atol=ATOL)


def test_lengths_of_wrong_batch_size_raise_during_forward(gpt2_like):
    tokens, _ = _right_padded(gpt2_like)
    with pytest.raises(ShapeError, match=r"lengths: expected 3 entries \(the batch\), got 2"):
        with inject(gpt2_like, {0: _vec(gpt2_like)}, lengths=[3, 4]):
            gpt2_like(tokens)
    assert count_hooks(gpt2_like) == 0


def test_all_positions(tiny):
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    v = _vec(tiny)
    clean = _resid_pre(tiny, tokens, 0)
    with inject(tiny, {0: v}, positions="all"):
        steered = _resid_pre(tiny, tokens, 0)
    torch.testing.assert_close(steered - clean, v.expand(1, 7, -1), rtol=0, atol=ATOL)


def test_per_prompt_vectors(tiny):
    tokens, lengths = _right_padded(tiny)
    g = torch.Generator().manual_seed(3)
    V = torch.randn(3, tiny.cfg.d_model, generator=g, dtype=torch.float64)
    clean = _resid_pre(tiny, tokens, 1)
    with inject(tiny, {1: V}, lengths=lengths):
        steered = _resid_pre(tiny, tokens, 1)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(steered[i, n - 1] - clean[i, n - 1], V[i], rtol=0, atol=ATOL)


def test_per_prompt_vectors_wrong_batch(gpt2_like):
    V = torch.ones(2, gpt2_like.cfg.d_model, dtype=torch.float64)
    with pytest.raises(
        ShapeError, match=r"additions\[1\]: 2 per-sequence vectors for a batch of 3"
    ):
        with inject(gpt2_like, {1: V}):
            gpt2_like(torch.tensor([[1, 2], [3, 4], [5, 6]]))


def test_injection_changes_downstream_but_not_earlier_positions(gpt2_like):
    """A change at the last token never reaches earlier positions (causal decoder)."""
    tokens = torch.tensor([[4, 8, 15, 16, 23]])
    L = gpt2_like.cfg.n_layers
    name = f"blocks.{L - 1}.hook_resid_post"
    _, c0 = gpt2_like.run_with_cache(tokens, names_filter=name)
    with inject(gpt2_like, {0: _vec(gpt2_like)}):
        _, c1 = gpt2_like.run_with_cache(tokens, names_filter=name)
    assert torch.equal(c0[name][0, :-1], c1[name][0, :-1])
    assert (c0[name][0, -1] - c1[name][0, -1]).norm() > 1e-3


# ------------------------------------------------------------------ hygiene and nesting


def test_hooks_removed_on_normal_exit(gpt2_like):
    with inject(gpt2_like, {0: _vec(gpt2_like), 2: _vec(gpt2_like, 1)}) as handle:
        assert count_hooks(gpt2_like) > 0
        assert handle.positions == "last"
    assert count_hooks(gpt2_like) == 0


def test_hooks_removed_on_exception(gpt2_like):
    with pytest.raises(RuntimeError, match="boom"):
        with inject(gpt2_like, {1: _vec(gpt2_like)}):
            gpt2_like(torch.tensor([[1, 2, 3]]))
            raise RuntimeError("boom")
    assert count_hooks(gpt2_like) == 0
    # and the model is really clean: output equals a fresh unhooked forward of a twin model
    ref = type(gpt2_like)(gpt2_like.cfg)
    ref.load_state_dict(gpt2_like.state_dict())
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(gpt2_like(tokens), ref(tokens))


def test_hooks_removed_on_keyboard_interrupt(gpt2_like):
    with pytest.raises(KeyboardInterrupt):
        with inject(gpt2_like, {1: _vec(gpt2_like)}):
            raise KeyboardInterrupt
    assert count_hooks(gpt2_like) == 0


def test_nested_inject_adds_and_inner_exit_keeps_outer(gpt2_like):
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9]])
    v, w = _vec(gpt2_like, 0), _vec(gpt2_like, 1)
    clean = _resid_pre(gpt2_like, tokens, 1)
    with inject(gpt2_like, {1: v}):
        outer_only = _resid_pre(gpt2_like, tokens, 1)
        with inject(gpt2_like, {1: w}, positions="all"):
            both = _resid_pre(gpt2_like, tokens, 1)
        after_inner = _resid_pre(gpt2_like, tokens, 1)
    assert count_hooks(gpt2_like) == 0
    assert torch.equal(after_inner, outer_only)
    torch.testing.assert_close(both[0, :-1] - clean[0, :-1], w.expand(5, -1), rtol=0, atol=ATOL)
    torch.testing.assert_close(both[0, -1] - clean[0, -1], v + w, rtol=0, atol=ATOL)


def test_nesting_with_transformer_lens_hooks_context(gpt2_like):
    tokens = torch.tensor([[2, 7, 1, 8]])
    v = _vec(gpt2_like)
    seen = []
    record = (resid_pre_name(1), lambda r, hook: seen.append(r.clone()))
    clean = _resid_pre(gpt2_like, tokens, 1)
    # TL context outside, inject inside: inject's exit leaves the TL hook alone
    with gpt2_like.hooks(fwd_hooks=[record]):
        with inject(gpt2_like, {1: v}):
            gpt2_like(tokens)
        n_outer = count_hooks(gpt2_like)
        assert n_outer > 0
        gpt2_like(tokens)
    assert count_hooks(gpt2_like) == 0
    assert len(seen) == 2
    # the recording hook was registered first, so it saw the clean residual both times
    assert torch.equal(seen[0], clean) and torch.equal(seen[1], clean)
    # inject outside, TL context inside: TL's exit leaves the injection alone
    seen.clear()
    with inject(gpt2_like, {1: v}):
        with gpt2_like.hooks(fwd_hooks=[record]):
            gpt2_like(tokens)
        still = _resid_pre(gpt2_like, tokens, 1)
    assert count_hooks(gpt2_like) == 0
    torch.testing.assert_close(seen[0][0, -1] - clean[0, -1], v, rtol=0, atol=ATOL)
    torch.testing.assert_close(still[0, -1] - clean[0, -1], v, rtol=0, atol=ATOL)


def test_empty_additions_is_a_no_op(gpt2_like):
    tokens = torch.tensor([[1, 2, 3]])
    ref = gpt2_like(tokens)
    with inject(gpt2_like, {}):
        assert torch.equal(gpt2_like(tokens), ref)


# ------------------------------------------------------------------ generation

GEN = dict(
    max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False, return_type="tokens"
)


def _greedy_oracle(model, prompt, v_by_layer, n_new):
    """Greedy decoding by full forwards, adding v at positions >= len(prompt)-1 by hand."""
    toks = prompt.clone()
    p = prompt.shape[1]

    def make(v):
        def hook(r, hook):
            r = r.clone()
            r[:, p - 1 :] += v
            return r

        return hook

    hooks = [(resid_pre_name(l), make(v)) for l, v in v_by_layer.items()]
    for _ in range(n_new):
        logits = model.run_with_hooks(toks, fwd_hooks=hooks)
        toks = torch.cat([toks, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return toks


def _generate(model, prompt, adds, cache, positions):
    """Steered greedy generation; also the final residual of the newest token of every forward."""
    last = []
    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with inject(model, adds, positions=positions):
        with model.hooks(fwd_hooks=[(name, lambda r, hook: last.append(r[:, -1].clone()))]):
            toks = model.generate(prompt, use_past_kv_cache=cache, **GEN)
    return toks, torch.stack(last, 1)


# TransformerLens 3.9's own KV-cached generate() is wrong for learned absolute position
# embeddings without a tokenizer (it embeds the whole sequence at pos_offset = cache length, so
# the newest token gets the wrong position): even unsteered, gpt2_like gives different tokens
# with the cache on and off. Cache-on/off identity is therefore checked on the rotary model.


@pytest.mark.parametrize("prompt", [[[1, 2, 3], [7, 5, 3]], [[4]]], ids=["3tok", "1tok"])
def test_generate_cache_on_off_identical(gemma_like, prompt):
    """Cache on, "generated" and "last" (read from the cache) == cache off, ("from", p-1) ==
    the hand-written greedy oracle."""
    model = gemma_like
    prompt = torch.tensor(prompt)
    p = prompt.shape[1]
    adds = {0: _vec(model, 0, 2.0), 2: _vec(model, 1, 2.0)}
    oracle = _greedy_oracle(model, prompt, adds, GEN["max_new_tokens"])
    uncached, x_unc = _generate(model, prompt, adds, False, ("from", p - 1))
    assert torch.equal(uncached, oracle)
    for positions in ("generated", "last"):
        cached, x_c = _generate(model, prompt, adds, True, positions)
        assert torch.equal(cached, uncached), positions
        # stronger than tokens: the newest token's final residual at every step (float64
        # rounding of a cached vs a full attention, 1e-10)
        torch.testing.assert_close(x_c, x_unc, rtol=1e-10, atol=1e-10)
    assert count_hooks(model) == 0
    unsteered, x0 = _generate(model, prompt, {}, False, "last")
    assert (x0 - x_unc).norm() > 1e-3 * x0.norm()  # the steering does act


def test_uncached_generation_with_from_matches_oracle_on_absolute_positions(gpt2_like):
    prompt = torch.tensor([[5, 6, 7, 8]])
    adds = {1: _vec(gpt2_like, 0, 3.0)}
    oracle = _greedy_oracle(gpt2_like, prompt, adds, GEN["max_new_tokens"])
    toks, _ = _generate(gpt2_like, prompt, adds, False, ("from", 3))
    assert torch.equal(toks, oracle)


def test_generated_without_a_cache_raises_and_cleans_up(gemma_like):
    with pytest.raises(InputError, match=r"positions='generated' reads where the prompt ends"):
        with inject(gemma_like, {1: _vec(gemma_like)}, positions="generated"):
            gemma_like.generate(torch.tensor([[1, 2, 3]]), use_past_kv_cache=False, **GEN)
    assert count_hooks(gemma_like) == 0


def test_back_to_back_generations_in_one_context_equal_fresh_ones(gemma_like):
    """No state: a, then b one token longer than a, then a again, then b with the cache off --
    each equals its own fresh context (the old sequence-length heuristic steered b at the old
    prompt's last index)."""
    model = gemma_like
    a = torch.tensor([[1, 2, 3]])
    b = torch.tensor([[9, 8, 7, 6]])
    adds = {1: _vec(model, 0, 3.0), 3: _vec(model, 1, 2.0)}
    fresh = {}
    for name, prompt in (("a", a), ("b", b)):
        with inject(model, adds, positions="generated"):
            fresh[name] = model.generate(prompt, use_past_kv_cache=True, **GEN)
    with inject(model, adds, positions="generated"):
        seq = [model.generate(x, use_past_kv_cache=True, **GEN) for x in (a, b, a, b)]
    with inject(model, adds, positions=("from", b.shape[1] - 1)):
        b_off = model.generate(b, use_past_kv_cache=False, **GEN)
    assert torch.equal(seq[0], fresh["a"]) and torch.equal(seq[2], fresh["a"])
    assert torch.equal(seq[1], fresh["b"]) and torch.equal(seq[3], fresh["b"])
    assert torch.equal(b_off, fresh["b"])


def test_second_longer_prompt_steered_only_at_its_last_token(gemma_like):
    """Inside one context, the first forward of a second, longer prompt is steered at its last
    token only (column 4), read from its own empty cache."""
    model = gemma_like
    a = torch.tensor([[1, 2, 3]])
    b = torch.tensor([[9, 8, 7, 6, 5]])
    v = torch.ones(model.cfg.d_model, dtype=torch.float64)
    clean = _resid_pre(model, b, 1)
    seen = []
    record = (resid_pre_name(1), lambda r, hook: seen.append(r.clone()))
    gen = dict(GEN, max_new_tokens=3)
    for positions in ("generated", "last"):
        seen.clear()
        with inject(model, {1: v}, positions=positions):
            model.generate(a, use_past_kv_cache=True, **gen)
            with model.hooks(fwd_hooks=[record]):
                model.generate(b, use_past_kv_cache=True, **gen)
        steered = ((seen[0] - clean)[0].norm(dim=-1) > 1e-9).nonzero().flatten().tolist()
        assert steered == [4], positions
        assert [s.shape[1] for s in seen] == [5, 1, 1]


def _cached_forward(model, tokens, lengths=None):
    """A forward of `tokens` that starts a fresh KV cache, then a one-token continuation."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0])
    mask = torch.ones_like(tokens)
    if lengths is not None:
        mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    seen = []
    record = (resid_pre_name(1), lambda r, hook: seen.append(r.clone()))
    with model.hooks(fwd_hooks=[record]):
        model(tokens, attention_mask=mask, past_kv_cache=cache)
        nxt = torch.full((tokens.shape[0], 1), 3)
        model(nxt, attention_mask=torch.ones_like(nxt), past_kv_cache=cache)
    return seen


def test_right_padded_batch_under_a_cache_padding_column_not_steered(gemma_like):
    model = gemma_like
    tokens, lengths = _right_padded(model)
    v = _vec(model)
    clean = _cached_forward(model, tokens, lengths)
    for positions in ("generated", "last"):
        with inject(model, {1: v}, positions=positions, lengths=lengths):
            steered = _cached_forward(model, tokens, lengths)
        diff = steered[0] - clean[0]
        for i, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(diff[i, n - 1], v, rtol=0, atol=ATOL)
            others = torch.ones(tokens.shape[1], dtype=torch.bool)
            others[n - 1] = False
            assert torch.equal(diff[i, others], torch.zeros_like(diff[i, others])), positions


def test_from_counts_absolute_positions_through_the_cache(gemma_like):
    """("from", i) on a cached prompt of 4 then a one-token continuation (absolute position 4)."""
    model = gemma_like
    tokens = torch.tensor([[1, 2, 3, 4]])
    v = _vec(model)
    clean = _cached_forward(model, tokens)
    for start, want_prompt, want_next in ((2, [2, 3], True), (5, [], False), (4, [], True)):
        with inject(model, {1: v}, positions=("from", start)):
            got = _cached_forward(model, tokens)
        d0 = (got[0] - clean[0])[0].norm(dim=-1) > 0
        d1 = (got[1] - clean[1])[0].norm(dim=-1) > 0
        assert d0.nonzero().flatten().tolist() == want_prompt
        assert bool(d1[0]) == want_next


# ------------------------------------------------------------------ stateless hook lists


def test_steering_hooks_pairs_equal_inject(tiny):
    tokens, lengths = _right_padded(tiny)
    adds = {0: _vec(tiny, 0), 2: _vec(tiny, 1)}
    name = f"blocks.{tiny.cfg.n_layers - 1}.hook_resid_post"
    for positions in ("last", "all", ("from", 2)):
        pairs = steering_hooks(tiny, adds, positions=positions, lengths=lengths)
        assert [n for n, _ in pairs] == [resid_pre_name(0), resid_pre_name(2)]
        a = tiny.run_with_hooks(tokens, fwd_hooks=pairs)
        with inject(tiny, adds, positions=positions, lengths=lengths):
            b = tiny(tokens)
        with tiny.hooks(fwd_hooks=pairs):
            c = tiny(tokens)
        assert torch.equal(a, b) and torch.equal(a, c), positions
        assert not torch.equal(a, tiny(tokens))
    assert count_hooks(tiny) == 0
    del name


def test_steering_hooks_refuse_generated(gpt2_like):
    with pytest.raises(InputError, match=r"'generated' needs each forward's KV-cache position"):
        steering_hooks(gpt2_like, {0: _vec(gpt2_like)}, positions="generated")


def test_one_default_everywhere():
    import inspect

    from steerlin.control import Controller
    from steerlin.hooks import DEFAULT_POSITIONS
    from steerlin.schedule import Schedule

    for f in (inject, steering_hooks, Schedule.apply, Schedule.hooks, Controller.apply):
        assert inspect.signature(f).parameters["positions"].default == DEFAULT_POSITIONS, f
    assert DEFAULT_POSITIONS == "last"


@pytest.mark.parametrize(
    "bad", ["first", ("from", -1), ("from", 1.5), ("to", 2), ("from",), ["from", 2]]
)
def test_bad_position_policies(gpt2_like, bad):
    with pytest.raises(InputError, match=r"positions: "):
        with inject(gpt2_like, {0: _vec(gpt2_like)}, positions=bad):
            pass
    assert count_hooks(gpt2_like) == 0


# ------------------------------------------------------------------ errors


def test_unknown_layer(gpt2_like):
    with pytest.raises(
        LayerError,
        match=r"additions layer: expected a layer index in 0\.\.3 "
        r"\(the model has 3 blocks\), got 4",
    ):
        with inject(gpt2_like, {4: _vec(gpt2_like)}):
            pass


def test_final_state_layer(gpt2_like):
    """x_L (layer index L) is the last block's output: added at its hook_resid_post, so the
    logits move exactly as adding the vector after the last block does."""
    m, v = gpt2_like, _vec(gpt2_like)
    toks = torch.tensor([[1, 5, 9, 4]])
    L = m.cfg.n_layers
    post = f"blocks.{L - 1}.hook_resid_post"
    ref = m.run_with_hooks(toks, fwd_hooks=[(post, lambda r, hook: r + v)])
    with inject(m, {L: v}, positions="all"):
        got = m(toks)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, m(toks))
    assert count_hooks(m) == 0


def test_negative_layer(gpt2_like):
    with pytest.raises(LayerError, match=r"in 0\.\.3 .* got -1"):
        with inject(gpt2_like, {-1: _vec(gpt2_like)}):
            pass


@pytest.mark.parametrize("layer", ["1", 1.0, True])
def test_non_int_layer(gpt2_like, layer):
    with pytest.raises(LayerError, match=r"expected an int in 0\.\.3"):
        with inject(gpt2_like, {layer: _vec(gpt2_like)}):
            pass


@pytest.mark.parametrize("shape", [(31,), (33,), (2, 3, 32), ()])
def test_wrong_size_vector(gpt2_like, shape):
    with pytest.raises(ShapeError, match=r"additions\[0\]: expected a vector of shape \[32\]"):
        with inject(gpt2_like, {0: torch.zeros(shape, dtype=torch.float64)}):
            pass


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_vector(gpt2_like, bad):
    v = _vec(gpt2_like)
    v[5] = bad
    with pytest.raises(NonFiniteError, match=r"additions\[1\]: contains NaN or inf"):
        with inject(gpt2_like, {1: v}):
            pass


def test_bad_positions(gpt2_like):
    with pytest.raises(InputError, match=r"positions: expected one of 'last'.* got 'first'"):
        with inject(gpt2_like, {0: _vec(gpt2_like)}, positions="first"):
            pass


def test_not_a_model():
    with pytest.raises(
        ModelTypeError,
        match=r"expected a transformer_lens\.(HookedTransformer|model_bridge\.TransformerBridge).*"
        r"got torch.*Linear",
    ):
        with inject(torch.nn.Linear(2, 2), {0: torch.zeros(2)}):
            pass


def test_additions_not_a_mapping(gpt2_like):
    with pytest.raises(
        ModelTypeError, match="additions: expected a mapping layer -> vector, got list"
    ):
        with inject(gpt2_like, [_vec(gpt2_like)]):
            pass


def test_errors_leave_no_hooks(gpt2_like):
    """A bad second entry must not leave the first entry's hook behind."""
    with pytest.raises(LayerError):
        with inject(gpt2_like, {0: _vec(gpt2_like), 7: _vec(gpt2_like)}):
            pass
    assert count_hooks(gpt2_like) == 0
