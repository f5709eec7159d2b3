"""Everything follows `model.cfg.device`; reduced algebra stays CPU float64 by design.

Parametrised over devices: CUDA runs when present and is skipped (with the reason) otherwise.
On each device the whole user path -- directions, fit, scan and exact gains, measure_shift,
calibrate, steered generation -- must run and agree with the CPU float64 reference to float64
rounding across devices (1e-9 relative). Half-precision models get a clear error for the
JVP paths, while hooks and `capture` work in them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_gemma_like, random_prompts

from steerlin import ConceptDirections, Controller, Surrogate
from steerlin.gains import exact_gains, scan_gains
from steerlin.hooks import inject
from steerlin.trajectory import capture
from steerlin.verify import calibrate, measure_shift

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
    ),
]


def _run(model):
    prompts = random_prompts(model, 8, seed=2)
    dirs = ConceptDirections.fit(model, prompts, [0, 1] * 4)
    sur = Surrogate.fit(model, prompts, dirs, d=4)
    scan = scan_gains(model, prompts, dirs)
    exact = exact_gains(model, prompts, dirs)
    sched = Controller(sur, target=0.5).schedule
    shift = measure_shift(model, prompts, sched)
    cal = calibrate(model, prompts, sched, 0.5)
    with sched.apply(model):
        toks = model.generate(
            torch.tensor([[1, 2, 3]], device=model.cfg.device),
            max_new_tokens=3,
            do_sample=False,
            stop_at_eos=False,
            verbose=False,
        )
    return {
        "gains": sur.gains,
        "scan": scan,
        "exact": exact,
        "shift": shift,
        "mult": torch.tensor(cal.multiplier, dtype=torch.float64),
        "toks": toks.cpu(),
        "P_device": sur.P.device,
        "dirs_device": dirs.unit.device,
    }


@pytest.fixture(scope="module")
def cpu_reference():
    return _run(make_gemma_like(seed=5))


@pytest.mark.parametrize("device", DEVICES)
def test_whole_path_on_device(device, cpu_reference):
    model = make_gemma_like(seed=5).to(device)
    assert str(model.cfg.device).startswith(device)
    got = _run(model)
    # reduced results live on the CPU in float64: the documented boundary
    assert got["P_device"].type == "cpu" and got["dirs_device"].type == "cpu"
    for k in ("gains", "scan", "exact", "shift", "mult"):
        assert got[k].device.type == "cpu" and got[k].dtype == torch.float64, k
        torch.testing.assert_close(got[k], cpu_reference[k], rtol=1e-9, atol=1e-12)
    assert torch.equal(got["toks"], cpu_reference["toks"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_compute_jvps_in_float32(dtype):
    """bf16/fp16 models fit and scan with float32 maps, one block's float32 copy at a time
    (agreement with float32 models: tests/test_bf16.py); the model keeps its dtype."""
    model = make_gemma_like(dtype=dtype, seed=5)
    prompts = random_prompts(model, 6, seed=2)
    traj = capture(model, prompts)  # capture works in any dtype
    assert traj.states.dtype == dtype
    dirs = ConceptDirections.fit(model, prompts, [0, 1] * 3)
    sur = Surrogate.fit(model, prompts, dirs, d=4)
    assert torch.isfinite(sur.gains).all()
    assert torch.isfinite(scan_gains(model, prompts, dirs)).all()
    assert model.cfg.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
    v = torch.ones(model.cfg.d_model, dtype=dtype)
    tokens = torch.tensor([[1, 2, 3]])
    clean = model(tokens)
    with inject(model, {1: v}):  # hooks work in any dtype
        assert not torch.equal(model(tokens), clean)
