"""Half-precision (bfloat16/float16) models: the frozen maps computed in float32 block by block.

A bf16 model's weights are a rounding of float32 weights. steerlin computes its frozen maps,
JVPs/VJPs, scans, fits and calibrations in float32 from one block's float32 copy at a time
(`steerlin.frozen.BlockUpcast`), so two references apply:

- a float32 model built from the *same bf16-rounded weights* computes the same arithmetic in
  float32: the results must agree to float32 round-off. Measured ~1e-7 relative to the
  largest gain on both tiny models; 1e-5 is asserted (float32's 6e-8 amplified by a few
  blocks and a sum over prompts, with margin; a bf16 step anywhere would show as ~1e-3).
- the *original* float32 model differs by the weights' rounding (relative 2^-9 ≈ 2e-3 per
  weight, random signs): measured 3e-4 (gpt2_like) to 1.5e-3 (gemma_like) relative to the
  largest gain; 2e-2 (5 x bf16's 2^-8) is asserted.

And the model itself: its parameters keep their dtype and values (bitwise), and the float32
copies alive at once never exceed one block (`upcast_stats`), far below a float32 copy of the
model. With TransformerLens 4 (the bridge) the same tests run on the TransformerLens engine;
the bridge's recorded rotary tables and Gemma's embedding scaling are the bf16 model's own, so
only a bf16-rounding tolerance is asserted there (SAME_WEIGHTS).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_gemma_like, make_gpt2_like, random_prompts

from steerlin import Controller, Surrogate, calibrate, exact_gains, scan_gains
from steerlin.backend.common import tl_major
from steerlin.directions import ConceptDirections
from steerlin.frozen import iter_contexts, resolve_engine, upcast_stats

TL4 = tl_major() >= 4
ENGINES = ["tl"] if TL4 else ["fast", "tl"]
# vs float32 on the same bf16-rounded weights; TL4: the bridge's x_0 (Hugging Face scales
# Gemma's embedding in the model's dtype) and recorded rotary cos/sin are the bf16 model's
# own, so it is bf16-rounding level there (measured up to 4e-3 on gemma_like's logit readout)
SAME_WEIGHTS = 1e-2 if TL4 else 1e-5
ROUNDING = 2e-2  # vs the original float32 weights


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _models(maker, half=torch.bfloat16):
    """(original float32, half-precision rounding of it, float32 of the rounded weights)."""
    m32, mh, mr = maker(torch.float32), maker(half), maker(torch.float32)
    with torch.no_grad():
        for p32, ph, pr in zip(m32.parameters(), mh.parameters(), mr.parameters(), strict=True):
            ph.copy_(p32.to(half))
            pr.copy_(ph.to(torch.float32))
    return m32, mh, mr


def _snapshot(model):
    return {k: (v.dtype, v.clone()) for k, v in model.state_dict().items()}


def _unchanged(model, snap) -> bool:
    now = model.state_dict()
    return all(now[k].dtype == dt and torch.equal(now[k], v) for k, (dt, v) in snap.items())


def _model_fp32_bytes(model) -> int:
    return sum(p.numel() * 4 for p in model.parameters())


def _block_fp32_bytes(model) -> int:
    return max(sum(p.numel() * 4 for p in blk.parameters()) for blk in model.blocks)


@pytest.fixture(scope="module", params=["gpt2_like", "gemma_like"])
def trio(request):
    maker = make_gpt2_like if request.param == "gpt2_like" else make_gemma_like
    m32, mh, mr = _models(maker)
    prompts = random_prompts(m32, 10, 2, 12, seed=4)
    labels = [0, 1] * 5
    dirs = ConceptDirections.fit(mr, prompts, labels)
    return m32, mh, mr, prompts, labels, dirs


@pytest.mark.parametrize("engine", ENGINES)
def test_exact_and_scan_gains_agree_with_float32(trio, engine):
    m32, mh, mr, prompts, _, dirs = trio
    snap = _snapshot(mh)
    upcast_stats(reset=True)
    gh = exact_gains(mh, prompts, dirs, engine=engine, batch_size=4)
    peak = upcast_stats()["peak"]
    assert gh.dtype == torch.float64 and torch.isfinite(gh).all()
    assert _rel(gh, exact_gains(mr, prompts, dirs, engine=engine)) < SAME_WEIGHTS
    assert _rel(gh, exact_gains(m32, prompts, dirs, engine=engine)) < ROUNDING
    sh = scan_gains(mh, prompts, dirs, engine=engine, batch_size=4)
    assert _rel(sh, scan_gains(mr, prompts, dirs, engine=engine)) < SAME_WEIGHTS
    assert _rel(sh, gh) < 0.2  # eps = 0.1 scan vs first-order gains: same model, sanity
    # the model is untouched and no float32 copy of it was made: one block at a time
    assert _unchanged(mh, snap) and mh.cfg.dtype == torch.bfloat16
    assert 0 < peak <= 2 * _block_fp32_bytes(mh) < _model_fp32_bytes(mh)


def test_logit_readout(trio):
    m32, mh, mr, prompts, _, dirs = trio
    kw = dict(readout="logits", label_words=[3, 5])
    gh = exact_gains(mh, prompts, dirs, **kw)
    assert _rel(gh, exact_gains(mr, prompts, dirs, **kw)) < SAME_WEIGHTS
    assert _rel(gh, exact_gains(m32, prompts, dirs, **kw)) < ROUNDING


def test_fast_engine_is_picked_for_half_models(trio):
    _, mh, _, prompts, _, _ = trio
    assert resolve_engine(mh) == ("tl" if TL4 else "fast")
    ctx = next(iter_contexts(mh, prompts[:3]))
    assert ctx.states.dtype == torch.float32  # states, keys, values kept in float32
    assert all(k is None or k.dtype == torch.float32 for k in ctx.keys)


def test_surrogate_and_calibration_agree_with_float32(trio):
    m32, mh, mr, prompts, labels, dirs = trio
    snap = _snapshot(mh)
    upcast_stats(reset=True)
    kw = dict(d=4, batch_size=4)
    sh = Surrogate.fit(mh, prompts, directions=dirs, **kw)
    sr = Surrogate.fit(mr, prompts, directions=dirs, **kw)
    s32 = Surrogate.fit(m32, prompts, directions=dirs, **kw)
    assert _rel(sh.gains, sr.gains) < 10 * SAME_WEIGHTS  # basis choice amplifies round-off
    assert _rel(sh.gains, s32.gains) < 5 * ROUNDING
    # the fit's exact gains (its observability pass) are exact_gains on the half model, up to
    # the float32 of the upcast blocks' gradients summed in another order (measured 1-2e-8)
    assert _rel(sh.gains_exact, exact_gains(mh, prompts, dirs, batch_size=4)) < 1e-6
    cal_h = calibrate(mh, prompts, Controller(sh, 0.5).schedule, 0.5)
    cal_r = calibrate(mr, prompts, Controller(sh, 0.5).schedule, 0.5)
    assert cal_h.multiplier == pytest.approx(cal_r.multiplier, rel=10 * SAME_WEIGHTS)
    assert _unchanged(mh, snap)
    assert 0 < upcast_stats()["peak"] <= 2 * _block_fp32_bytes(mh)


def test_surrogate_fit_from_labels_and_steering_hooks(trio):
    """The whole user path on the half model: directions from its own (bf16) capture, fit,
    calibrate, and the schedule as hooks on its bf16 forward."""
    m32, mh, mr, prompts, labels, _ = trio
    sur = Surrogate.fit(mh, (prompts, labels), d=4, batch_size=4)
    assert torch.isfinite(sur.gains).all()
    ctrl = Controller(sur, 0.5)
    cal = calibrate(mh, prompts, ctrl.schedule, 0.5)
    tok = torch.tensor([prompts[0]])
    with torch.no_grad():
        clean = mh(tok)[0, -1]
        with cal.schedule.apply(mh):
            steered = mh(tok)[0, -1]
    assert steered.dtype == torch.bfloat16 and not torch.equal(clean, steered)
    assert torch.isfinite(steered).all()


def test_float16(trio):
    m32, _, _, prompts, _, dirs = trio
    maker = make_gpt2_like if m32.cfg.n_layers == 3 else make_gemma_like
    _, mh, mr = _models(maker, torch.float16)
    gh = exact_gains(mh, prompts, dirs)
    assert _rel(gh, exact_gains(mr, prompts, dirs)) < SAME_WEIGHTS
    assert _rel(gh, exact_gains(m32, prompts, dirs)) < ROUNDING


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 on the GPU; CPU bf16 above)"
)
def test_bf16_on_cuda(trio):
    m32, mh, mr, prompts, _, dirs = trio
    maker = make_gpt2_like if m32.cfg.n_layers == 3 else make_gemma_like
    _, mh, mr = _models(maker)
    mh, mr = mh.to("cuda"), mr.to("cuda")
    gh = exact_gains(mh, prompts, dirs)
    assert _rel(gh, exact_gains(mr, prompts, dirs)) < 1e-4  # GPU float32 matmuls (TF32 off)


def test_kl_metric_and_measure_shift(trio):
    from steerlin.fisher import kl_metric
    from steerlin.measure import measure_shift

    m32, mh, mr, prompts, _, dirs = trio
    Fh, Fr = kl_metric(mh, prompts, dirs).meta["F"], kl_metric(mr, prompts, dirs).meta["F"]
    assert _rel(Fh, Fr) < SAME_WEIGHTS
    sched = Controller.from_gains(exact_gains(mr, prompts, dirs), dirs, 0.5).schedule
    sh, sr = measure_shift(mh, prompts, sched), measure_shift(mr, prompts, sched)
    assert _rel(sh, sr) < SAME_WEIGHTS


@pytest.mark.gemma
def test_gemma_bf16_exact_gains_agree_with_float32(gemma):
    """The offline Gemma-3-270m loaded in bf16 vs float32 (the same converted weights):
    exact gains along shared directions agree to bf16 rounding (benchmarks/bench_bf16.py
    measures 0.08% median raw error on 32 SST-2 prompts; 1% is asserted), and the bf16 model
    holds at most one block in float32 at a time."""
    import os

    from steerlin import load_model
    from steerlin.metrics import fidelity

    texts = [
        "A wonderful, moving film",
        "The plot was dull and the acting worse.",
        "I loved every minute of it!",
        "A tedious, pointless mess",
        "Charming and funny throughout.",
        "Boring. I left early!",
    ]
    labels = [1, 0, 1, 0, 1, 0]
    cache = os.environ.get("STEERLIN_CACHE")
    bf = load_model("gemma-3-270m", dtype=torch.bfloat16, cache_dir=cache)
    dirs = ConceptDirections.fit(gemma, texts, labels)
    upcast_stats(reset=True)
    g_bf = exact_gains(bf, texts, dirs)
    peak = upcast_stats()["peak"]
    fid = fidelity(g_bf, exact_gains(gemma, texts, dirs), dirs.scale)
    # ranks: near-tied raw gains of neighbouring layers may swap on 6 prompts (0.998 here)
    assert fid.raw_spearman > 0.99 and fid.rel_err_median < 1e-2
    assert bf.cfg.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert 0 < peak <= 2 * _block_fp32_bytes(bf) + 16 * 2**20  # + fused weights, rotary tables
