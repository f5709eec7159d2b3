"""steerlin.directions: class-mean directions, units, validation, safetensors persistence.

Tolerance: directions are plain means of captured float64 states, so manual recomputation from
`capture` agrees to rounding (1e-12 absolute on O(10) numbers); save/load must be bit-exact.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_gpt2_like, random_prompts
from safetensors.torch import save_file

from steerlin import ConceptDirections, capture
from steerlin.errors import FileFormatError, InputError, ShapeError


def _data(model, n=12, seed=0):
    prompts = random_prompts(model, n, 3, 12, seed=seed)
    labels = [i % 2 for i in range(n)]
    return prompts, labels


def test_vectors_are_class_mean_difference(tiny):
    prompts, labels = _data(tiny)
    dirs = ConceptDirections.fit(tiny, prompts, labels, batch_size=5)
    x = capture(tiny, prompts).states
    y = torch.tensor(labels)
    v = x[y == 1].mean(0) - x[y == 0].mean(0)
    torch.testing.assert_close(dirs.vectors, v, rtol=0, atol=1e-12)
    torch.testing.assert_close(dirs.unit, v / v.norm(dim=-1, keepdim=True), rtol=0, atol=1e-12)
    ones = torch.ones(tiny.cfg.n_layers + 1, dtype=torch.float64)
    torch.testing.assert_close(dirs.unit.norm(dim=-1), ones)
    torch.testing.assert_close(dirs.scale, x.norm(dim=-1).mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(dirs.b, dirs.scale[:, None] * dirs.unit, rtol=0, atol=0)
    torch.testing.assert_close(dirs.injection(2), dirs.scale[2] * dirs.unit[2], rtol=0, atol=0)
    assert dirs.n_layers == tiny.cfg.n_layers and dirs.d_model == tiny.cfg.d_model
    assert dirs.meta["n_prompts"] == 12 and dirs.meta["n_pos"] == 6 and dirs.meta["n_neg"] == 6
    assert dirs.meta["n_layers"] == tiny.cfg.n_layers
    dirs.check_for(tiny)


def test_fit_from_trajectory_equals_fit_from_prompts(gpt2_like):
    prompts, labels = _data(gpt2_like)
    a = ConceptDirections.fit(gpt2_like, prompts, labels)
    b = ConceptDirections.fit(gpt2_like, capture(gpt2_like, prompts), labels)
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.scale, b.scale)


def test_swapping_labels_flips_the_direction(gpt2_like):
    prompts, labels = _data(gpt2_like)
    a = ConceptDirections.fit(gpt2_like, prompts, labels)
    b = ConceptDirections.fit(gpt2_like, prompts, [1 - y for y in labels])
    torch.testing.assert_close(b.unit, -a.unit, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.scale, a.scale, rtol=0, atol=1e-12)


def test_to_dtype(gpt2_like):
    prompts, labels = _data(gpt2_like)
    d32 = ConceptDirections.fit(gpt2_like, prompts, labels).to(torch.float32)
    assert d32.unit.dtype == d32.scale.dtype == d32.vectors.dtype == torch.float32


# ------------------------------------------------------------------ validation


def test_one_class_labels(gpt2_like):
    prompts, _ = _data(gpt2_like, n=4)
    with pytest.raises(InputError, match=r"need prompts of both classes .* got only class 1"):
        ConceptDirections.fit(gpt2_like, prompts, [1, 1, 1, 1])


def test_label_length_mismatch(gpt2_like):
    prompts, _ = _data(gpt2_like, n=4)
    with pytest.raises(
        ShapeError, match=r"labels: expected 4 labels \(one per prompt\), got \(3,\)"
    ):
        ConceptDirections.fit(gpt2_like, prompts, [0, 1, 0])


@pytest.mark.parametrize("labels", [[0, 1, 2, 1], [0, 1, -1, 1], [0.5, 1, 0, 1]])
def test_non_binary_labels(gpt2_like, labels):
    prompts, _ = _data(gpt2_like, n=4)
    with pytest.raises(InputError, match="labels: expected 0/1 labels, got values"):
        ConceptDirections.fit(gpt2_like, prompts, labels)


def test_empty_prompts(gpt2_like):
    with pytest.raises(InputError, match="expected at least one prompt"):
        ConceptDirections.fit(gpt2_like, [], [])


def test_zero_direction_warning_when_prompts_share_last_token(tiny):
    """Same last token -> identical x_0 (gpt2_like: also same length, for the position
    embedding) -> zero class-mean difference at layer 0 only."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 90, (6,), generator=g).tolist() + [93] for _ in range(8)]
    labels = [i % 2 for i in range(8)]
    with pytest.warns(UserWarning, match=r"concept direction is zero at layers \[0\]"):
        dirs = ConceptDirections.fit(tiny, prompts, labels)
    assert torch.equal(dirs.unit[0], torch.zeros(tiny.cfg.d_model, dtype=torch.float64))
    assert torch.equal(dirs.injection(0), torch.zeros(tiny.cfg.d_model, dtype=torch.float64))
    ones = torch.ones(tiny.cfg.n_layers, dtype=torch.float64)
    torch.testing.assert_close(dirs.unit[1:].norm(dim=-1), ones)
    assert dirs.scale[0] > 0


def test_no_warning_for_ordinary_data(gpt2_like):
    prompts, labels = _data(gpt2_like)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ConceptDirections.fit(gpt2_like, prompts, labels)


# ------------------------------------------------------------------ persistence


@pytest.fixture
def fitted(gpt2_like):
    prompts, labels = _data(gpt2_like)
    return ConceptDirections.fit(gpt2_like, prompts, labels)


def test_save_load_round_trip_exact(fitted, gpt2_like, tmp_path):
    path = tmp_path / "sub" / "dirs.safetensors"
    fitted.save(path)
    back = ConceptDirections.load(path, model=gpt2_like)
    for k in ("vectors", "unit", "scale"):
        assert torch.equal(getattr(back, k), getattr(fitted, k)), k
        assert getattr(back, k).dtype == getattr(fitted, k).dtype
    assert back.meta == fitted.meta
    assert not (tmp_path / "sub" / "dirs.safetensors.tmp").exists()
    assert torch.equal(ConceptDirections.load(path).unit, fitted.unit)  # no model: no check


def test_load_foreign_safetensors(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file(
        {"vectors": torch.zeros(4, 32), "unit": torch.zeros(4, 32), "scale": torch.ones(4)},
        str(path),
    )
    with pytest.raises(
        FileFormatError,
        match=r"is not a steerlin ConceptDirections file \(no "
        r"steerlin metadata\)",
    ):
        ConceptDirections.load(path)


def test_load_other_steerlin_kind(fitted, tmp_path):
    from steerlin.io import save_tensors

    path = tmp_path / "other.safetensors"
    save_tensors(path, "Surrogate", {"A": torch.zeros(2)}, {})
    with pytest.raises(FileFormatError, match=r"\(it holds a Surrogate\)"):
        ConceptDirections.load(path)


def test_load_truncated(fitted, tmp_path):
    path = tmp_path / "dirs.safetensors"
    fitted.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="is not a readable safetensors file"):
        ConceptDirections.load(path)


def test_load_pickle_renamed(fitted, tmp_path):
    path = tmp_path / "dirs.safetensors"
    torch.save({"vectors": fitted.vectors, "unit": fitted.unit, "scale": fitted.scale}, path)
    with pytest.raises(FileFormatError, match="is not a readable safetensors file"):
        ConceptDirections.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileFormatError, match="no such file"):
        ConceptDirections.load(tmp_path / "nope.safetensors")


def test_load_newer_format(fitted, tmp_path):
    path = tmp_path / "dirs.safetensors"
    t = {"vectors": fitted.vectors, "unit": fitted.unit, "scale": fitted.scale}
    save_file(t, str(path), {"steerlin": "ConceptDirections", "format": "999", "meta": "{}"})
    with pytest.raises(FileFormatError, match=r"newer steerlin \(format 999\)"):
        ConceptDirections.load(path)


def test_load_with_model_of_another_shape(fitted, tmp_path):
    path = tmp_path / "dirs.safetensors"
    fitted.save(path)
    other = make_gpt2_like(n_layers=4)
    with pytest.raises(
        FileFormatError,
        match=r"was made for a model with n_layers=3, this model "
        r"has n_layers=4",
    ):
        ConceptDirections.load(path, model=other)
    with pytest.raises(
        ShapeError,
        match=r"expected unit of shape \[5, 32\] for this model, got "
        r"\(4, 32\)",
    ):
        fitted.check_for(other)
