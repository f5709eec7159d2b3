"""Reliability: bad inputs, faults, non-finite numbers, determinism and files.

* Bad inputs fail at the boundary with the documented error CLASS (checked exactly, not just
  isinstance) and a message fragment that tells the user what to fix.
* Faults (an exception or a KeyboardInterrupt from a user hook, a block, a readout, the body of
  `Schedule.apply`, or the 3rd forward of `model.generate`) leave zero hooks and a model whose
  logits on a fixed input are bit-identical (torch.equal) to before.
* A block that returns NaN stops the computation with a NonFiniteError naming the layer.
* Fitting twice with the same seed and inputs is bit-identical; save -> load round-trips exactly;
  foreign, truncated, other-model and pickle files are refused without being unpickled.

The "regressions" section guards bugs this file found (non-finite states/directions accepted,
an unguarded format-version parse, a shape-less file loading for any model), fixed in 390ad94.

Tiny float64 models only (conftest), the whole file runs in a few seconds.
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_gemma_like, make_gpt2_like, random_prompts
from safetensors import safe_open
from safetensors.torch import save_file

from steerlin import (
    ConceptDirections,
    Controller,
    LabelledPrompts,
    Schedule,
    Surrogate,
    calibrate,
    capture,
    exact_gains,
    inject,
    measure_shift,
    scan_gains,
)
from steerlin.backend import count_hooks
from steerlin.errors import (
    FileFormatError,
    InputError,
    LayerError,
    ModelTypeError,
    NonFiniteError,
    ShapeError,
    SteerlinError,
    UnreachableTargetError,
)
from steerlin.readouts import Readout

N_PROMPTS = 12
LABELS = [0, 1] * (N_PROMPTS // 2)
GEN = dict(max_new_tokens=6, do_sample=False, verbose=False, stop_at_eos=False)


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> SimpleNamespace:
    """Two tiny models of different shapes, fitted objects on the first, and files on disk.

    m: GPT-2-like, 3 blocks. g: Gemma-like, 4 blocks (the "other model shape").
    Nothing here is mutated by the tests (faults patch attributes and restore them).
    """
    m, g = make_gpt2_like(), make_gemma_like()
    P = random_prompts(m, N_PROMPTS)
    dirs = ConceptDirections.fit(m, P, LABELS)
    dirs_g = ConceptDirections.fit(g, random_prompts(g, N_PROMPTS), LABELS)
    sur = Surrogate.fit(m, P, dirs, d=4)
    sched = Controller(sur, 1.0).schedule
    d = tmp_path_factory.mktemp("files")
    save_file({"x": torch.zeros(3)}, str(d / "foreign.safetensors"))  # no steerlin metadata
    dirs.save(d / "dirs.safetensors")
    sur.save(d / "sur.safetensors")
    sched.save(d / "sched.safetensors")
    for kind in ("dirs", "sur", "sched"):
        raw = (d / f"{kind}.safetensors").read_bytes()
        (d / f"{kind}_trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    return SimpleNamespace(m=m, g=g, P=P, dirs=dirs, dirs_g=dirs_g, sur=sur, sched=sched, dir=d)


def _enter(cm) -> None:
    """Open and close a context manager (its checks run on entry)."""
    with cm:
        pass


def _tokens(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, model.cfg.d_vocab, (2, 9), generator=g)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_tokens(model)).clone()


def _assert_clean(model, before: torch.Tensor) -> None:
    """No live hook, eval mode, gradients on parameters still off, identical logits."""
    assert count_hooks(model) == 0
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(_logits(model), before)


@contextmanager
def _patched(obj, name: str, value):
    """Set obj.name = value for the block; restore (or delete an instance attribute) after."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def _raise_on_call(n: int, exc: type[BaseException], wrapped=None):
    """A callable that behaves like `wrapped` (or returns None) and raises `exc` on call n."""
    calls = {"n": 0}

    def f(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc(f"injected fault on call {n}")
        return wrapped(*args, **kwargs) if wrapped is not None else None

    f.calls = calls
    return f


# ------------------------------------------------------------------------------- bad inputs


def _nan_vec(w, value=float("nan")):
    v = torch.ones(w.m.cfg.d_model, dtype=torch.float64)
    v[3] = value
    return v


BAD_INPUTS = [
    # empty prompts
    pytest.param(lambda w: capture(w.m, []), InputError, "at least one prompt", id="empty-capture"),
    pytest.param(
        lambda w: ConceptDirections.fit(w.m, [], []),
        InputError,
        "at least one prompt",
        id="empty-directions",
    ),
    pytest.param(
        lambda w: Surrogate.fit(w.m, [], w.dirs, d=4),
        InputError,
        "at least one prompt",
        id="empty-surrogate",
    ),
    pytest.param(
        lambda w: scan_gains(w.m, [], w.dirs), InputError, "at least one prompt", id="empty-scan"
    ),
    pytest.param(
        lambda w: scan_gains(w.m, [], w.dirs, method="hooks"),
        InputError,
        "at least one prompt",
        id="empty-scan-hooks",
    ),
    pytest.param(
        lambda w: exact_gains(w.m, [], w.dirs), InputError, "at least one prompt", id="empty-exact"
    ),
    pytest.param(
        lambda w: calibrate(w.m, [], w.sched, 1.0),
        InputError,
        "at least one prompt",
        id="empty-calibrate",
    ),
    pytest.param(
        lambda w: capture(w.m, "a single string"), InputError, "single string", id="bare-string"
    ),
    # labels
    pytest.param(
        lambda w: ConceptDirections.fit(w.m, w.P, [1] * N_PROMPTS),
        InputError,
        "both classes",
        id="one-class-labels",
    ),
    pytest.param(
        lambda w: ConceptDirections.from_states(torch.zeros(4, 4, 32), [0, 0, 0, 0]),
        InputError,
        "both classes",
        id="one-class-states",
    ),
    pytest.param(
        lambda w: ConceptDirections.fit(w.m, w.P, [0, 1, 2] * 4),
        InputError,
        "0/1 labels",
        id="labels-not-binary",
    ),
    pytest.param(
        lambda w: ConceptDirections.fit(w.m, w.P, LABELS[:-2]),
        ShapeError,
        "expected 12 labels",
        id="labels-length-mismatch",
    ),
    pytest.param(
        lambda w: LabelledPrompts(("a", "b", "c"), (0, 1)),
        ShapeError,
        "same length",
        id="texts-labels-length-mismatch",
    ),
    pytest.param(
        lambda w: ConceptDirections.from_states(torch.zeros(4, 4, 32), [0, 1, 0]),
        ShapeError,
        "expected 4 labels",
        id="states-labels-length-mismatch",
    ),
    # layers
    pytest.param(
        lambda w: _enter(inject(w.m, {99: torch.zeros(32)})),
        LayerError,
        r"0\.\.3 .*got 99",
        id="inject-layer-99",
    ),
    pytest.param(
        lambda w: _enter(inject(w.m, {-1: torch.zeros(32)})),
        LayerError,
        r"0\.\.3 .*got -1",
        id="inject-layer-negative",
    ),
    pytest.param(
        lambda w: scan_gains(w.m, w.P, w.dirs, layers=[99]),
        LayerError,
        "got 99",
        id="scan-layer-99",
    ),
    pytest.param(
        lambda w: scan_gains(w.m, w.P, w.dirs, layers=[-1]),
        LayerError,
        "got -1",
        id="scan-layer-negative",
    ),
    pytest.param(
        lambda w: scan_gains(w.m, w.P, w.dirs, layers=["1"]),
        LayerError,
        "expected an int",
        id="scan-layer-str",
    ),
    pytest.param(
        lambda w: scan_gains(w.m, w.P, w.dirs, layers=[]),
        InputError,
        "at least one layer",
        id="scan-layers-empty",
    ),
    pytest.param(
        lambda w: Controller(w.sur, 1.0, layers=[0, 99]),
        LayerError,
        "got 99",
        id="controller-layer-99",
    ),
    pytest.param(
        lambda w: Controller(w.sur, 1.0, layers=[-1]),
        LayerError,
        "got -1",
        id="controller-layer-negative",
    ),
    pytest.param(
        lambda w: Controller(w.sur, 1.0, layers=[]),
        InputError,
        "at least one allowed layer",
        id="controller-layers-empty",
    ),
    pytest.param(
        lambda w: Controller(w.sur, 1.0).baseline("single:99"),
        LayerError,
        "layer 99 is not among the allowed",
        id="baseline-single-99",
    ),
    pytest.param(
        lambda w: Controller(w.sur, 1.0).baseline("single:-1"),
        LayerError,
        "layer -1 is not among the allowed",
        id="baseline-single-negative",
    ),
    pytest.param(
        lambda w: Controller(w.sur, 1.0).baseline("single:x"),
        InputError,
        "single:<layer>",
        id="baseline-single-garbage",
    ),
    # directions of the wrong size / for another model
    pytest.param(
        lambda w: _enter(inject(w.m, {0: torch.zeros(31)})),
        ShapeError,
        r"shape \[32\].*got \(31,\)",
        id="inject-wrong-size",
    ),
    pytest.param(
        lambda w: _enter(inject(w.m, {0: torch.zeros(2, 3, 32)})),
        ShapeError,
        r"got \(2, 3, 32\)",
        id="inject-wrong-ndim",
    ),
    pytest.param(
        lambda w: Surrogate.fit(w.m, w.P, w.dirs_g, d=4),
        ShapeError,
        r"expected unit of shape \[4, 32\].*got \(5, 32\)",
        id="directions-other-model-fit",
    ),
    pytest.param(
        lambda w: scan_gains(w.m, w.P, w.dirs_g),
        ShapeError,
        r"expected unit of shape \[4, 32\]",
        id="directions-other-model-scan",
    ),
    pytest.param(
        lambda w: exact_gains(w.m, w.P, w.dirs_g),
        ShapeError,
        r"expected unit of shape \[4, 32\]",
        id="directions-other-model-exact",
    ),
    pytest.param(
        lambda w: _enter(w.sched.apply(w.g)),
        ShapeError,
        "made for L=3",
        id="schedule-other-model-apply",
    ),
    pytest.param(
        lambda w: measure_shift(w.g, random_prompts(w.g, 4), w.sched),
        ShapeError,
        "made for L=3",
        id="schedule-other-model-measure",
    ),
    # non-finite directions
    pytest.param(
        lambda w: _enter(inject(w.m, {1: _nan_vec(w)})),
        NonFiniteError,
        r"additions\[1\]: contains NaN",
        id="inject-nan",
    ),
    pytest.param(
        lambda w: _enter(inject(w.m, {2: _nan_vec(w, float("inf"))})),
        NonFiniteError,
        r"additions\[2\]: contains NaN or inf",
        id="inject-inf",
    ),
    pytest.param(
        lambda w: _enter(inject(w.m, {0: _nan_vec(w, -float("inf"))[None].repeat(2, 1)})),
        NonFiniteError,
        "NaN or inf",
        id="inject-batched-neg-inf",
    ),
    pytest.param(
        lambda w: Schedule(torch.tensor([1.0, float("nan")]), torch.ones(2, 32), torch.ones(2)),
        InputError,
        "non-finite",
        id="schedule-nan",
    ),
    # targets
    pytest.param(
        lambda w: Controller(w.sur, 0.0), InputError, "target: 0", id="controller-target-0"
    ),
    pytest.param(
        lambda w: Controller(w.sur, float("nan")),
        InputError,
        "finite",
        id="controller-target-nan",
    ),
    pytest.param(
        lambda w: Controller(w.sur, [1.0, 2.0]),
        ShapeError,
        "one per surrogate",
        id="controller-target-count",
    ),
    pytest.param(
        lambda w: calibrate(w.m, w.P, w.sched, 0.0), InputError, "non-zero", id="calibrate-target-0"
    ),
    pytest.param(
        lambda w: calibrate(w.m, w.P, w.sched, 1e9, max_multiplier=64),
        UnreachableTargetError,
        r"no multiplier in \[0, 64\] reaches the target shift 1e\+09; the closest was",
        id="calibrate-unreachable",
    ),
    # token sequences
    pytest.param(
        lambda w: capture(w.m, [[1] * (w.m.cfg.n_ctx + 1)]),
        InputError,
        "longer than the model's context n_ctx=64",
        id="prompt-longer-than-nctx-capture",
    ),
    pytest.param(
        lambda w: Surrogate.fit(w.m, w.P + [[2] * 65], w.dirs, d=4),
        InputError,
        r"prompts\[12\]: 65 tokens",
        id="prompt-longer-than-nctx-fit",
    ),
    pytest.param(
        lambda w: scan_gains(w.m, [[3] * 65], w.dirs, method="hooks"),
        InputError,
        "n_ctx=64",
        id="prompt-longer-than-nctx-scan",
    ),
    pytest.param(lambda w: capture(w.m, [[]]), InputError, "empty prompt", id="empty-token-seq"),
    pytest.param(
        lambda w: scan_gains(w.m, [[1, 2], []], w.dirs),
        InputError,
        r"prompts\[1\]: empty prompt",
        id="one-empty-token-seq",
    ),
    pytest.param(
        lambda w: capture(w.m, torch.zeros(2, 0, dtype=torch.long)),
        InputError,
        "empty prompt",
        id="all-padding-zero-length-tensor",
    ),
    pytest.param(
        lambda w: capture(w.m, [[1, 2, w.m.cfg.d_vocab]]),
        InputError,
        r"token ids must lie in 0\.\.96",
        id="token-out-of-vocab",
    ),
    pytest.param(
        lambda w: capture(w.m, ["hello"]), InputError, "no tokenizer", id="strings-no-tokenizer"
    ),
    # other arguments
    pytest.param(
        lambda w: scan_gains(w.m, w.P, w.dirs, eps=0.0), InputError, "eps", id="scan-eps-0"
    ),
    pytest.param(
        lambda w: scan_gains(w.m, w.P, w.dirs, method="brute"),
        InputError,
        "method",
        id="scan-method",
    ),
    pytest.param(
        lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=0), InputError, "d: expected", id="fit-d-0"
    ),
    pytest.param(
        lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=33), InputError, "d_model=32", id="fit-d-big"
    ),
    pytest.param(
        lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=4, basis="svd"),
        InputError,
        "basis",
        id="fit-basis",
    ),
    pytest.param(
        lambda w: _enter(inject(w.m, {0: torch.zeros(32)}, positions="first")),
        InputError,
        "positions",
        id="inject-positions",
    ),
    pytest.param(
        lambda w: _enter(inject(w.m, [torch.zeros(32)])),
        ModelTypeError,
        "mapping",
        id="inject-not-mapping",
    ),
    pytest.param(
        lambda w: capture("gpt2", w.P),
        ModelTypeError,
        "HookedTransformer|TransformerBridge",
        id="model-is-a-str",
    ),
    # files
    *[
        pytest.param(
            lambda w, cls=cls: cls.load(w.dir / "foreign.safetensors"),
            FileFormatError,
            f"not a steerlin {cls.__name__} file \\(no steerlin metadata\\)",
            id=f"foreign-file-{cls.__name__}",
        )
        for cls in (ConceptDirections, Surrogate, Schedule)
    ],
    *[
        pytest.param(
            lambda w, cls=cls, kind=kind: cls.load(w.dir / f"{kind}_trunc.safetensors"),
            FileFormatError,
            "not a readable safetensors file \\(truncated",
            id=f"truncated-file-{cls.__name__}",
        )
        for cls, kind in ((ConceptDirections, "dirs"), (Surrogate, "sur"), (Schedule, "sched"))
    ],
    *[
        pytest.param(
            lambda w, cls=cls, kind=kind: cls.load(w.dir / f"{kind}.safetensors", w.g),
            FileFormatError,
            "made for a model with n_layers=3, this model has n_layers=4",
            id=f"other-model-file-{cls.__name__}",
        )
        for cls, kind in ((ConceptDirections, "dirs"), (Surrogate, "sur"), (Schedule, "sched"))
    ],
    pytest.param(
        lambda w: Schedule.load(w.dir / "sur.safetensors"),
        FileFormatError,
        r"not a steerlin Schedule file \(it holds a Surrogate\)",
        id="wrong-kind-file",
    ),
    pytest.param(
        lambda w: Surrogate.load(w.dir / "missing.safetensors"),
        FileFormatError,
        "no such file",
        id="missing-file",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUTS)
def test_bad_input_raises_documented_error(w, call, error, match):
    with pytest.raises(error, match=match) as info:
        call(w)
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {info.type}"
    assert isinstance(info.value, SteerlinError)


def test_steerlin_errors_are_also_builtin_errors(w):
    """Callers who catch ValueError / TypeError / RuntimeError still catch steerlin's errors."""
    with pytest.raises(ValueError):
        capture(w.m, [])
    with pytest.raises(TypeError):
        capture("gpt2", w.P)
    with pytest.raises(RuntimeError):
        calibrate(w.m, w.P, w.sched, 1e9, max_multiplier=8)
    with pytest.raises(FloatingPointError):
        _enter(inject(w.m, {0: _nan_vec(w)}))


def test_unreachable_target_says_how_far_it_got(w):
    with pytest.raises(UnreachableTargetError) as info:
        calibrate(w.m, w.P, w.sched, 1e9, max_multiplier=64)
    msg = str(info.value)
    assert "closest was" in msg and "at multiplier 64" in msg and "evaluations" in msg
    assert count_hooks(w.m) == 0


def test_pickle_renamed_to_safetensors_is_rejected_without_unpickling(tmp_path):
    """torch.save writes a pickle; loading it as a steerlin file must not run its payload."""

    class Payload:
        """Unpickling this object creates the file `marker` (a stand-in for arbitrary code)."""

        def __init__(self, marker: Path) -> None:
            self.marker = marker

        def __reduce__(self):
            return (Path.touch, (self.marker,))

    # Control: the payload really does run when the file is unpickled.
    control = tmp_path / "control_marker"
    torch.save({"P": Payload(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()
    with pytest.raises(pickle.UnpicklingError):  # and torch's safe loader refuses it too
        torch.load(tmp_path / "control.pt", weights_only=True)

    for cls in (ConceptDirections, Surrogate, Schedule):
        marker = tmp_path / f"marker_{cls.__name__}"
        path = tmp_path / f"{cls.__name__}.safetensors"
        torch.save({"P": Payload(marker), "x": torch.zeros(3)}, path)
        with pytest.raises(FileFormatError, match="not a readable safetensors file") as info:
            cls.load(path)
        assert type(info.value) is FileFormatError
        assert not marker.exists(), f"{cls.__name__}.load unpickled the file"
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["control.pt", "control_marker"]
        + [f"{c}.safetensors" for c in ("ConceptDirections", "Surrogate", "Schedule")]
    )


# ------------------------------------------------------------------------------- regressions


@pytest.mark.filterwarnings("ignore:concept direction is zero")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_directions_from_states_with_nonfinite_state_raises(w, bad):
    states = capture(w.m, w.P).states.clone()
    states[3, 2, 5] = bad
    with pytest.raises(NonFiniteError, match=r"layers \[2\]"):
        ConceptDirections.from_states(states, LABELS)


def test_fit_with_nonfinite_directions_raises_steerlin_error(w):
    unit = w.dirs.unit.clone()
    unit[1, 0] = float("nan")
    bad = ConceptDirections(w.dirs.vectors, unit, w.dirs.scale, dict(w.dirs.meta))
    with pytest.raises(NonFiniteError, match="layer"):
        Surrogate.fit(w.m, w.P, bad, d=4)


def test_garbled_format_header_is_a_file_format_error(tmp_path):
    path = tmp_path / "garbled.safetensors"
    save_file({"x": torch.zeros(3)}, str(path), {"steerlin": "Surrogate", "format": "x"})
    with pytest.raises(FileFormatError, match="format"):
        Surrogate.load(path)


def test_directions_without_model_meta_are_refused_for_another_model(w, tmp_path):
    dirs = ConceptDirections.from_states(capture(w.m, w.P).states, LABELS)  # meta: counts only
    dirs.save(tmp_path / "dirs.safetensors")
    with pytest.raises(FileFormatError, match="n_layers"):
        ConceptDirections.load(tmp_path / "dirs.safetensors", w.g)


def _schedule_file(path: Path, *, L: int = 3, H: int = 32, meta: str = "{}", full=True) -> Path:
    tensors = {"x": torch.zeros(3)}
    if full:
        tensors = {"amplitudes": torch.zeros(L), "unit": torch.zeros(L, H), "scale": torch.ones(L)}
    save_file(tensors, str(path), {"steerlin": "Schedule", "format": "1", "meta": meta})
    return path


def test_schedule_without_model_meta_is_refused_for_another_model(w, tmp_path):
    path = _schedule_file(tmp_path / "s.safetensors", L=5, H=16)
    with pytest.raises(FileFormatError, match="n_layers"):
        Schedule.load(path, w.m)


def test_schedule_file_lacking_tensors_is_a_file_format_error(tmp_path):
    path = _schedule_file(tmp_path / "s.safetensors", full=False)
    with pytest.raises(FileFormatError, match="lacks"):
        Schedule.load(path)


@pytest.mark.parametrize("meta", ["5", "[1]", "null"])
def test_metadata_that_is_not_a_json_object_is_a_file_format_error(w, tmp_path, meta):
    path = _schedule_file(tmp_path / "s.safetensors", meta=meta)
    with pytest.raises(FileFormatError, match="metadata"):
        Schedule.load(path, w.m)


# ------------------------------------------------------------------------------- faults


class Boom(Exception):
    """A user error raised from inside a hook / block / readout."""


FAULTS = [Boom, KeyboardInterrupt]


def _user_hook_during(call):
    """A user hook on blocks.1.hook_resid_pre (a TransformerLens `model.hooks` context around
    the steerlin call) that raises on its 3rd call, i.e. mid-way through `call`."""

    def run(w, exc):
        f = _raise_on_call(3, exc)
        with w.m.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda r, hook: f())]):
            call(w)

    return run


def _block_fault(layer: int, n: int, call, *, single_token_only: bool = False):
    """Block `layer`'s forward raises on its n-th call (optionally counting only the
    frozen-context single-token calls) while `call` runs."""

    def run(w, exc):
        block = w.m.blocks[layer]
        orig = block.forward
        calls = {"n": 0}

        def forward(x, *args, **kwargs):
            if not single_token_only or x.shape[1] == 1:
                calls["n"] += 1
                if calls["n"] == n:
                    raise exc(f"block {layer} fault")
            return orig(x, *args, **kwargs)

        with _patched(block, "forward", forward):
            call(w)
        assert calls["n"] == n, "the fault never fired"

    return run


def _fast_fault(name: str, n: int, call):
    """The fast engine's `steerlin.backend.fast.<name>` raises on its n-th call while `call`
    runs (engine="auto" picks the fast engine on these models). Imported when run, not at
    collection: the fast engine is TransformerLens-3 only."""

    def run(w, exc):
        from steerlin.backend import fast

        orig = getattr(fast, name)
        calls = {"n": 0}

        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise exc(f"fast.{name} fault")
            return orig(*args, **kwargs)

        with _patched(fast, name, wrapped):
            call(w)
        assert calls["n"] == n, "the fault never fired"

    return run


def _readout_fault(n: int, call):
    def run(w, exc):
        f = _raise_on_call(n, exc, Readout.__call__)
        with _patched(Readout, "__call__", lambda self, model, x: f(self, model, x)):
            call(w)

    return run


def _apply_body(w, exc):
    with w.sched.apply(w.m):
        assert count_hooks(w.m) > 0
        w.m(_tokens(w.m))
        raise exc("body fault")


def _mid_generation(w, exc):
    prompt = torch.tensor([w.P[0]])
    f = _raise_on_call(3, exc)
    with (
        w.sched.apply(w.m),
        w.m.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda r, hook: f())]),
    ):
        w.m.generate(prompt, use_past_kv_cache=True, **GEN)


def _nested_inject(w, exc):
    with inject(w.m, {0: torch.ones(32, dtype=torch.float64)}):
        with inject(w.m, {1: torch.ones(32, dtype=torch.float64)}, positions="all"):
            raise exc("nested fault")


FAULT_SITES = [
    pytest.param(
        _user_hook_during(lambda w: capture(w.m, w.P, batch_size=4)), id="user-hook-capture"
    ),
    pytest.param(
        _user_hook_during(lambda w: scan_gains(w.m, w.P, w.dirs, method="hooks")),
        id="user-hook-scan-hooks",
    ),
    pytest.param(
        _user_hook_during(lambda w: measure_shift(w.m, w.P, w.sched, method="hooks", batch_size=4)),
        id="user-hook-measure-shift-hooks",
    ),
    pytest.param(
        _user_hook_during(lambda w: calibrate(w.m, w.P, w.sched, 2.0, method="hooks")),
        id="user-hook-calibrate-hooks",
    ),
    pytest.param(
        _user_hook_during(lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=4, batch_size=4)),
        id="user-hook-fit",
    ),
    pytest.param(
        _block_fault(1, 4, lambda w: scan_gains(w.m, w.P, w.dirs, method="hooks")),
        id="block-mid-scan-hooks",
    ),
    pytest.param(
        _block_fault(
            2,
            3,
            lambda w: scan_gains(w.m, w.P, w.dirs, batch_size=4, engine="tl"),
            single_token_only=True,
        ),
        id="block-mid-scan-cached",
    ),
    pytest.param(
        _block_fault(
            1,
            2,
            lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=4, batch_size=4, engine="tl"),
            single_token_only=True,
        ),
        id="block-inside-jvp",
    ),
    pytest.param(
        _block_fault(
            2,
            2,
            lambda w: exact_gains(w.m, w.P, w.dirs, batch_size=4, engine="tl"),
            single_token_only=True,
        ),
        id="block-inside-exact-gains",
    ),
    pytest.param(
        _fast_fault("block_many", 3, lambda w: scan_gains(w.m, w.P, w.dirs, batch_size=4)),
        id="fast-block-mid-scan-cached",
        marks=pytest.mark.tl3,
    ),
    pytest.param(
        _fast_fault("block_jvp", 2, lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=4, batch_size=4)),
        id="fast-block-inside-jvp",
        marks=pytest.mark.tl3,
    ),
    pytest.param(
        _fast_fault("block", 2, lambda w: exact_gains(w.m, w.P, w.dirs, batch_size=4)),
        id="fast-block-inside-exact-gains",
        marks=pytest.mark.tl3,
    ),
    pytest.param(
        _readout_fault(5, lambda w: scan_gains(w.m, w.P, w.dirs, method="hooks")),
        id="readout-mid-scan-hooks",
    ),
    pytest.param(
        _readout_fault(2, lambda w: scan_gains(w.m, w.P, w.dirs, batch_size=4)),
        id="readout-mid-scan-cached",
    ),
    pytest.param(_apply_body, id="schedule-apply-body"),
    pytest.param(_mid_generation, id="generate-3rd-forward"),
    pytest.param(_nested_inject, id="nested-inject"),
]


@pytest.mark.parametrize("exc", FAULTS, ids=["exception", "keyboard-interrupt"])
@pytest.mark.parametrize("site", FAULT_SITES)
def test_fault_leaves_no_hooks_and_an_unchanged_model(w, site, exc):
    before = _logits(w.m)
    grad_mode = torch.is_grad_enabled()
    with pytest.raises(exc, match="fault"):
        site(w, exc)
    assert torch.is_grad_enabled() == grad_mode
    _assert_clean(w.m, before)


def test_steering_after_an_interrupted_generation_is_unaffected(w):
    """A generation killed on its 3rd forward leaves no state behind: the next steered
    generation gives exactly the tokens a steered generation gave before the fault."""
    prompt = torch.tensor([w.P[0]])
    big = w.sched.scaled(50.0)  # large enough to change the tokens
    plain = w.m.generate(prompt, use_past_kv_cache=True, **GEN)
    with big.apply(w.m):
        steered = w.m.generate(prompt, use_past_kv_cache=True, **GEN)
    assert not torch.equal(steered, plain)
    f = _raise_on_call(3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        with (
            big.apply(w.m),
            w.m.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda r, hook: f())]),
        ):
            w.m.generate(prompt, use_past_kv_cache=True, **GEN)
    assert count_hooks(w.m) == 0
    with big.apply(w.m):
        again = w.m.generate(prompt, use_past_kv_cache=True, **GEN)
    assert torch.equal(again, steered)
    assert torch.equal(w.m.generate(prompt, use_past_kv_cache=True, **GEN), plain)


# ------------------------------------------------------------------------------- NaN guard


@contextmanager
def _nan_block(model, layer: int, *, single_token_only: bool):
    """Block `layer` returns NaN (only on the frozen-context single-token path if asked), on
    both engines."""
    block = model.blocks[layer]
    orig = block.forward

    def forward(x, *args, **kwargs):
        out = orig(x, *args, **kwargs)
        if not single_token_only or x.shape[1] == 1:
            return out * float("nan")
        return out

    # the fast engine's single-token block (engine="auto") does not call block.forward;
    # it exists on the TransformerLens 3 leg only
    try:
        from steerlin.backend import fast
    except ImportError:
        with _patched(block, "forward", forward):
            yield
        return

    many, jvp = fast.block_many, fast.block_jvp

    def block_many(m, kv, layer_, z):
        out = many(m, kv, layer_, z)
        return out * float("nan") if layer_ == layer else out

    def block_jvp(m, kv, layer_, x, t):
        y, jv = jvp(m, kv, layer_, x, t)
        return (y * float("nan"), jv * float("nan")) if layer_ == layer else (y, jv)

    with (
        _patched(block, "forward", forward),
        _patched(fast, "block_many", block_many),
        _patched(fast, "block_jvp", block_jvp),
    ):
        yield


@pytest.mark.parametrize("layer", [0, 2])
def test_nan_in_jvp_stops_fit_naming_the_layer(w, layer):
    before = _logits(w.m)
    with _nan_block(w.m, layer, single_token_only=True):
        # the first pass that meets the NaN names it: the VJP pass of the two-sided default
        what = r"(Jacobian-vector|vector-Jacobian) product"
        with pytest.raises(NonFiniteError, match=rf"{what} at layer {layer}\b"):
            Surrogate.fit(w.m, w.P, w.dirs, d=4)
    _assert_clean(w.m, before)


@pytest.mark.parametrize("layer", [0, 2])
def test_nan_in_full_forward_stops_fit_naming_the_layer(w, layer):
    with _nan_block(w.m, layer, single_token_only=False):
        with pytest.raises(NonFiniteError, match=rf"layer {layer}\b"):
            Surrogate.fit(w.m, w.P, w.dirs, d=4)


@pytest.mark.parametrize("layer", [0, 1])
def test_nan_in_full_forward_stops_capture_naming_the_states(w, layer):
    """Block l's NaN output is x_{l+1}: capture names states l+1..L."""
    with _nan_block(w.m, layer, single_token_only=False):
        with pytest.raises(NonFiniteError, match=rf"states at layers \[{layer + 1}, "):
            capture(w.m, w.P)


@pytest.mark.parametrize("layer", [0, 2])
def test_nan_in_scan_names_the_affected_layers(w, layer):
    """An injection at l passes through blocks l..L-1, so layers 0..layer read NaN."""
    with _nan_block(w.m, layer, single_token_only=True):
        with pytest.raises(NonFiniteError) as info:
            scan_gains(w.m, w.P, w.dirs)
    assert str(list(range(layer + 1))) in str(info.value)
    assert count_hooks(w.m) == 0


def test_nan_in_exact_gains_and_calibrate(w):
    with _nan_block(w.m, 1, single_token_only=True):
        with pytest.raises(NonFiniteError, match="exact gains: non-finite gradient"):
            exact_gains(w.m, w.P, w.dirs)
        with pytest.raises(NonFiniteError, match="non-finite readout"):
            calibrate(w.m, w.P, w.sched, 1.0)


def test_nan_readout_stops_scan_and_fit(w):
    nan_dir = torch.full((32,), float("nan"), dtype=torch.float64)
    rd = Readout("concept", direction=nan_dir)
    with pytest.raises(NonFiniteError, match=r"non-finite readout at layers \[0, 1, 2\]"):
        scan_gains(w.m, w.P, w.dirs, readout=rd)
    with pytest.raises(NonFiniteError, match=r"non-finite readout at layers \[0, 1, 2\]"):
        scan_gains(w.m, w.P, w.dirs, readout=rd, method="hooks")
    with pytest.raises(NonFiniteError, match=r"surrogate: non-finite readout gradient"):
        Surrogate.fit(w.m, w.P, w.dirs, d=4, readout=rd)  # two-sided: caught before the VJPs
    with pytest.raises(NonFiniteError, match=r"surrogate: non-finite gains at layers"):
        Surrogate.fit(w.m, w.P, w.dirs, d=4, readout=rd, basis="krylov")
    assert count_hooks(w.m) == 0


# ------------------------------------------------------------------------------- determinism


SUR_TENSORS = ("P", "A", "B", "c", "gains", "gains_paper", "gains_std")
SCHED_TENSORS = ("amplitudes", "unit", "scale", "readout")


def _assert_same_surrogate(a: Surrogate, b: Surrogate) -> None:
    for k in SUR_TENSORS:
        ta, tb = getattr(a, k), getattr(b, k)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), k
    assert a.meta == b.meta


def _assert_same_schedule(a: Schedule, b: Schedule) -> None:
    for k in SCHED_TENSORS:
        ta, tb = getattr(a, k), getattr(b, k)
        if ta is None or tb is None:
            assert ta is None and tb is None, k
            continue
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), k
    assert a.meta == b.meta


@pytest.mark.parametrize("basis", ["krylov", "pod", "random"])
@pytest.mark.parametrize("make", [make_gpt2_like, make_gemma_like], ids=["gpt2_like", "gemma_like"])
def test_same_seed_same_inputs_bit_identical(make, basis):
    """Two independently built (same-seed) models, fitted twice: bit-identical everything."""
    runs = []
    for _ in range(2):
        model = make()
        prompts = random_prompts(model, N_PROMPTS, seed=7)
        dirs = ConceptDirections.fit(model, prompts, LABELS)
        sur = Surrogate.fit(model, prompts, dirs, d=6, basis=basis, seed=3, batch_size=5)
        ctrl = Controller(sur, 1.5, seed=2)
        runs.append((dirs, sur, ctrl.schedule, ctrl.baseline("random"), ctrl.baseline("uniform")))
    (d1, s1, *sch1), (d2, s2, *sch2) = runs
    for k in ("vectors", "unit", "scale"):
        assert torch.equal(getattr(d1, k), getattr(d2, k)), k
    assert d1.meta == d2.meta
    _assert_same_surrogate(s1, s2)
    for a, b in zip(sch1, sch2, strict=True):
        _assert_same_schedule(a, b)


def test_random_basis_depends_on_the_seed(w):
    """Guards the determinism test against a seed that is silently ignored."""
    a = Surrogate.fit(w.m, w.P, w.dirs, d=6, basis="random", seed=0)
    b = Surrogate.fit(w.m, w.P, w.dirs, d=6, basis="random", seed=1)
    assert not torch.equal(a.P, b.P)


def _file_contents(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_save_load_round_trips_exactly(w, tmp_path):
    multi = Controller([w.sur, w.sur], [1.0, -0.5]).schedule  # [k, L] amplitudes
    logit_sched = Schedule(
        w.sched.amplitudes, w.sched.unit, w.sched.scale, {"strategy": "x"}, readout=None
    )
    for name, obj, cls in [
        ("dirs", w.dirs, ConceptDirections),
        ("sur", w.sur, Surrogate),
        ("sched", w.sched, Schedule),
        ("multi", multi, Schedule),
        ("noreadout", logit_sched, Schedule),
    ]:
        path = tmp_path / f"{name}.safetensors"
        obj.save(path)
        back = cls.load(path, w.m)
        if cls is Surrogate:
            _assert_same_surrogate(obj, back)
        elif cls is Schedule:
            _assert_same_schedule(obj, back)
        else:
            for k in ("vectors", "unit", "scale"):
                assert torch.equal(getattr(obj, k), getattr(back, k)), k
            assert obj.meta == back.meta
        # saving the loaded object again stores the same header and tensors (not the same
        # bytes: safetensors writes its metadata keys in hash-map order)
        again = tmp_path / f"{name}_again.safetensors"
        back.save(again)
        assert _file_contents(again) == _file_contents(path)
    assert not list(tmp_path.glob("*.tmp")), "atomic save left a temp file"


def test_loaded_surrogate_gives_the_same_schedule(w, tmp_path):
    w.sur.save(tmp_path / "s.safetensors")
    back = Surrogate.load(tmp_path / "s.safetensors", w.m)
    _assert_same_schedule(Controller(w.sur, 2.0).schedule, Controller(back, 2.0).schedule)
