"""Bring-your-own directions: tensors, dicts, steering-vectors / repeng objects, GGUF files.

Layer conventions are checked by parity with each tool's own rule, emulated on the tiny model:
steering-vectors and repeng add their vector n to the OUTPUT of block n (a torch forward hook on
`model.blocks[n]`, as `_create_additive_hook` / `ControlModule` do), llama.cpp adds
`direction.N` to the output of layer N at every position. steerlin must put the same vector at
x_{n+1} (`blocks.{n+1}.hook_resid_pre`) and produce the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from conftest import random_prompts

from steerlin import ConceptDirections, Surrogate
from steerlin.backend import count_hooks
from steerlin.errors import FileFormatError, InputError, LayerError, ModelTypeError, ShapeError
from steerlin.interop import read_gguf, write_gguf
from steerlin.schedule import Schedule
from steerlin.trajectory import capture


@dataclass
class SteeringVector:  # the shape of steering_vectors.SteeringVector (no dependency)
    layer_activations: dict[int, torch.Tensor]
    layer_type: str = "decoder_block"


@dataclass
class ControlVector:  # the shape of repeng.ControlVector
    model_type: str
    directions: dict[int, np.ndarray] = field(default_factory=dict)


def _v(model, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64)


def _unit(v):
    return v / v.norm()


def test_one_vector_is_the_same_direction_everywhere_and_scales_come_from_the_prompts(tiny):
    prompts = random_prompts(tiny, 6)
    v = _v(tiny, 0)
    d = ConceptDirections.from_vectors(tiny, v, prompts)
    L = tiny.cfg.n_layers
    torch.testing.assert_close(d.unit, _unit(v).expand(L + 1, -1), rtol=0, atol=1e-15)
    traj = capture(tiny, prompts)
    torch.testing.assert_close(d.scale, traj.states.norm(dim=-1).mean(0), rtol=0, atol=0)
    assert d.meta["source"] == "vector" and d.meta["given_layers"] == list(range(L + 1))


def test_tensor_per_layer_and_dict_with_nearest_fill(gemma_like):
    L, H = gemma_like.cfg.n_layers, gemma_like.cfg.d_model  # L = 4: states 0..4
    prompts = random_prompts(gemma_like, 4)
    T = torch.stack([_v(gemma_like, i) for i in range(L + 1)])
    d = ConceptDirections.from_vectors(gemma_like, T, prompts)
    torch.testing.assert_close(d.unit, T / T.norm(dim=-1, keepdim=True), rtol=0, atol=1e-15)
    a, b = _v(gemma_like, 10), _v(gemma_like, 11)
    d = ConceptDirections.from_vectors(gemma_like, {1: a, 3: b}, prompts)
    want = torch.stack([_unit(x) for x in (a, a, b, b, b)])  # layer 2: tie -> the later (3)
    torch.testing.assert_close(d.unit, want, rtol=0, atol=1e-15)
    d = ConceptDirections.from_vectors(gemma_like, {-1: a}, prompts)
    assert d.meta["given_layers"] == [L]
    d = ConceptDirections.from_vectors(gemma_like, {0: a}, prompts, index="block_output")
    assert d.meta["given_layers"] == [1]
    with pytest.raises(ShapeError, match=rf"expected a tensor of shape \[{L + 1}, {H}\]"):
        ConceptDirections.from_vectors(gemma_like, T[:L], prompts)
    with pytest.raises(LayerError, match="layer index 7 outside"):
        ConceptDirections.from_vectors(gemma_like, {7: a}, prompts)
    with pytest.raises(ModelTypeError, match="directions: expected ConceptDirections, a tensor"):
        ConceptDirections.from_vectors(gemma_like, [a, b], prompts)
    with pytest.raises(ShapeError, match=r"directions\[1\]: expected a vector of shape \[32\]"):
        ConceptDirections.from_vectors(gemma_like, {1: a[:5]}, prompts)


def _block_output_hook(vec):
    """steering-vectors' `_create_additive_hook` / repeng's ControlModule: add to the output."""

    def hook(module, inputs, output):
        return output + vec

    return hook


def _logits_with_block_output_additions(model, tokens, by_block):
    handles = [
        model.blocks[n].register_forward_hook(_block_output_hook(v)) for n, v in by_block.items()
    ]
    try:
        return model(tokens)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("kind", ["steering-vectors", "repeng"])
def test_foreign_vectors_land_where_their_library_adds_them(gemma_like, kind):
    model = gemma_like
    prompts = random_prompts(model, 4)
    a, b = 3 * _v(model, 1), 2 * _v(model, 2)
    if kind == "steering-vectors":
        obj = SteeringVector({0: a, 2: b})
    else:
        obj = ControlVector("gemma3", {0: a.numpy(), 2: b.numpy()})
    d = ConceptDirections.from_vectors(model, obj, prompts)
    assert d.meta["given_layers"] == [1, 3] and d.meta["source"] == kind
    tokens = torch.tensor([[5, 9, 2, 7, 1]])
    ref = _logits_with_block_output_additions(model, tokens, {0: a, 2: b})
    sched = Schedule(
        amplitudes=d.vectors[:-1].norm(dim=-1) / d.scale[:-1],
        unit=d.unit[:-1],
        scale=d.scale[:-1],
    )
    keep = torch.zeros(model.cfg.n_layers, dtype=torch.float64)
    keep[[1, 3]] = 1  # only the layers given (the others are nearest-filled copies)
    sched = Schedule(sched.amplitudes * keep, sched.unit, sched.scale)
    with sched.apply(model, positions="all"):
        got = model(tokens)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ref, model(tokens))
    assert count_hooks(model) == 0


def test_steering_vector_of_a_sub_layer_is_refused(gemma_like):
    sv = SteeringVector({1: _v(gemma_like, 0)}, layer_type="mlp")
    with pytest.raises(InputError, match="layer_type='mlp'.*needs layer_type='decoder_block'"):
        ConceptDirections.from_vectors(gemma_like, sv, random_prompts(gemma_like, 2))


def test_fit_on_a_steering_vector(gemma_like):
    prompts = random_prompts(gemma_like, 6, seed=3)
    sv = SteeringVector({1: _v(gemma_like, 5)})
    sur = Surrogate.fit(gemma_like, prompts, directions=sv, d=4)
    dirs = ConceptDirections.from_vectors(gemma_like, sv, prompts)
    ref = Surrogate.fit(gemma_like, prompts, dirs, d=4)
    assert torch.equal(sur.gains, ref.gains)
    # the readout is <unit_L, x_L> along the (nearest-filled) final direction
    torch.testing.assert_close(sur.directions.unit[-1], _unit(_v(gemma_like, 5)), rtol=0, atol=0)
    assert sur.meta["directions_source"] == "steering-vectors"


# ------------------------------------------------------------------ GGUF


def _schedule(model, blocks, seed=0):
    L = model.cfg.n_layers
    g = torch.Generator().manual_seed(seed)
    unit = torch.randn(L, model.cfg.d_model, generator=g, dtype=torch.float64)
    unit = unit / unit.norm(dim=-1, keepdim=True)
    amp = torch.zeros(L, dtype=torch.float64)
    amp[blocks] = torch.linspace(0.5, 1.5, len(blocks), dtype=torch.float64)
    return Schedule(amp, unit, torch.full((L,), 4.0, dtype=torch.float64), {"model_name": "x"})


def test_gguf_round_trip_and_llama_cpp_layer_convention(gemma_like, tmp_path):
    """Block l of a schedule is written as direction.{l-1} and read back onto block l; applied the
    llama.cpp way (direction.N added to the output of layer N at every position) it gives the
    logits of the steerlin schedule at positions="all"."""
    model = gemma_like  # L = 4: injectable blocks 2, 3 <-> direction.1, direction.2
    sched = _schedule(model, [2, 3])
    path = sched.to_llama_cpp(tmp_path / "cv.gguf")
    found, meta = read_gguf(path)
    assert sorted(found) == [1, 2]
    assert meta["general.architecture"] == "controlvector"
    for n in (1, 2):  # direction.N holds block N+1's vector
        np.testing.assert_array_equal(found[n], sched.vectors[n + 1].to(torch.float32).numpy())
    back = Schedule.from_llama_cpp(path, model, scale=sched.scale)
    assert back.layers == [2, 3]
    torch.testing.assert_close(back.vectors, sched.vectors, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(back.amplitudes, sched.amplitudes, rtol=1e-6, atol=1e-6)
    # llama.cpp's rule, emulated: direction.N (float32 from the file) on the output of layer N
    tokens = torch.tensor([[4, 8, 15, 16, 23]])
    llama = {n: torch.as_tensor(found[n], dtype=torch.float64) for n in found}
    ref = _logits_with_block_output_additions(model, tokens, llama)
    with back.apply(model, positions="all"):
        got = model(tokens)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    raw = Schedule.from_llama_cpp(path, model)
    assert raw.meta["amplitude_units"] == "raw" and torch.equal(raw.vectors, back.vectors)


def test_repeng_style_gguf_with_final_layer(gemma_like, tmp_path):
    """repeng writes direction.{L-1} (its layer -1): that is x_L, after the last block."""
    model = gemma_like
    a, b = _v(model, 1), _v(model, 2)
    path = write_gguf(tmp_path / "r.gguf", {1: a, 3: b}, model_hint="gemma3")
    d = ConceptDirections.from_gguf(model, path, random_prompts(model, 3))
    assert d.meta["given_layers"] == [2, 4]
    torch.testing.assert_close(d.unit[4], _unit(b).to(d.unit), rtol=1e-6, atol=1e-7)
    with pytest.raises(LayerError, match=r"direction\.3 is added after the last block"):
        Schedule.from_llama_cpp(path, model)
    s = Schedule.from_llama_cpp(path, model, drop_final=True)
    assert s.layers == [2]


def test_gguf_errors(gemma_like, tmp_path):
    with pytest.raises(FileFormatError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(FileFormatError, match="not a readable GGUF"):
        read_gguf(bad)
    with pytest.raises(LayerError, match=r"direction\.0 is not a llama\.cpp layer"):
        write_gguf(tmp_path / "z.gguf", {0: np.zeros(32, np.float32)}, model_hint="x")
    big = write_gguf(tmp_path / "big.gguf", {9: np.ones(32, np.float32)}, model_hint="x")
    with pytest.raises(LayerError, match="beyond the model's 4 layers"):
        Schedule.from_llama_cpp(big, gemma_like)
    with pytest.raises(InputError, match="expected a .gguf file"):
        ConceptDirections.from_gguf(gemma_like, tmp_path / "x.bin", [[1, 2]])
