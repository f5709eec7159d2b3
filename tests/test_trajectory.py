"""steerlin.trajectory: right-padded batched capture equals unpadded per-prompt runs.

Tolerance: batching and right padding change nothing a real token sees (causal decoder), so
the only differences are float reduction-order effects of different batch shapes: ~1e-15
relative in float64 (we allow 1e-10), ~1e-7 in float32 (we allow 1e-5).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_gpt2_like, random_prompts

from steerlin.errors import InputError, ModelTypeError, ShapeError
from steerlin.hooks import state_hook_names
from steerlin.tokens import iter_batches, tokenize
from steerlin.trajectory import Trajectory, capture


def _reference_states(model, prompts):
    """x_0..x_L of each prompt's last token from its own unpadded forward."""
    L = model.cfg.n_layers
    names = state_hook_names(L)
    out = []
    for p in prompts:
        _, cache = model.run_with_cache(torch.tensor([p]), names_filter=lambda n: n in names)
        out.append(torch.stack([cache[n][0, -1] for n in names]))
    return torch.stack(out)


def _assert_rel(a, b, rel):
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err <= rel, f"relative error {err:.3g} > {rel:g}"


def test_capture_equals_unpadded_runs(tiny):
    prompts = random_prompts(tiny, 7, 3, 12)
    assert len({len(p) for p in prompts}) > 2  # really mixed lengths, so padding happens
    ref = _reference_states(tiny, prompts)
    tr = capture(tiny, prompts, batch_size=3)
    assert isinstance(tr, Trajectory)
    assert tr.states.shape == (7, tiny.cfg.n_layers + 1, tiny.cfg.d_model)
    assert tr.states.dtype == torch.float64
    assert len(tr) == 7 and tr.n_layers == tiny.cfg.n_layers
    _assert_rel(tr.states, ref, 1e-10)
    # the readout state is not trivially the embedding: the trajectory really moves
    assert (tr.states[:, -1] - tr.states[:, 0]).norm() > 1e-2 * tr.states[:, 0].norm()


def test_batch_size_does_not_matter(tiny):
    prompts = random_prompts(tiny, 7, 3, 12, seed=4)
    a = capture(tiny, prompts, batch_size=1).states
    b = capture(tiny, prompts, batch_size=3).states
    c = capture(tiny, prompts, batch_size=100).states
    _assert_rel(b, a, 1e-10)
    _assert_rel(c, a, 1e-10)


def test_norms_and_lengths(gpt2_like):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14]]
    tr = capture(gpt2_like, prompts, batch_size=2)
    assert tr.lengths.tolist() == [3, 7, 4]
    torch.testing.assert_close(tr.norms, torch.linalg.vector_norm(tr.states, dim=-1))
    assert tr.norms.shape == (3, gpt2_like.cfg.n_layers + 1)
    # caller order is kept although batches are sorted by length
    ref = _reference_states(gpt2_like, prompts)
    _assert_rel(tr.states, ref, 1e-10)


def test_token_tensor_input(gpt2_like):
    t = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    tr = capture(gpt2_like, t)
    _assert_rel(tr.states, _reference_states(gpt2_like, t.tolist()), 1e-10)
    with pytest.raises(ShapeError, match=r"prompts: expected a \[n, pos\] token tensor"):
        capture(gpt2_like, torch.tensor([1, 2, 3]))


def test_float32_model():
    model = make_gpt2_like(dtype=torch.float32)
    prompts = random_prompts(model, 5, 3, 12, seed=2)
    tr = capture(model, prompts, batch_size=2)
    assert tr.states.dtype == torch.float32
    _assert_rel(tr.states, _reference_states(model, prompts), 1e-5)


def test_iter_batches_sorted_and_right_padded():
    ids = [[1], [2, 3, 4], [5, 6]]
    batches = list(iter_batches(ids, 2, pad=0))
    assert [b.index.tolist() for b in batches] == [[1, 2], [0]]
    assert batches[0].tokens.tolist() == [[2, 3, 4], [5, 6, 0]]
    assert batches[0].lengths.tolist() == [3, 2]
    with pytest.raises(InputError, match="batch_size: expected >= 1, got 0"):
        list(iter_batches(ids, 0))


# ------------------------------------------------------------------ errors


def test_empty_prompt_list(gpt2_like):
    with pytest.raises(InputError, match="prompts: expected at least one prompt, got an empty"):
        capture(gpt2_like, [])


def test_empty_prompt(gpt2_like):
    with pytest.raises(InputError, match=r"prompts\[1\]: empty prompt \(no tokens\)"):
        capture(gpt2_like, [[1, 2], []])


def test_prompt_longer_than_context(gpt2_like):
    n_ctx = gpt2_like.cfg.n_ctx
    with pytest.raises(
        InputError,
        match=rf"prompts\[0\]: {n_ctx + 1} tokens is longer than the "
        rf"model's context n_ctx={n_ctx}",
    ):
        capture(gpt2_like, [[1] * (n_ctx + 1)])
    capture(gpt2_like, [[1] * n_ctx])  # exactly n_ctx is fine


@pytest.mark.parametrize("bad", [97, -1, 10_000])
def test_token_id_out_of_range(gpt2_like, bad):
    with pytest.raises(InputError, match=r"prompts\[1\]: token ids must lie in 0\.\.96"):
        capture(gpt2_like, [[1, 2], [3, bad]])


def test_strings_without_tokenizer(gpt2_like):
    with pytest.raises(InputError, match="got strings but the model has no tokenizer"):
        tokenize(gpt2_like, ["hello"])
    with pytest.raises(InputError, match="got a single string"):
        tokenize(gpt2_like, "hello")


def test_not_a_model():
    with pytest.raises(ModelTypeError, match="got builtins.dict"):
        capture({}, [[1, 2]])
