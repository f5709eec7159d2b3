"""The peers' own code (steering-vectors, repeng) through `steerlin.peers` on tiny seeded
Hugging Face models (tests/_hf_tiny.py, nothing downloaded): each trains a vector, steers the
generation with its own mechanism, and leaves the model as it was. Skipped, with the install
command, where a peer is not installed (`pip install --no-deps steering-vectors repeng`)."""

from __future__ import annotations

import sys

import pytest
import torch
from _hf_tiny import hf_model, tokenizer_for

from steerlin import peers

POS = ["the movie was good", "a great film", "happy fun story", "the best acting", "love it"]
NEG = ["the movie was bad", "an awful film", "sad dull story", "the worst acting", "hate it"]
PROMPTS = ["the movie", "a film was", "the plot is very"]
#: Coefficients large enough to move a tiny random model's greedy tokens, on each scale.
COEFF = {"steering-vectors": 8.0, "repeng": 40.0}


def _skip_unless(peer: str):
    why = peers.available(peer)
    if why is not None:
        pytest.skip(f"{peer} not installed: {why}")


def _hooks(model) -> int:
    """Forward hooks on the model, other than transformers' own output-capturing hooks (it
    installs them, once, on the first call with output_hidden_states, as repeng's training)."""
    return sum(
        not getattr(h, "__module__", "").startswith("transformers")
        for m in model.modules()
        for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    )


@pytest.fixture(params=["gemma3", "gpt2"])
def tiny(request):
    model = hf_model(request.param, dtype=torch.float32, n_layers=4)
    return peers.prepare_hf(model, tokenizer_for(request.param))


@pytest.mark.parametrize("peer", peers.PEERS)
def test_peer_trains_steers_and_cleans_up(peer, tiny):
    _skip_unless(peer)
    model, tok = tiny
    blocks = [type(b) for b in _blocks(model)]
    hooks0 = _hooks(model)
    pv = peers.train(peer, model, tok, POS, NEG)
    L = peers.n_blocks(model)
    assert pv.peer == peer and pv.n_layers == L
    assert pv.train_texts == 2 * len(POS) and pv.train_tokens > pv.train_texts
    # layer mapping: peer n (output of block n) is steerlin's x_{n+1}
    assert pv.steerlin_layers == tuple(n + 1 for n in pv.layers)
    if peer == "steering-vectors":
        assert pv.layers == tuple(range(L))  # its default: every decoder block
    else:
        assert pv.layers == tuple(range(1, L))  # <= 5 layers: every layer it trained (1..n-1)
        assert all(abs(float(v.norm()) - 1) < 1e-4 for v in pv.directions().values())
    c = COEFF[peer]
    vec = pv.steerlin_vectors(c)
    for n, v in pv.directions().items():
        torch.testing.assert_close(vec[n + 1], c * v)
        assert pv.injected_norms(-c)[n + 1] == pytest.approx(c * float(v.norm()))
    assert vec.shape == (L + 1, v.shape[0]) and not vec[0].any()

    base = peers.generate(model, tok, PROMPTS, 6)
    assert base.new_ids.shape == (len(PROMPTS), 6)
    assert base.forward_tokens == sum(map(len, base.prompt_ids)) + base.new_ids.numel()
    plus = peers.generate(model, tok, PROMPTS, 6, vector=pv, coeff=c)
    minus = peers.generate(model, tok, PROMPTS, 6, vector=pv, coeff=-c)
    assert not torch.equal(plus.new_ids, base.new_ids)
    assert not torch.equal(plus.new_ids, minus.new_ids)
    assert peers.next_token_kl(model, base, pv, c, n_new=4) > 1e-3
    assert peers.next_token_kl(model, base, pv, 0.0, n_new=4) == pytest.approx(0, abs=1e-9)

    # nothing left behind, also when the steered block raises
    with pytest.raises(RuntimeError, match="boom"), pv.apply(model, c):
        raise RuntimeError("boom")
    assert _hooks(model) == hooks0
    assert [type(b) for b in _blocks(model)] == blocks
    again = peers.generate(model, tok, PROMPTS, 6)
    assert torch.equal(again.new_ids, base.new_ids)


def _blocks(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def test_missing_peer_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "steering_vectors", None)
    monkeypatch.setitem(sys.modules, "repeng", None)
    for peer, load in (
        ("steering-vectors", peers.import_steering_vectors),
        ("repeng", peers.import_repeng),
    ):
        with pytest.raises(peers.PeerMissingError, match="--no-deps steering-vectors repeng"):
            load()
        assert "pip install" in peers.available(peer)
    with pytest.raises(ImportError):  # PeerMissingError is an ImportError
        peers.import_repeng()


def test_bad_inputs():
    with pytest.raises(peers.InputError, match="equal length"):
        peers.train("repeng", None, None, ["a"], [])
    with pytest.raises(peers.InputError, match="peer"):
        peers.train("nope", None, None, ["a"], ["b"])
    with pytest.raises(peers.InputError, match="Hugging Face"):
        peers.prepare_hf(object(), None)
