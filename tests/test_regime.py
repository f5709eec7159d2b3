"""steerlin.regime: a schedule measured in the regime it is applied in.

Each position policy's teacher-forced forward is checked against an independent path:
"generated" against a KV-cached steered `model.generate` (the tokens it produced, its own
final states step by step), "last" against the frozen-context single-token path,
"all" against `steerlin.inject(positions="all")`. float64 tiny models: agreement to 1e-8
relative (different summation orders of the same arithmetic).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TL4, random_prompts
from conftest import greedy_continuations as _cont

from steerlin import ConceptDirections, Controller, Surrogate
from steerlin.hooks import inject
from steerlin.measure import calibrate, final_states, measure_regime_shift, measure_shift
from steerlin.readouts import make_readout
from steerlin.regime import Continuations


def _setup(model):
    concept = random_prompts(model, 12, 3, 12, seed=11)
    dirs = ConceptDirections.fit(model, concept, [i % 2 for i in range(12)])
    ops = random_prompts(model, 6, 3, 10, seed=5)
    sur = Surrogate.fit(model, ops, dirs, d=4)
    return dirs, ops, sur


def _generate_positions(model, p, n: int) -> list[list[int]]:
    """The absolute positions `hook_pos_embed` carries at each step of a cached generate."""
    seen = []
    rows = lambda r: [int((model.W_pos - x).abs().sum(-1).argmin()) for x in r[0]]
    with (
        torch.no_grad(),
        model.hooks(fwd_hooks=[("hook_pos_embed", lambda r, hook: seen.append(rows(r)))]),
    ):
        model.generate(
            torch.tensor([p]), max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False
        )
    return seen


def _tl_generate_bug(model) -> bool:
    if TL4:
        return False
    p = list(range(1, 7))
    return _generate_positions(model, p, 2)[1][-1] != len(p)


def test_tl3_cached_generate_position_bug(gpt2_like):
    """Why the GPT-2-like case of the test below is skipped under the KV cache.

    TransformerLens 3.x's `generate` (use_past_kv_cache=True) calls `get_residual` on the
    embeddings of the WHOLE sequence with `pos_offset` = the cache length, then keeps the last
    row: the newest token gets the learned position embedding of 2(T-1) instead of T-1 (T-1 =
    its true position). Rotary models are unaffected (their positions are applied in attention
    with the cache offset). So on GPT-2-class models TL 3's cached greedy continuations are not
    the model's own; steerlin's teacher-forced measurements are. This test records the bug; if
    it starts failing, TransformerLens fixed it and the skip below un-skips itself."""
    if TL4:
        pytest.skip("TransformerLens 4 generates through Hugging Face (no such offset)")
    p = list(range(1, 7))
    steps = _generate_positions(gpt2_like, p, 3)
    assert steps[0] == list(range(6))  # the prompt: right
    assert steps[1][-1] == 2 * 6  # the first generated token: position 12, not 6
    assert steps[2][-1] == 2 * 7


@pytest.mark.parametrize("cache", [True, False])
def test_generated_policy_matches_steered_generation(tiny, cache):
    if cache and tiny.cfg.positional_embedding_type == "standard" and _tl_generate_bug(tiny):
        # TransformerLens 3.x's KV-cached `generate` embeds learned absolute positions twice
        # offset (test_tl3_cached_generate_position_bug); the uncached case checks the policy
        # on this toy, the rotary model checks it under the cache.
        pytest.skip("TransformerLens's cached generate uses wrong absolute positions here")
    dirs, ops, sur = _setup(tiny)
    sched = Controller(sur, 1.0).schedule.scaled(3.0)
    L, n = tiny.cfg.n_layers, 5
    for p in ops[:3]:
        xs = []
        grab = lambda r, hook: xs.append(r[0, -1].clone())
        with (
            sched.apply(tiny, positions="generated" if cache else ("from", len(p) - 1)),
            torch.no_grad(),
        ):
            with tiny.hooks(fwd_hooks=[(f"blocks.{L - 1}.hook_resid_post", grab)]):
                out = tiny.generate(
                    torch.tensor([p]),
                    max_new_tokens=n,
                    do_sample=False,
                    stop_at_eos=False,
                    verbose=False,
                    use_past_kv_cache=cache,
                )
        cont = Continuations(None, [list(p)], out[:, len(p) :], [""])
        x = final_states(tiny, cont, sched.vectors, positions="generated", n_new=n)[0]
        ref = torch.stack(xs[:n])
        assert torch.allclose(x, ref, rtol=1e-8, atol=1e-8 * ref.abs().max())
        # and it differs from the last-token-only regime after the first position
        xl = final_states(tiny, cont, sched.vectors, positions="all", n_new=n)[0]
        assert not torch.allclose(xl[1:], ref[1:], rtol=1e-3)


def test_last_policy_matches_frozen_path(tiny):
    dirs, ops, sur = _setup(tiny)
    sched = Controller(sur, 1.0).schedule.scaled(2.0)
    rd = make_readout(tiny, "concept", dirs.unit[-1])
    cont = _cont(tiny, ops, 1)
    got = measure_regime_shift(tiny, cont, sched.vectors, rd, positions="last")
    ref = float(measure_shift(tiny, ops, sched)[0])
    assert got == pytest.approx(ref, rel=1e-8)


def test_all_policy_matches_inject_all(gpt2_like):
    dirs, ops, sur = _setup(gpt2_like)
    sched = Controller(sur, 1.0).schedule.scaled(2.0)
    L, n = gpt2_like.cfg.n_layers, 4
    cont = _cont(gpt2_like, ops[:2], n)
    x = final_states(gpt2_like, cont, sched.vectors, positions="all", n_new=n)
    for i, p in enumerate(ops[:2]):
        seq = torch.tensor([list(p) + cont.new_ids[i, : n - 1].tolist()])
        got = {}
        grab = lambda r, hook: got.__setitem__("x", r[0])
        with inject(gpt2_like, sched.additions(), positions="all"), torch.no_grad():
            gpt2_like.run_with_hooks(
                seq, return_type=None, fwd_hooks=[(f"blocks.{L - 1}.hook_resid_post", grab)]
            )
        ref = got["x"][len(p) - 1 :]
        assert torch.allclose(x[i], ref, rtol=1e-8, atol=1e-8 * ref.abs().max())


@pytest.mark.parametrize("positions", ["last", "generated", "all"])
def test_calibrate_in_the_regime_hits_target(gemma_like, positions):
    dirs, ops, sur = _setup(gemma_like)
    sched = Controller(sur, 1.0).schedule
    rd = make_readout(gemma_like, "concept", dirs.unit[-1])
    cont = _cont(gemma_like, ops, 4)
    target = 0.5 * float(dirs.vectors[-1].norm())
    cal = calibrate(gemma_like, cont, sched, target, readout=rd, positions=positions, n_tokens=4)
    assert cal.positions == positions
    assert cal.schedule.meta["positions"] == positions
    # independently of the regime module: one prompt at a time, the calibrated additions as
    # `inject` hooks over prompt + continuation, x_L read where the policy measures
    L, n = gemma_like.cfg.n_layers, cal.n_new
    shifts = []
    for i, p in enumerate(ops):
        seq = torch.tensor([list(p) + cont.new_ids[i, : n - 1].tolist()])
        start = len(p) - 1
        meas = slice(start, start + 1) if positions == "last" else slice(start, start + n)
        if positions == "last":
            seq = seq[:, : len(p)]
        where = "all" if positions == "all" else ("from", start)

        def final(ctx, seq=seq):
            got = {}
            grab = lambda r, hook: got.__setitem__("x", r[0])
            with ctx, torch.no_grad():
                gemma_like.run_with_hooks(
                    seq, return_type=None, fwd_hooks=[(f"blocks.{L - 1}.hook_resid_post", grab)]
                )
            return got["x"]

        from contextlib import nullcontext

        x0 = final(nullcontext())[meas]
        x1 = final(inject(gemma_like, cal.schedule.additions(), positions=where))[meas]
        shifts.append(rd(gemma_like, x1) - rd(gemma_like, x0))
    measured = float(torch.cat(shifts).mean())
    assert measured == pytest.approx(target, rel=1.1e-2)


def test_learned_positions_warning_under_tl3_generate():
    """steerlin generating (or calibrating in the generation regime) through TransformerLens 3's
    cached generate on a learned-position model warns at run time; rotary models and
    TransformerLens 4 do not (issue 34)."""
    import warnings

    from _wordtok import NEG, POS, with_tokenizer
    from conftest import make_gemma_like, make_gpt2_like

    from steerlin.regime import LearnedPositionsWarning, generate

    gpt2 = with_tokenizer(make_gpt2_like(seed=5))
    gemma = with_tokenizer(make_gemma_like(seed=5))
    if TL4:
        with warnings.catch_warnings():
            warnings.simplefilter("error", LearnedPositionsWarning)
            generate(gpt2, POS[:2], 2)
        return
    with pytest.warns(LearnedPositionsWarning, match="learned absolute positions"):
        generate(gpt2, POS[:2], 2)
    sur = Surrogate.fit(gpt2, (POS + NEG, [1] * 10 + [0] * 10), d=2)
    with pytest.warns(LearnedPositionsWarning, match="wrong position"):
        Controller(sur, 0.5).calibrate(gpt2, NEG[:2], n_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LearnedPositionsWarning)
        generate(gemma, POS[:2], 2)  # rotary: no warning
        Controller(sur, 0.5).calibrate(gpt2, _cont(gpt2, [[1, 5, 6]], 2))  # no generation here
