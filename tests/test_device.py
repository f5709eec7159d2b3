"""
Everything follows `model.cfg.device`; reduced algebra stays CPU float64 by design.

Parametrised over devices: CUDA runs when present and is skipped (with the reason) otherwise.
On each device the whole user path -- directions, fit, scan and exact gains, measure_shift,
calibrate, steered generation -- must run and agree with the CPU float64 reference to float64
rounding across devices (1e-9 relative). Half-precision models get a clear error for the
JVP paths, while hooks and `capture` work in them.

Device mixing is also caught on a CPU-only machine (the "fake CUDA device" section): the
model's parameters and buffers become `FakeCuda` tensors, which report device cuda:0, hold
their data on the CPU and refuse, like a GPU, any operation where a non-scalar CPU tensor meets
them; `FakeCudaMode` turns `.to("cuda")`, `.cuda()` and factories with device="cuda" into
such tensors. Covered there: `capture`, `ConceptDirections.fit` (with the logit class means),
`scan_gains` (cached and hooks), `measure_shift` (cached and hooks), `calibrate`,
`Controller.calibrate` in the generation regime (greedy continuations, teacher-forced
forwards) and `Schedule.apply` under `model.generate` (KV cache). Results are compared with
the plain CPU run.

Not covered on the fake device, and why:
* `exact_gains` and the two-sided basis' observability pass (`Surrogate.fit`'s first pass):
  reverse-mode autograd. The autograd engine sets a CUDA device guard for tensors on a CUDA
  device, which a CPU-only torch build cannot create (it aborts the process), whatever the
  tensors hold.
* the fit's layer-major sweep (JVPs and VJPs under `torch.func.vmap`/`jvp`): functorch wraps
  the tensors in its own batched/dual wrappers, which the Python-level checks here cannot look
  through (the same device-guard failure follows). `kl_metric` (vmap over JVPs of the logits)
  is out for the same reason.
These paths run in `test_whole_path_on_device` on a real GPU; on the CPU their device handling
is the frozen-context boundary that the covered paths share (`FrozenContext` on the model's
device, tangents moved there, results moved back to the CPU in float64).
"""

from __future__ import annotations

import builtins
import sys

import pytest
import torch
from _wordtok import NEG, POS, with_tokenizer
from conftest import make_gemma_like, make_gpt2_like, random_prompts
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from steerlin import ConceptDirections, Controller, Surrogate
from steerlin.gains import exact_gains, scan_gains
from steerlin.hooks import inject
from steerlin.measure import calibrate, measure_shift
from steerlin.trajectory import capture

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


# ----------------------------------------------------------------- the fake CUDA device
FAKE = torch.device("cuda", 0)


class DeviceMixError(RuntimeError):
    """Tensors on the (fake) CUDA device and the CPU met in one operation."""


#: ops that take tensors on different devices on a real GPU too
_CROSS = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}


def _un(t):
    return t.elem if isinstance(t, FakeCuda) else t


def _check_mix(func, flat) -> None:
    """A real CUDA op refuses CPU tensors other than 0-d ones (scalars) next to CUDA ones."""
    cpu = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, FakeCuda)]
    cpu = [t for t in cpu if t.ndim > 0 and t.device.type == "cpu"]
    if cpu and any(isinstance(t, FakeCuda) for t in flat):
        raise DeviceMixError(
            f"{func}: tensors on cuda:0 and cpu met (cpu shapes {[tuple(t.shape) for t in cpu]})"
        )


class FakeCuda(torch.Tensor):
    """A tensor that reports device cuda:0 and holds its data on the CPU (`elem`).

    Every aten op on it runs on the CPU data after the check a GPU makes: tensors on the CPU
    may meet it only as 0-d scalars (or through copy_ / .to, which move data).
    """

    @staticmethod
    def __new__(cls, elem):
        assert type(elem) is torch.Tensor and elem.device.type == "cpu"
        with torch.inference_mode(False):  # a view's wrapper takes its base's version counter
            return FakeCuda._wrap(cls, elem)

    @staticmethod
    def _wrap(cls, elem):
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=FAKE,
            requires_grad=elem.requires_grad,
        )
        r.elem = elem
        return r

    def __repr__(self):
        return f"FakeCuda({self.elem!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _CROSS:
            _check_mix(func, tree_flatten((args, kwargs))[0])
        wrap = True
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None:
            wrap = torch.device(kwargs["device"]).type == "cuda"
            kwargs = dict(kwargs, device=torch.device("cpu"))
        out = func(*tree_map(_un, args), **tree_map(_un, kwargs))
        if func is torch.ops.aten.copy_.default:
            return args[0]
        if not wrap:
            return out
        return tree_map(lambda t: FakeCuda(t) if type(t) is torch.Tensor else t, out)


class _Index(torch.autograd.Function):
    """x[idx] on the CPU data of a FakeCuda x (the indexing binding itself sets a CUDA device
    guard, which a CPU build cannot)."""

    @staticmethod
    def forward(ctx, x, idx):
        ctx.idx, ctx.shape = idx, x.shape
        return FakeCuda(x.elem[idx])

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - reverse mode cannot run here (see docstring)
        raise RuntimeError("reverse-mode autograd is not supported on the fake device")


def _is_cuda(d) -> bool:
    return d is not None and (isinstance(d, int) or torch.device(d).type == "cuda")


_FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.eye, torch.tensor,
    torch.as_tensor, torch.randn, torch.rand, torch.randint, torch.linspace, torch.zeros_like,
    torch.ones_like, torch.empty_like, torch.full_like, torch.scalar_tensor, torch.randperm,
}  # fmt: skip


class FakeCudaMode(TorchFunctionMode):
    """`.to("cuda")`, `.cuda()` and factories with device="cuda" give FakeCuda tensors; the
    Python bindings that would set a CUDA device guard (indexing, contiguous, ...) run on the
    CPU data after the same device check."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            x = args[0]
            if device is not None and device.type == "cuda":
                if isinstance(x, FakeCuda):
                    return x if dtype in (None, x.dtype) else x.to(dtype=dtype)
                return FakeCuda(x.to(dtype=dtype or x.dtype))
        if func is torch.Tensor.tolist and isinstance(args[0], FakeCuda):
            return args[0].elem.tolist()  # a copy to the host, as on a GPU
        if func is torch.Tensor.numpy and isinstance(args[0], FakeCuda):
            raise DeviceMixError("numpy() of a cuda tensor (a GPU refuses it: .cpu() first)")
        if func is torch.Tensor.cuda:
            return args[0] if isinstance(args[0], FakeCuda) else FakeCuda(args[0])
        if func in (torch.as_tensor, torch.tensor) and isinstance(args[0], FakeCuda):
            if kwargs.get("device") is None or _is_cuda(kwargs.get("device")):
                dt = kwargs.get("dtype")
                return args[0] if dt in (None, args[0].dtype) else args[0].to(dt)
        if func in _FACTORIES and _is_cuda(kwargs.get("device")):
            return FakeCuda(func(*args, **dict(kwargs, device="cpu")))
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            x, idx = args[0], args[1]
            flat = tree_flatten(idx)[0]
            if not isinstance(x, FakeCuda):
                if any(isinstance(t, FakeCuda) for t in flat) or (
                    len(args) > 2 and isinstance(args[2], FakeCuda) and args[2].ndim > 0
                ):
                    raise DeviceMixError(f"{func.__name__}: a cpu tensor indexed with cuda ones")
                return func(*args, **kwargs)
            if func is torch.Tensor.__getitem__:
                return _Index.apply(x, tree_map(_un, idx))
            v = args[2]
            if isinstance(v, torch.Tensor) and not isinstance(v, FakeCuda) and v.ndim > 0:
                if any(isinstance(t, torch.Tensor) and t.dtype != torch.bool for t in flat):
                    raise DeviceMixError("__setitem__: cpu values put into a cuda tensor")
            x.elem[tree_map(_un, idx)] = _un(v)
            return None
        try:
            return func(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as exc:
            if "not linked" not in str(exc) and "'CUDA' backend" not in str(exc):
                raise
        # a binding that sets a CUDA device guard (or builds a CUDA scalar) before dispatch:
        # the same op on the CPU data, after the device check
        flat = tree_flatten((args, kwargs))[0]
        _check_mix(func, flat)
        out = func(*tree_map(_un, args), **tree_map(_un, kwargs))
        return tree_map(lambda t: FakeCuda(t) if type(t) is torch.Tensor else t, out)


def to_fake_cuda(model):
    """Every parameter and buffer of `model` onto the fake device, and cfg.device with them."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and not isinstance(p, FakeCuda):
                mod._parameters[name] = torch.nn.Parameter(
                    FakeCuda(p.detach()), requires_grad=p.requires_grad
                )
        for name, b in list(mod._buffers.items()):
            if b is not None and not isinstance(b, FakeCuda):
                mod._buffers[name] = FakeCuda(b)
    model.cfg.device = FAKE
    return model


def _type(*args):
    """builtins.type, except that a FakeCuda is a torch.Tensor (TransformerLens asserts
    `type(input) == torch.Tensor` in forward)."""
    if len(args) == 1 and isinstance(args[0], FakeCuda):
        return torch.Tensor
    return builtins.type(*args)


@pytest.fixture
def tl_type(monkeypatch):
    """TransformerLens's `type(input) == torch.Tensor` check in forward takes a FakeCuda for a
    tensor (it is one)."""
    mod = sys.modules.get("transformer_lens.HookedTransformer")
    if mod is not None and hasattr(mod, "HookedTransformer"):
        monkeypatch.setattr(mod, "type", _type, raising=False)


def _fake_path(model, dirs, sur):
    """The covered user path on `model` (fake CUDA or CPU): every result, on the CPU."""
    P = random_prompts(model, 8, seed=3)
    out = {"states": capture(model, P).states}
    fitted = ConceptDirections.fit(model, P, [0, 1] * 4)
    out["unit"], out["logit_means"] = fitted.unit, fitted.logit_means
    out["scan"] = scan_gains(model, P, dirs)
    out["scan_hooks"] = scan_gains(model, P[:3], dirs, method="hooks")
    sched = Controller(sur, 0.5).schedule
    out["shift"] = measure_shift(model, P, sched)
    out["shift_hooks"] = measure_shift(model, P[:3], sched, method="hooks")
    out["mult"] = torch.tensor(calibrate(model, P, sched, 0.5).multiplier)
    ctrl = Controller(sur, 0.5).calibrate(model, [POS[0], NEG[0]], n_tokens=2)
    out["regime_mult"] = torch.tensor(ctrl.calibration.multiplier)
    with sched.apply(model):
        toks = model.generate(
            torch.tensor([[1, 5, 6]], device=model.cfg.device),
            max_new_tokens=3,
            do_sample=False,
            stop_at_eos=False,
            verbose=False,
        )
    out["toks"] = toks.to("cpu")
    for k, v in out.items():
        assert not isinstance(v, FakeCuda) and v.device.type == "cpu", k
    return out


@pytest.mark.parametrize("make", [make_gpt2_like, make_gemma_like], ids=["gpt2", "gemma"])
def test_user_path_on_a_fake_cuda_device_mixes_no_devices(make, tl_type):
    model = with_tokenizer(make())
    if type(model).__name__ == "TransformerBridge":
        pytest.skip("the fake device wraps HookedTransformer parameters (TransformerLens 3)")
    P = random_prompts(model, 8, seed=3)
    dirs = ConceptDirections.fit(model, P, [0, 1] * 4)
    sur = Surrogate.fit(model, P, dirs, d=4)  # fitted on the CPU: the sweep is not covered
    ref = _fake_path(model, dirs, sur)
    with FakeCudaMode():
        to_fake_cuda(model)
        assert model.cfg.device.type == "cuda" and isinstance(model.W_E, FakeCuda)
        got = _fake_path(model, dirs, sur)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_fake_cuda_device_catches_mixing():
    """The check is real: CPU tensors meeting the model's (fake CUDA) tensors raise, as the
    bug of issue 26 did on a GPU (CPU final states sent into the unembedding)."""

    with FakeCudaMode():
        _catches_mixing()


def _catches_mixing():
    from steerlin.readouts import full_logits

    model = to_fake_cuda(make_gpt2_like())
    x_cpu = torch.randn(2, model.cfg.d_model, dtype=torch.float64)
    with pytest.raises(DeviceMixError):
        full_logits(model, x_cpu)
    with pytest.raises(DeviceMixError):
        torch.zeros(3, device="cuda") + torch.ones(3)
    with pytest.raises(DeviceMixError):
        torch.ones(4)[torch.tensor([0, 1], device="cuda")]
    # what a GPU allows: 0-d CPU scalars, CPU indices, explicit moves
    x = full_logits(model, x_cpu.to(model.cfg.device))
    assert isinstance(x, FakeCuda) and x.device.type == "cuda"
    assert (x + torch.tensor(1.0)).device.type == "cuda"
    assert x[torch.tensor([1])].shape[0] == 1
    assert x.cpu().device.type == "cpu" and type(x.cpu()) is torch.Tensor


def test_fake_cuda_device_catches_the_logit_means_bug(monkeypatch):
    """The issue-26 bug, put back: CPU final states sent into the unembedding with no device,
    summed into CPU tensors. The fake device reports it on this CPU-only machine."""
    import steerlin.directions as D
    from steerlin.readouts import full_logits

    def old_logit_means(model, xL, y, chunk=16):
        sums = torch.zeros(2, model.cfg.d_vocab, dtype=torch.float64)
        for s in range(0, xL.shape[0], chunk):
            z = full_logits(model, xL[s : s + chunk].to(model.cfg.dtype)).to(torch.float64)
            sums[0] += z[y[s : s + chunk] == 0].sum(0)
        return sums

    model = make_gpt2_like()
    if type(model).__name__ == "TransformerBridge":
        pytest.skip("the fake device wraps HookedTransformer parameters (TransformerLens 3)")
    P = random_prompts(model, 8)
    monkeypatch.setattr(D, "_logit_means", old_logit_means)
    with FakeCudaMode():
        to_fake_cuda(model)
        with pytest.raises(DeviceMixError, match="cuda:0 and cpu"):
            ConceptDirections.fit(model, P, [0, 1] * 4)
