"""`steerlin.steer`: the steering-vectors habit in one call, against the peers' own `apply` on
the same weights (a tiny seeded Hugging Face model and its TransformerLens wrapping,
tests/_hf_tiny.py), its layer mapping, clean-up and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _hf_tiny import hf_model, wrap
from conftest import make_gemma_like

import steerlin
from steerlin import ConceptDirections, count_hooks, peers, steer
from steerlin.errors import InputError, LayerError, ModelTypeError, ShapeError

TOKS = [[1, 7, 12, 5, 30, 9], [1, 4, 4, 18, 2, 6]]


def _vec(h: int, seed: int) -> torch.Tensor:
    return torch.randn(h, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request):
    """The same weights as a Hugging Face model (the peers run on it) and as steerlin's model."""
    arch = request.param
    return hf_model(arch, torch.float64, seed=0), wrap(arch, torch.float64, seed=0)


def _hf_logits(hf, toks) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor(toks)).logits


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to 1e-6 of the largest logit: Hugging Face's Llama RMSNorm computes in float32,
    so the two wrappings of the same float64 weights agree to ~1e-7 relative (tests/test_bridge.py),
    while the steering moves the logits by far more (checked beside each comparison)."""
    tol = 1e-6 * float(b.abs().max())
    torch.testing.assert_close(a.to(b.dtype), b, rtol=0, atol=tol)


def _peer(kind: str, vector, layers, L: int):
    return peers.PeerVector(kind, vector, tuple(layers), L, 0, 0, 0.0)


def test_matches_steering_vectors_apply(pair):
    """Same vector, same coefficient: steerlin.steer on the TransformerLens model gives the
    logits steering-vectors' own `SteeringVector.apply` gives on the Hugging Face model, on
    every position (the default) and from a token index on; block n's output is x_{n+1}, the
    last block's output (n = L-1) is x_L."""
    if peers.available("steering-vectors") is not None:
        pytest.skip(f"steering-vectors not installed: {peers.available('steering-vectors')}")
    from steering_vectors import SteeringVector

    hf, tl = pair
    L, H = tl.cfg.n_layers, tl.cfg.d_model
    acts = {0: 3.0 * _vec(H, 1), L - 1: 2.0 * _vec(H, 2)}
    sv = SteeringVector(layer_activations=acts, layer_type="decoder_block")
    clean = tl(torch.tensor(TOKS)).to(torch.float64)
    _close(clean, _hf_logits(hf, TOKS))
    for coeff in (1.5, -4.0):
        with _peer("steering-vectors", sv, acts, L).apply(hf, coeff):
            want = _hf_logits(hf, TOKS)
        with steer(tl, sv, coefficient=coeff) as s:
            got = tl(torch.tensor(TOKS))
        assert s.layers == [1, L] and s.source == "steering-vectors"
        assert s.injected_norms[1] == pytest.approx(abs(coeff) * float(acts[0].norm()))
        assert (got - clean).abs().max() > 1e-2  # it steers
        _close(got, want)
        # the same vector brought as a plain dict in the tools' numbering, and ("from", i)
        # = steering-vectors' min_token_index
        with sv.apply(hf, multiplier=coeff, min_token_index=3):
            want_from = _hf_logits(hf, TOKS)
        vec = steerlin.block_outputs(acts)
        with steer(tl, vec, coefficient=coeff, positions=("from", 3)):
            got_from = tl(torch.tensor(TOKS))
        _close(got_from, want_from)
        torch.testing.assert_close(got_from[:, :3], clean[:, :3], rtol=1e-10, atol=1e-10)
    assert count_hooks(tl) == 0


def test_matches_repeng_control(pair):
    """repeng's `ControlModel.set_control(vector, coeff)` on the Hugging Face model and
    steerlin.steer with the same ControlVector: same logits."""
    if peers.available("repeng") is not None:
        pytest.skip(f"repeng not installed: {peers.available('repeng')}")
    repeng = peers.import_repeng()
    hf, tl = pair
    L, H = tl.cfg.n_layers, tl.cfg.d_model
    dirs = {n: (_vec(H, 10 + n) / _vec(H, 10 + n).norm()).numpy() for n in range(1, L)}
    cv = repeng.ControlVector(model_type=hf.config.model_type, directions=dirs)
    coeff = 6.0
    with _peer("repeng", cv, dirs, L).apply(hf, coeff) as cm, torch.no_grad():
        # one prompt per call: repeng 0.4.0's position mask assumes position_ids [batch, T],
        # which transformers 5 passes as [1, T]
        want = torch.cat([cm(torch.tensor([t])).logits for t in TOKS])
    with steer(tl, cv, coefficient=coeff) as s:
        got = tl(torch.tensor(TOKS))
    assert s.layers == list(range(2, L + 1)) and s.source == "repeng"
    assert all(n == pytest.approx(coeff) for n in s.injected_norms.values())
    assert (got - tl(torch.tensor(TOKS))).abs().max() > 1e-2
    _close(got, want)
    assert count_hooks(tl) == 0


@pytest.fixture(scope="module")
def model():
    return make_gemma_like()


def test_inputs_agree_and_layers(model):
    """A [H] vector at chosen layers, the same as a dict, as a [L+1, H] tensor and as
    ConceptDirections (its raw class-mean differences) give the same forward."""
    L, H = model.cfg.n_layers, model.cfg.d_model
    v = _vec(H, 3)
    toks = torch.tensor(TOKS)
    with steer(model, v, layers=[1, 3], coefficient=0.5):
        a = model(toks)
    with steer(model, {1: v, 3: v, 2: 9 * v}, layers=[1, 3], coefficient=0.5):
        b = model(toks)
    full = torch.zeros(L + 1, H, dtype=torch.float64)
    full[1] = full[3] = v
    with steer(model, full, layers=[1, 3], coefficient=0.5):
        c = model(toks)
    dirs = ConceptDirections(full, full, torch.ones(L + 1, dtype=torch.float64), {})
    with steer(model, dirs, layers=[1, 3], coefficient=0.5):
        d = model(toks)
    with steerlin.inject(model, {1: 0.5 * v, 3: 0.5 * v}, positions="all"):
        ref = model(toks)
    for x in (a, b, c, d):
        torch.testing.assert_close(x, ref, rtol=0, atol=0)
    assert not torch.allclose(a, model(toks))
    with steer(model, v, layers=2, coefficient=1.0, positions="last") as s:
        last = model(toks)
    assert s.layers == [2]
    torch.testing.assert_close(last[:, :-1], model(toks)[:, :-1], rtol=0, atol=0)
    assert count_hooks(model) == 0


def test_relative_norms(model):
    v = _vec(model.cfg.d_model, 4)
    with steer(model, v, layers=[0, 2], coefficient=2.0) as s:
        pass
    prompts = [t[:4] for t in TOKS]
    rel = s.relative_norms(model, prompts)
    states = steerlin.capture(model, prompts).states.norm(dim=-1).mean(0)
    for l in (0, 2):
        assert rel[l] == pytest.approx(2.0 * float(v.norm()) / float(states[l]))


def test_hooks_removed_on_exception(model):
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, _vec(model.cfg.d_model, 5), layers=[1]):
            assert count_hooks(model) > 0
            raise RuntimeError("boom")
    assert count_hooks(model) == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(layers=None), InputError, "layers: a vector covers every layer"),
        (dict(layers=[9]), LayerError, "layers: expected indices in 0..4"),
        (dict(layers=[1.5]), LayerError, "layers"),
        (dict(layers=[1], coefficient=float("nan")), InputError, "coefficient"),
        (dict(layers=[1], coefficient="2"), InputError, "coefficient"),
        (dict(layers=[1], positions="middle"), InputError, "positions"),
    ],
)
def test_bad_inputs(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        with steer(model, _vec(model.cfg.d_model, 6), **kwargs):
            pass
    assert count_hooks(model) == 0


def test_bad_vectors(model):
    H = model.cfg.d_model
    with pytest.raises(ShapeError, match="directions"):
        with steer(model, torch.ones(H + 1), layers=[0]):
            pass
    with pytest.raises(ModelTypeError, match="directions"):
        with steer(model, "not a vector", layers=[0]):
            pass
    with pytest.raises(LayerError, match=r"no vector at x_l for l in \[2\]"):
        with steer(model, {1: torch.ones(H)}, layers=[2]):
            pass
    with pytest.raises(InputError, match="NaN"):
        with steer(model, {1: torch.full((H,), np.nan)}):
            pass
    assert count_hooks(model) == 0


def _gen(model, p, cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            torch.tensor([p]),
            max_new_tokens=5,
            do_sample=False,
            stop_at_eos=False,
            verbose=False,
            use_past_kv_cache=cache,
        )[0, len(p) :]


def test_final_state_under_cached_generation(model):
    """x_L (the last block's output) under model.generate with the KV cache: "last" and
    "generated" ("generated" reads the cache offset, recorded for x_L off the last block) steer
    the last prompt token and every new token, the same tokens as ("from", n_prompt - 1)
    without the cache."""
    L, p = model.cfg.n_layers, TOKS[0]
    v = 40.0 * _vec(model.cfg.d_model, 8)
    plain = _gen(model, p, True)
    for layers in ([L], [L - 1, L]):
        with steer(model, v, layers=layers, positions=("from", len(p) - 1)):
            ref = _gen(model, p, False)
        assert not torch.equal(ref, plain)
        for pos in ("last", "generated"):
            with steer(model, v, layers=layers, positions=pos):
                assert torch.equal(_gen(model, p, True), ref), (layers, pos)
    assert count_hooks(model) == 0


def test_gguf_control_vector(model, tmp_path):
    """A llama.cpp / repeng control-vector file brings its own layers: direction.N is added to
    the output of layer N, steerlin's x_{N+1}; coefficient scales it as llama.cpp's does."""
    from steerlin.interop import write_gguf

    H = model.cfg.d_model
    v1, v2 = _vec(H, 11).float(), _vec(H, 12).float()
    path = write_gguf(tmp_path / "cv.gguf", {1: v1.numpy(), 3: v2.numpy()}, model_hint="toy")
    toks = torch.tensor(TOKS)
    with steer(model, path, coefficient=-0.7) as s:
        got = model(toks)
    assert s.layers == [2, 4] and s.source.startswith("gguf:")
    add = {2: -0.7 * v1.double(), 4: -0.7 * v2.double()}
    with steerlin.inject(model, add, positions="all"):
        ref = model(toks)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
