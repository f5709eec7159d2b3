"""steerlin.jacobians: the frozen-context single-token block maps against the full model.

Both tiny models are exercised: gemma_like has rotary embeddings, GQA, q/k norm, pre+post RMS
norms, soft caps and a sliding window of 6 with prompts of up to 12 tokens, so the
right-alignment of the cached context and the window masking are really tested.

Tolerances (float64): the single-token path and a full forward compute the same arithmetic in a
different order, ~1e-15 relative; we allow 1e-10 for the clean chain and 1e-9 after a
perturbation (the model amplifies rounding by its Lipschitz constant over a few layers). JVPs
against dense jacrev Jacobians: same function, exact derivatives, 1e-9. Central differences
with a relative step 1e-3 have O(1e-6) truncation error; we allow 1e-4 relative.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from steerlin import ConceptDirections
from steerlin.errors import InputError
from steerlin.frozen import build_context, iter_contexts
from steerlin.gains import per_prompt_gains, scan_context
from steerlin.hooks import inject
from steerlin.readouts import Readout, make_readout
from steerlin.trajectory import capture


def _final(model, tokens_1d):
    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    _, cache = model.run_with_cache(torch.tensor([tokens_1d]), names_filter=name)
    return cache[name][0, -1]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def setup(tiny):
    prompts = random_prompts(tiny, 7, 3, 12, seed=1)
    assert max(len(p) for p in prompts) > 6  # longer than gemma_like's window
    ctxs = list(iter_contexts(tiny, prompts, batch_size=4))
    return tiny, prompts, ctxs


def test_contexts_cover_prompts_and_states_match_capture(setup):
    model, prompts, ctxs = setup
    idx = torch.cat([c.index for c in ctxs])
    assert sorted(idx.tolist()) == list(range(len(prompts)))
    tr = capture(model, prompts)
    for c in ctxs:
        assert c.n_layers == model.cfg.n_layers
        assert c.lengths.tolist() == [len(prompts[i]) for i in c.index.tolist()]
        assert _rel(c.states, tr.states[c.index]) < 1e-10


def test_chain_from_x0_reproduces_xL(setup):
    _, _, ctxs = setup
    for c in ctxs:
        assert _rel(c.run(c.states[:, 0], 0), c.states[:, -1]) < 1e-10
        for l in range(c.n_layers):
            assert _rel(c.block(l, c.states[:, l]), c.states[:, l + 1]) < 1e-10
        # partial chains
        assert _rel(c.run(c.states[:, 1], 1, 3), c.states[:, 3]) < 1e-10


def test_perturbed_chain_equals_full_model_with_inject(setup):
    model, prompts, ctxs = setup
    g = torch.Generator().manual_seed(0)
    for layer in range(model.cfg.n_layers):
        v = 0.5 * torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64)
        for c in ctxs:
            xp = c.run(c.states[:, layer] + v, layer)
            assert (xp - c.states[:, -1]).norm() > 1e-3  # the perturbation is not negligible
            for r, i in enumerate(c.index.tolist()):
                with inject(model, {layer: v}):
                    ref = _final(model, prompts[i])
                torch.testing.assert_close(xp[r], ref, rtol=1e-9, atol=1e-9)


def test_batch_composition_does_not_matter(setup):
    model, prompts, _ = setup
    v = torch.linspace(-1, 1, model.cfg.d_model, dtype=torch.float64)
    outs = {}
    for bs in (1, 7):
        for c in iter_contexts(model, prompts, batch_size=bs):
            y = c.run(c.states[:, 1] + v, 1)
            for r, i in enumerate(c.index.tolist()):
                outs.setdefault(i, []).append(y[r])
    for a, b in outs.values():
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_jvp_equals_dense_jacobian(setup):
    model, _, ctxs = setup
    H = model.cfg.d_model
    c = ctxs[0]
    g = torch.Generator().manual_seed(0)
    k = torch.randn(len(c), 5, H, generator=g, dtype=torch.float64)
    for layer in (0, model.cfg.n_layers - 1):
        J = c.jvp(layer, k, chunk=2)  # chunking over tangents must not matter
        assert J.shape == (len(c), 5, H)
        for r in range(len(c)):
            f = lambda x, r=r, layer=layer: c.block(layer, x[None].expand(len(c), -1))[r]
            Jd = torch.func.jacrev(f)(c.states[r, layer])
            torch.testing.assert_close(J[r], k[r] @ Jd.T, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(c.jvp(layer, k), J, rtol=0, atol=1e-13)


def test_central_difference_close_to_jvp(setup):
    model, _, ctxs = setup
    g = torch.Generator().manual_seed(1)
    for c in ctxs:
        k = torch.randn(len(c), 3, model.cfg.d_model, generator=g, dtype=torch.float64)
        J = c.jvp(1, k)
        cd = c.central_difference(1, k)
        assert ((cd - J).norm() / J.norm()).item() < 1e-4


def test_block_many_equals_loop(setup):
    model, _, ctxs = setup
    c = ctxs[0]
    z = c.states[:, 2][:, None, :] + torch.randn(len(c), 3, model.cfg.d_model, dtype=torch.float64)
    out = c.block_many(2, z)
    for j in range(3):
        torch.testing.assert_close(out[:, j], c.block(2, z[:, j]), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ readouts and gains


def _directions(model):
    prompts = random_prompts(model, 10, 3, 12, seed=7)
    return ConceptDirections.fit(model, prompts, [i % 2 for i in range(10)])


def test_logit_readout_equals_full_forward_logits(setup):
    model, prompts, ctxs = setup
    rd = make_readout(model, "logits", None, label_words=[3, 5])
    for c in ctxs:
        y = rd(model, c.states[:, -1])
        for r, i in enumerate(c.index.tolist()):
            logits = model(torch.tensor([prompts[i]]))[0, -1]
            torch.testing.assert_close(y[r], logits[3] - logits[5], rtol=1e-10, atol=1e-10)
    # and under a perturbation, against a hooked full forward
    v = torch.ones(model.cfg.d_model, dtype=torch.float64)
    c = ctxs[0]
    y = rd(model, c.run(c.states[:, 1] + v, 1))
    for r, i in enumerate(c.index.tolist()):
        with inject(model, {1: v}):
            logits = model(torch.tensor([prompts[i]]))[0, -1]
        torch.testing.assert_close(y[r], logits[3] - logits[5], rtol=1e-9, atol=1e-9)


def test_readout_gradients(setup):
    model, _, ctxs = setup
    x = ctxs[0].states[:, -1]
    d = torch.nn.functional.normalize(torch.arange(model.cfg.d_model, dtype=torch.float64), dim=0)
    concept = make_readout(model, "concept", d)
    torch.testing.assert_close(concept(model, x), x @ d)
    torch.testing.assert_close(concept.gradient(model, x), d.expand_as(x))
    logit = make_readout(model, "logits", None, label_words=[3, 5])
    grad = logit.gradient(model, x)
    for r in range(len(x)):
        dense = torch.func.jacrev(lambda z: logit(model, z))(x[r])
        torch.testing.assert_close(grad[r], dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["concept", "logits"])
def test_per_prompt_gains_vs_full_model_finite_differences(setup, kind):
    model, prompts, ctxs = setup
    dirs = _directions(model)
    L = model.cfg.n_layers
    b = dirs.b[:L]
    rd = make_readout(model, kind, dirs.unit[-1], label_words=[3, 5])
    c = ctxs[0]
    G = per_prompt_gains(c, b, rd)
    assert G.shape == (len(c), L)
    eps = 1e-4  # central difference: O(eps^2) truncation, O(1e-16/eps) rounding
    for l in range(L):
        ys = []
        for sign in (1, -1):
            y = []
            for i in c.index.tolist():
                with inject(model, {l: sign * eps * b[l]}):
                    y.append(rd(model, _final(model, prompts[i])))
            ys.append(torch.stack(y))
        fd = (ys[0] - ys[1]) / (2 * eps)
        torch.testing.assert_close(G[:, l], fd, rtol=1e-6, atol=1e-6 * G.abs().max().item())
    assert G.abs().min() > 1e-6  # gains are not trivially zero


def test_scan_context_matches_chain(setup):
    model, _, ctxs = setup
    dirs = _directions(model)
    L = model.cfg.n_layers
    b = dirs.b[:L]
    rd = make_readout(model, "concept", dirs.unit[-1])
    c = ctxs[0]
    y = scan_context(c, b, rd, 0.1, [2, 0])
    assert y.shape == (len(c), 2, 2)
    for j, l in enumerate([2, 0]):
        for s, sign in enumerate((1, -1)):
            ref = rd(model, c.run(c.states[:, l] + sign * 0.1 * b[l], l))
            torch.testing.assert_close(y[:, j, s], ref, rtol=1e-12, atol=1e-12)


def test_build_context_single_prompt(gpt2_like):
    tokens = torch.tensor([[1, 2, 3, 4]])
    c = build_context(gpt2_like, tokens, torch.tensor([4]))
    assert c.index.tolist() == [0] and len(c) == 1
    torch.testing.assert_close(c.states[0, -1], _final(gpt2_like, [1, 2, 3, 4]))


def test_one_token_prompt(tiny):
    """Empty context: the last token attends only to itself."""
    (c,) = iter_contexts(tiny, [[5]])
    v = torch.ones(tiny.cfg.d_model, dtype=torch.float64)
    with inject(tiny, {0: v}):
        ref = _final(tiny, [5])
    torch.testing.assert_close(c.run(c.states[:, 0] + v, 0)[0], ref, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ make_readout errors


def test_make_readout(gpt2_like):
    d = torch.ones(gpt2_like.cfg.d_model, dtype=torch.float64)
    r = Readout("logits", pos_token=1, neg_token=2)
    assert make_readout(gpt2_like, r, d) is r
    assert make_readout(gpt2_like, "concept", d).kind == "concept"
    lo = make_readout(gpt2_like, "logits", d, label_words=(7, 8))
    assert (lo.pos_token, lo.neg_token) == (7, 8)
    assert lo.to_meta() == {"kind": "logits", "pos_token": 7, "neg_token": 8}


def test_make_readout_errors(gpt2_like):
    d = torch.ones(gpt2_like.cfg.d_model, dtype=torch.float64)
    with pytest.raises(InputError, match="readout: expected 'concept' or 'logits', got 'logit'"):
        make_readout(gpt2_like, "logit", d)
    with pytest.raises(InputError, match=r"label_words: expected \(positive, negative\)"):
        make_readout(gpt2_like, "logits", d, label_words=[1, 2, 3])
    with pytest.raises(InputError, match="label_words: the model has no tokenizer"):
        make_readout(gpt2_like, "logits", d)  # default words are strings
    with pytest.raises(InputError, match=r"label_words: token id 97 outside 0\.\.96"):
        make_readout(gpt2_like, "logits", d, label_words=[1, 97])
    with pytest.raises(InputError, match=r"label_words: token id -1 outside"):
        make_readout(gpt2_like, "logits", d, label_words=[-1, 2])
