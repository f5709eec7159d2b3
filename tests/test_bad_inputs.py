# ruff: noqa: E501  (the table: one row per line, however long)
"""Every bad input a clear error (issue 26): one row per case, one assertion pattern.

Each row calls one public entry point with one bad argument and asserts
* the exact `SteerlinError` subclass,
* that the message names the argument (or the tensor / option) at fault,
* that no hook is left on either model (`steerlin.count_hooks`),
* that no weight of either model changed (bit-identical parameters).

Valid inputs that used to fail (a 0-d tensor target, numpy scalars) have rows of their own
that must work. Tiny float64 models with the in-memory word tokenizer; the file runs in
seconds.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _wordtok import NEG, POS, with_tokenizer
from conftest import make_gpt2_like, random_prompts
from safetensors import safe_open
from safetensors.torch import save_file

from steerlin import (
    ConceptDirections,
    Controller,
    Schedule,
    Surrogate,
    calibrate,
    capture,
    compare_energy,
    count_hooks,
    cross_gains,
    exact_gains,
    measure_shift,
    scan_gains,
)
from steerlin.errors import (
    FileFormatError,
    FileWriteError,
    InputError,
    LayerError,
    ModelTypeError,
    OtherModelError,
    ShapeError,
    SteerlinError,
)
from steerlin.regime import generate

N = 12
LABELS = [0, 1] * (N // 2)
TEXTS = [POS[i // 2] if i % 2 else NEG[i // 2] for i in range(N)]  # label 1 = POS


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> SimpleNamespace:
    """m: the tiny model everything is fitted on; g: another model of the same shape (other
    weights). Files of each kind on disk."""
    m = with_tokenizer(make_gpt2_like())
    g = with_tokenizer(make_gpt2_like(seed=7))
    P = random_prompts(m, N)
    dirs = ConceptDirections.fit(m, P, LABELS)
    sur = Surrogate.fit(m, P, dirs, d=4)
    sched = Controller(sur, 1.0).schedule
    d = tmp_path_factory.mktemp("files")
    dirs.save(d / "dirs.safetensors")
    sur.save(d / "sur.safetensors")
    sched.save(d / "sched.safetensors")
    weights = {k: [p.detach().clone() for p in x.parameters()] for k, x in (("m", m), ("g", g))}
    return SimpleNamespace(m=m, g=g, P=P, dirs=dirs, sur=sur, sched=sched, dir=d, weights=weights)


# ------------------------------------------------------------------ tampered files


def _tamper(w, kind: str, name: str, *, tensors=None, header=None, drop=()) -> Path:
    """A copy of w's `kind` file with tensors replaced/added, header fields replaced (None:
    removed) or tensors dropped; the name keeps rows apart."""
    src = w.dir / f"{kind}.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    t.update(tensors or {})
    for k, v in (header or {}).items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    out = w.dir / f"{kind}-{name}.safetensors"
    save_file(t, str(out), meta)
    return out


def _meta_with(w, kind: str, **changes) -> str:
    with safe_open(str(w.dir / f"{kind}.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    meta.update(changes)
    return json.dumps(meta)


def _sur_t(w, name):
    with safe_open(str(w.dir / "sur.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def _nan_at(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _gguf(w, name: str, arr, qtype=None) -> Path:
    import gguf

    path = w.dir / f"{name}.gguf"
    wr = gguf.GGUFWriter(str(path), "controlvector")
    wr.add_string("controlvector.model_hint", "x")
    wr.add_uint32("controlvector.layer_count", 3)
    if qtype is None:
        wr.add_tensor("direction.1", arr)
    else:
        wr.add_tensor("direction.1", arr, raw_dtype=qtype)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


def _q8(w):
    import gguf
    from gguf.quants import quantize

    q = quantize(np.ones((1, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
    return _gguf(w, "q8", q, gguf.GGMLQuantizationType.Q8_0)


def _save_into_folder(w):
    folder = w.dir / "a-folder.safetensors"
    folder.mkdir(exist_ok=True)
    w.sched.save(folder)


def _enter(cm):
    with cm:
        pass


def _cal(w, **kw):
    return calibrate(w.m, w.P, w.sched, kw.pop("target", 1.0), **kw)


def _regime(w, prompts=None, **kw):
    from steerlin.readouts import make_readout

    rd = make_readout(w.m, "concept", w.dirs.unit[-1])
    prompts = [POS[0], NEG[0]] if prompts is None else prompts
    kw.setdefault("positions", "generated")
    return calibrate(w.m, prompts, w.sched, kw.pop("target", 1.0), readout=rd, **kw)


LONG = " ".join(["good"] * 70)  # 71 tokens with BOS: more than n_ctx = 64

# (id, call, error, a fragment the message must contain: the argument at fault)
ROWS = [
    # --- Controller
    ("controller-none", lambda w: Controller(None, 1), ModelTypeError, "surrogates"),
    ("controller-path", lambda w: Controller("s.safetensors", 1), ModelTypeError, "surrogates"),
    ("controller-dirs", lambda w: Controller(w.dirs, 1), ModelTypeError, "surrogates"),
    ("controller-list-none", lambda w: Controller([w.sur, None], [1, 1]), ModelTypeError, "[1]"),
    ("target-none", lambda w: Controller(w.sur, None), InputError, "target"),
    ("target-object", lambda w: Controller(w.sur, object()), InputError, "target"),
    ("target-bool", lambda w: Controller(w.sur, True), InputError, "target"),
    ("target-inf", lambda w: Controller(w.sur, math.inf), InputError, "target"),
    ("target-nan-tensor", lambda w: Controller(w.sur, torch.tensor(math.nan)), InputError, "target"),
    ("target-word", lambda w: Controller(w.sur, "sideways"), InputError, "target"),
    ("target-2d-tensor", lambda w: Controller(w.sur, torch.ones(1, 1)), ShapeError, "target"),
    ("target-count", lambda w: Controller(w.sur, [1.0, 2.0]), ShapeError, "target"),
    ("target-empty-tensor", lambda w: Controller(w.sur, torch.ones(0)), ShapeError, "target"),
    ("target-complex", lambda w: Controller(w.sur, torch.ones(1, dtype=torch.cfloat)), InputError, "target"),
    ("layers-float", lambda w: Controller(w.sur, 1, layers=[1.7]), LayerError, "layers"),
    ("layers-str-item", lambda w: Controller(w.sur, 1, layers=["1"]), LayerError, "layers"),
    ("layers-str", lambda w: Controller(w.sur, 1, layers="12"), InputError, "layers"),
    ("layers-bool", lambda w: Controller(w.sur, 1, layers=[True]), LayerError, "layers"),
    ("layers-out-of-range", lambda w: Controller(w.sur, 1, layers=[0, 3]), LayerError, "layers"),
    ("layers-2d", lambda w: Controller(w.sur, 1, layers=torch.ones(2, 2)), ShapeError, "layers"),
    ("units", lambda w: Controller(w.sur, 1, units="sep"), InputError, "units"),
    ("controller-seed", lambda w: Controller(w.sur, 1, seed=1.5), InputError, "seed"),
    # --- Surrogate.fit / ConceptDirections.fit
    ("fit-d-float", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=1.5), InputError, "d:"),
    ("fit-d-str", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d="4"), InputError, "d:"),
    ("fit-d-none", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=None), InputError, "d:"),
    ("fit-d-bool", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=True), InputError, "d:"),
    ("fit-d-negative", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=-2), InputError, "d:"),
    ("fit-orders-float", lambda w: Surrogate.fit_orders(w.m, w.P, w.dirs, orders=[2.5]), InputError, "orders"),
    ("fit-orders-int", lambda w: Surrogate.fit_orders(w.m, w.P, w.dirs, orders=4), InputError, "orders"),
    ("fit-basis", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=2, basis="svd"), InputError, "basis"),
    ("fit-variant", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=2, variant="x"), InputError, "variant"),
    ("fit-batch-0", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=2, batch_size=0), InputError, "batch_size"),
    ("fit-batch-float", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=2, batch_size=2.5), InputError, "batch_size"),
    ("fit-seed-str", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=2, seed="0"), InputError, "seed"),
    ("fit-context-memory", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=2, context_memory=-1), InputError, "context_memory"),
    ("fit-concept-fraction", lambda w: Surrogate.fit(w.m, (TEXTS, LABELS), d=2, concept_fraction=1.5), InputError, "concept_fraction"),
    ("fit-readout-kind", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=2, readout="logit"), InputError, "readout"),
    ("fit-logits-same-words", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=2, readout="logits", label_words=[" good", "good"]), InputError, "label_words"),
    ("fit-logits-same-ids", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=2, readout="logits", label_words=[5, 5]), InputError, "label_words"),
    ("fit-string-labels", lambda w: Surrogate.fit(w.m, (TEXTS, ["pos", "neg"] * 6), d=2), InputError, "labels"),
    ("dirs-string-labels", lambda w: ConceptDirections.fit(w.m, w.P, ["pos", "neg"] * 6), InputError, "labels"),
    ("dirs-labels-none", lambda w: ConceptDirections.fit(w.m, w.P, None), InputError, "labels"),
    ("dirs-labels-str", lambda w: ConceptDirections.fit(w.m, w.P, "010101010101"), InputError, "labels"),
    ("dirs-label-names", lambda w: ConceptDirections.fit(w.m, w.P, LABELS, label_names=["a"]), InputError, "label_names"),
    ("capture-batch-0", lambda w: capture(w.m, w.P, batch_size=0), InputError, "batch_size"),
    ("capture-batch-float", lambda w: capture(w.m, w.P, batch_size=1.5), InputError, "batch_size"),
    ("scan-batch-0", lambda w: scan_gains(w.m, w.P, w.dirs, batch_size=0), InputError, "batch_size"),
    ("scan-eps-nan", lambda w: scan_gains(w.m, w.P, w.dirs, eps=math.nan), InputError, "eps"),
    ("scan-layer-float", lambda w: scan_gains(w.m, w.P, w.dirs, layers=[1.5]), LayerError, "layer"),
    # --- calibrate / measure_shift (verify)
    ("calibrate-tol-nan", lambda w: _cal(w, tol=math.nan), InputError, "tol"),
    ("calibrate-tol-0", lambda w: _cal(w, tol=0), InputError, "tol"),
    ("calibrate-tol-negative", lambda w: _cal(w, tol=-0.1), InputError, "tol"),
    ("calibrate-tol-str", lambda w: _cal(w, tol="0.01"), InputError, "tol"),
    ("calibrate-target-none", lambda w: _cal(w, target=None), InputError, "target"),
    ("calibrate-target-nan", lambda w: _cal(w, target=math.nan), InputError, "target"),
    ("calibrate-batch-0", lambda w: _cal(w, batch_size=0), InputError, "batch_size"),
    ("calibrate-max-multiplier", lambda w: _cal(w, max_multiplier=0), InputError, "max_multiplier"),
    ("calibrate-max-evaluations", lambda w: _cal(w, max_evaluations=0), InputError, "max_evaluations"),
    ("calibrate-context-memory", lambda w: _cal(w, context_memory=-5), InputError, "context_memory"),
    ("calibrate-schedule-none", lambda w: calibrate(w.m, w.P, None, 1.0), ModelTypeError, "schedule"),
    ("calibrate-logits-same", lambda w: _cal(w, readout="logits", label_words=[5, 5]), InputError, "label_words"),
    ("measure-batch-0", lambda w: measure_shift(w.m, w.P, w.sched, batch_size=0), InputError, "batch_size"),
    ("measure-schedule-tensor", lambda w: measure_shift(w.m, w.P, torch.ones(3)), ModelTypeError, "schedule"),
    # --- calibration in the generation regime (Controller.calibrate's engine)
    ("regime-token-ids", lambda w: _regime(w, [[1, 5, 6], [1, 7, 8]]), InputError, "prompts[0]"),
    ("regime-token-tensor", lambda w: _regime(w, torch.ones(2, 3, dtype=torch.long)), InputError, "prompts"),
    ("regime-too-long", lambda w: _regime(w, [POS[0], LONG]), InputError, "prompts[1]"),
    ("regime-too-long-with-new", lambda w: _regime(w, [" ".join(["good"] * 60)], n_tokens=8), InputError, "n_ctx=64"),
    ("regime-single-string", lambda w: _regime(w, "good movie"), InputError, "prompts"),
    ("regime-empty", lambda w: _regime(w, []), InputError, "prompts"),
    ("regime-tol-nan", lambda w: _regime(w, tol=math.nan), InputError, "tol"),
    ("regime-tol-0", lambda w: _regime(w, tol=0.0), InputError, "tol"),
    ("regime-n-new-negative", lambda w: _regime(w, n_tokens=-1), InputError, "n_tokens"),
    ("regime-n-new-float", lambda w: _regime(w, n_tokens=1.5), InputError, "n_tokens"),
    ("regime-batch-0", lambda w: _regime(w, batch_size=0), InputError, "batch_size"),
    ("regime-positions", lambda w: _regime(w, positions="first"), InputError, "positions"),
    ("ctrl-calibrate-token-ids", lambda w: Controller(w.sur, 1.0).calibrate(w.m, [[1, 5, 6]]), InputError, "prompts"),
    ("ctrl-calibrate-too-long", lambda w: Controller(w.sur, 1.0).calibrate(w.m, [LONG]), InputError, "n_ctx"),
    ("ctrl-calibrate-tol-nan", lambda w: Controller(w.sur, 1.0).calibrate(w.m, POS[:2], tol=math.nan), InputError, "tol"),
    ("ctrl-calibrate-tol-0", lambda w: Controller(w.sur, 1.0).calibrate(w.m, POS[:2], tol=0), InputError, "tol"),
    ("ctrl-calibrate-batch-0", lambda w: Controller(w.sur, 1.0).calibrate(w.m, POS[:2], batch_size=0), InputError, "batch_size"),
    ("ctrl-calibrate-n-tokens-negative", lambda w: Controller(w.sur, 1.0).calibrate(w.m, POS[:2], n_tokens=-1), InputError, "n_tokens"),
    ("ctrl-calibrate-n-tokens-float", lambda w: Controller(w.sur, 1.0).calibrate(w.m, POS[:2], n_tokens=1.5), InputError, "n_tokens"),
    ("ctrl-from-gains-nan", lambda w: Controller.from_gains(w.sur.gains * math.nan, w.sur.directions, 1.0), InputError, "gains"),
    ("generate-max-new-0", lambda w: generate(w.m, POS[:2], 0), InputError, "max_new_tokens"),
    ("generate-max-new-float", lambda w: generate(w.m, POS[:2], 1.5), InputError, "max_new_tokens"),
    ("generate-token-ids", lambda w: generate(w.m, [[1, 2]], 2), InputError, "prompts[0]"),
    # --- wrong types where a list, a model, directions or a path belongs
    ("capture-prompts-none", lambda w: capture(w.m, None), InputError, "prompts"),
    ("capture-prompt-float", lambda w: capture(w.m, [1.7]), InputError, "prompts[0]"),
    ("dirs-fit-prompts-int", lambda w: ConceptDirections.fit(w.m, 5, LABELS), InputError, "prompts"),
    ("dirs-fit-label-names-int", lambda w: ConceptDirections.fit(w.m, w.P, LABELS, label_names=3), InputError, "label_names"),
    ("dirs-fit-batch-0", lambda w: ConceptDirections.fit(w.m, w.P, LABELS, batch_size=0), InputError, "batch_size"),
    ("dirs-states-list", lambda w: ConceptDirections.from_states([[1.0]], [0, 1]), InputError, "states"),
    ("dirs-states-2d", lambda w: ConceptDirections.from_states(torch.zeros(2, 32), [0, 1]), ShapeError, "states"),
    ("fit-prompts-none", lambda w: Surrogate.fit(w.m, None, w.dirs, d=2), InputError, "prompts"),
    ("fit-label-words-str", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=2, readout="logits", label_words="good"), InputError, "label_words"),
    ("fit-label-words-three", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=2, readout="logits", label_words=[1, 2, 3]), InputError, "label_words"),
    ("fit-distributed-str", lambda w: Surrogate.fit(w.m, w.P, w.dirs, d=2, distributed="yes"), InputError, "distributed"),
    ("scan-dirs-none", lambda w: scan_gains(w.m, w.P, None), ModelTypeError, "directions"),
    ("scan-dirs-path", lambda w: scan_gains(w.m, w.P, "dirs.safetensors"), ModelTypeError, "directions"),
    ("scan-layers-int", lambda w: scan_gains(w.m, w.P, w.dirs, layers=2), InputError, "layers"),
    ("exact-dirs-none", lambda w: exact_gains(w.m, w.P, None), ModelTypeError, "directions"),
    ("cross-dirs-item", lambda w: cross_gains(w.m, w.P, [w.dirs, 3]), ModelTypeError, "directions[1]"),
    ("cross-dirs-single", lambda w: cross_gains(w.m, w.P, w.dirs), ModelTypeError, "directions"),
    ("controller-metric-none", lambda w: Controller(w.sur, 1, metric=None), InputError, "metric"),
    ("controller-coupling-str", lambda w: Controller(w.sur, 1, coupling="x"), InputError, "coupling"),
    ("measure-readout-shape", lambda w: measure_shift(w.m, w.P, w.sched, readout=torch.ones(5)), ShapeError, "readout"),
    ("compare-baselines-str", lambda w: compare_energy(w.m, w.P, w.sur, 1.0, baselines="uniform"), InputError, "baselines"),
    ("compare-baselines-item", lambda w: compare_energy(w.m, w.P, w.sur, 1.0, baselines=[1]), InputError, "baselines"),
    ("compare-tol-nan", lambda w: compare_energy(w.m, w.P, w.sur, 1.0, tol=math.nan), InputError, "tol"),
    ("schedule-list", lambda w: Schedule([1.0], [[1.0]], [1.0]), ModelTypeError, "amplitudes"),
    ("schedule-int-scale", lambda w: Schedule(torch.ones(3), torch.ones(3, 32), torch.ones(3, dtype=torch.long)), ModelTypeError, "scale"),
    ("schedule-scaled-str", lambda w: w.sched.scaled("2"), InputError, "factor"),
    ("schedule-scaled-nan", lambda w: w.sched.scaled(math.nan), InputError, "factor"),
    ("llama-scale-str", lambda w: Schedule.from_llama_cpp(_gguf(w, "ok", np.ones(32, np.float32)), w.m, scale="x"), InputError, "scale"),
    ("llama-model-none", lambda w: Schedule.from_llama_cpp(_gguf(w, "ok2", np.ones(32, np.float32)), None), ModelTypeError, "model"),
    ("load-path-none", lambda w: Surrogate.load(None), InputError, "path"),
    ("save-path-int", lambda w: w.sched.save(3), InputError, "path"),
    ("load-model-str", lambda w: Schedule.load(w.dir / "sched.safetensors", "gpt2"), ModelTypeError, "model"),
    ("sur-load-model-str", lambda w: Surrogate.load(w.dir / "sur.safetensors", "gpt2"), ModelTypeError, "model"),
    # --- files: inconsistent contents
    ("sur-gains-length", lambda w: Surrogate.load(_tamper(w, "sur", "g", tensors={"gains": torch.zeros(5, dtype=torch.float64)})), FileFormatError, "'gains'"),
    ("sur-A-shape", lambda w: Surrogate.load(_tamper(w, "sur", "A", tensors={"A": torch.zeros(3, 4, 5, dtype=torch.float64)})), FileFormatError, "'A'"),
    ("sur-P-ndim", lambda w: Surrogate.load(_tamper(w, "sur", "P", tensors={"P": torch.zeros(4, 32, dtype=torch.float64)})), FileFormatError, "'P'"),
    ("sur-nan-gains", lambda w: Surrogate.load(_tamper(w, "sur", "nan", tensors={"gains": _nan_at(_sur_t(w, "gains"))})), FileFormatError, "'gains'"),
    ("sur-inf-A", lambda w: Surrogate.load(_tamper(w, "sur", "inf", tensors={"A": _sur_t(w, "A") * math.inf})), FileFormatError, "'A'"),
    ("sur-float16", lambda w: Surrogate.load(_tamper(w, "sur", "f16", tensors={"B": _sur_t(w, "B").half()})), FileFormatError, "'B'"),
    ("sur-int-tensor", lambda w: Surrogate.load(_tamper(w, "sur", "int", tensors={"c": torch.zeros(4, dtype=torch.int64)})), FileFormatError, "'c'"),
    ("sur-format-missing", lambda w: Surrogate.load(_tamper(w, "sur", "nofmt", header={"format": None})), FileFormatError, "format"),
    ("sur-format-negative", lambda w: Surrogate.load(_tamper(w, "sur", "negfmt", header={"format": "-1"})), FileFormatError, "format"),
    ("sur-format-zero", lambda w: Surrogate.load(_tamper(w, "sur", "zerofmt", header={"format": "0"})), FileFormatError, "format"),
    ("sur-n-layers-str", lambda w: Surrogate.load(_tamper(w, "sur", "nl", header={"meta": _meta_with(w, "sur", n_layers="x")})), FileFormatError, "n_layers"),
    ("sur-n-layers-wrong", lambda w: Surrogate.load(_tamper(w, "sur", "nl5", header={"meta": _meta_with(w, "sur", n_layers=5)})), FileFormatError, "'P'"),
    ("sur-n-layers-str-with-model", lambda w: Surrogate.load(_tamper(w, "sur", "nlm", header={"meta": _meta_with(w, "sur", n_layers="x")}), w.m), FileFormatError, "n_layers"),
    ("sur-d-mismatch", lambda w: Surrogate.load(_tamper(w, "sur", "d", header={"meta": _meta_with(w, "sur", d=3)})), FileFormatError, "'P'"),
    ("sur-scale-meta", lambda w: Surrogate.load(_tamper(w, "sur", "sc", header={"meta": _meta_with(w, "sur", scale=[1.0])})), FileFormatError, "scale"),
    ("sur-separation-meta", lambda w: Surrogate.load(_tamper(w, "sur", "sep", header={"meta": _meta_with(w, "sur", separation={"value": "x"})})), FileFormatError, "separation"),
    ("sur-extra-tensor", lambda w: Surrogate.load(_tamper(w, "sur", "x", tensors={"evil": torch.zeros(1)})), FileFormatError, "evil"),
    ("sur-dirs-partial", lambda w: Surrogate.load(_tamper(w, "sur", "dp", drop=("dir_scale",))), FileFormatError, "dir_scale"),
    ("sur-dirs-shape", lambda w: Surrogate.load(_tamper(w, "sur", "ds", tensors={"dir_unit": torch.zeros(4, 31, dtype=torch.float64)})), FileFormatError, "'dir_unit'"),
    ("sched-nan", lambda w: Schedule.load(_tamper(w, "sched", "nan", tensors={"amplitudes": torch.tensor([1.0, math.nan, 0.0], dtype=torch.float64)})), FileFormatError, "'amplitudes'"),
    ("sched-unit-shape", lambda w: Schedule.load(_tamper(w, "sched", "u", tensors={"unit": torch.zeros(2, 32, dtype=torch.float64)})), FileFormatError, "'unit'"),
    ("sched-int", lambda w: Schedule.load(_tamper(w, "sched", "int", tensors={"scale": torch.ones(3, dtype=torch.int32)})), FileFormatError, "'scale'"),
    ("sched-scale-zero", lambda w: Schedule.load(_tamper(w, "sched", "z", tensors={"scale": torch.zeros(3, dtype=torch.float64)})), FileFormatError, "'scale'"),
    ("sched-amplitudes-3d", lambda w: Schedule.load(_tamper(w, "sched", "3d", tensors={"amplitudes": torch.zeros(1, 1, 3, dtype=torch.float64)})), FileFormatError, "'amplitudes'"),
    ("sched-readout-shape", lambda w: Schedule.load(_tamper(w, "sched", "rd", tensors={"readout": torch.zeros(7, dtype=torch.float64)})), FileFormatError, "'readout'"),
    ("sched-format-missing", lambda w: Schedule.load(_tamper(w, "sched", "nofmt", header={"format": None})), FileFormatError, "format"),
    ("dirs-scale-length", lambda w: ConceptDirections.load(_tamper(w, "dirs", "sc", tensors={"scale": torch.ones(2, dtype=torch.float64)})), FileFormatError, "'scale'"),
    ("dirs-nan-unit", lambda w: ConceptDirections.load(_tamper(w, "dirs", "nan", tensors={"unit": _nan_at(w.dirs.unit)})), FileFormatError, "'unit'"),
    ("dirs-int", lambda w: ConceptDirections.load(_tamper(w, "dirs", "int", tensors={"vectors": torch.zeros(4, 32, dtype=torch.int64)})), FileFormatError, "'vectors'"),
    ("dirs-logit-means", lambda w: ConceptDirections.load(_tamper(w, "dirs", "lm", tensors={"logit_means": torch.zeros(3, 97)})), FileFormatError, "'logit_means'"),
    ("dirs-label-names", lambda w: ConceptDirections.load(_tamper(w, "dirs", "ln", header={"meta": _meta_with(w, "dirs", label_names="ab")})), FileFormatError, "label_names"),
    # --- files and schedules for another model of the same shape
    ("sur-other-model", lambda w: Surrogate.load(w.dir / "sur.safetensors", w.g), OtherModelError, "allow_other_model"),
    ("sched-other-model", lambda w: Schedule.load(w.dir / "sched.safetensors", w.g), OtherModelError, "allow_other_model"),
    ("dirs-other-model", lambda w: ConceptDirections.load(w.dir / "dirs.safetensors", w.g), OtherModelError, "allow_other_model"),
    ("apply-other-model", lambda w: _enter(w.sched.apply(w.g)), OtherModelError, "allow_other_model"),
    ("hooks-other-model", lambda w: w.sched.hooks(w.g), OtherModelError, "allow_other_model"),
    # --- saving
    ("save-into-folder", _save_into_folder, FileWriteError, "a-folder.safetensors"),
    ("save-meta-not-json", lambda w: Schedule(w.sched.amplitudes, w.sched.unit, w.sched.scale, {"x": object()}).save(w.dir / "bad.safetensors"), InputError, "meta"),
    # --- GGUF control vectors
    ("gguf-int32", lambda w: Schedule.from_llama_cpp(_gguf(w, "i32", np.ones(32, np.int32)), w.m), FileFormatError, "direction.1"),
    ("gguf-2d", lambda w: Schedule.from_llama_cpp(_gguf(w, "2d", np.ones((2, 16), np.float32)), w.m), FileFormatError, "direction.1"),
    ("gguf-quantised", lambda w: Schedule.from_llama_cpp(_q8(w), w.m), FileFormatError, "quantised"),
]  # fmt: skip


def _models_clean(w) -> None:
    for key, model in (("m", w.m), ("g", w.g)):
        assert count_hooks(model) == 0, f"hooks left on {key}"
        for before, p in zip(w.weights[key], model.parameters(), strict=True):
            assert torch.equal(before, p.detach()), f"weights of {key} changed"


@pytest.mark.parametrize("call, error, names", [pytest.param(*r[1:], id=r[0]) for r in ROWS])
def test_bad_input_is_a_clear_error(w, call, error, names):
    with pytest.raises(SteerlinError) as info:
        call(w)
    exc = info.value
    assert type(exc) is error, f"expected {error.__name__}, got {type(exc).__name__}: {exc}"
    assert names in str(exc), f"message does not name {names!r}: {exc}"
    _models_clean(w)


def test_failed_save_leaves_no_temp_file_and_names_the_path(w, tmp_path):
    target = tmp_path / "x.safetensors"
    target.mkdir()
    with pytest.raises(FileWriteError, match="x.safetensors"):
        w.sched.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    # a write that fails midway (not a folder in the way): temp file removed too
    import steerlin.io as sio

    def boom(*a, **k):
        raise OSError("disk full")

    orig = sio.os.replace
    sio.os.replace = boom
    try:
        with pytest.raises(FileWriteError, match="y.safetensors.*disk full"):
            w.sched.save(tmp_path / "y.safetensors")
    finally:
        sio.os.replace = orig
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_two_saves_to_one_path_use_distinct_temp_files(w, tmp_path, monkeypatch):
    import steerlin.io as sio

    seen = []
    real = sio.save_file
    monkeypatch.setattr(sio, "save_file", lambda t, p, h: (seen.append(p), real(t, p, h)))
    w.sched.save(tmp_path / "s.safetensors")
    w.sched.save(tmp_path / "s.safetensors")
    assert len(set(seen)) == 2 and all(Path(p).parent == tmp_path for p in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


@pytest.mark.parametrize(
    "target",
    [
        torch.tensor(1.0),
        torch.tensor([1.0]),
        torch.tensor(1, dtype=torch.int64),
        np.float64(1.0),
        np.float32(1.0),
        np.int64(1),
        np.array(1.0),
        np.array([1.0]),
        [1.0],
        (1,),
        "positive",
    ],
    ids=lambda t: f"{type(t).__name__}:{t!r}"[:40],
)
def test_valid_targets_work(w, target):
    ref = Controller(w.sur, 1.0).schedule
    got = Controller(w.sur, target).schedule
    assert torch.equal(got.amplitudes, ref.amplitudes)


def test_other_model_is_accepted_with_the_override(w):
    for cls, name in ((Surrogate, "sur"), (Schedule, "sched"), (ConceptDirections, "dirs")):
        cls.load(w.dir / f"{name}.safetensors", w.g, allow_other_model=True)
    with w.sched.apply(w.g, allow_other_model=True):
        assert count_hooks(w.g) > 0
    assert count_hooks(w.g) == 0
    # the same weights in another dtype are the same model
    m32 = copy.deepcopy(w.m).to(torch.float32)
    Surrogate.load(w.dir / "sur.safetensors", m32)


def test_files_without_a_fingerprint_still_load(w):
    meta = {k: v for k, v in w.sur.meta.items() if k != "model_fingerprint"}
    path = _tamper(w, "sur", "old", header={"meta": json.dumps(meta)})
    Surrogate.load(path, w.g)  # an older file: identity not checked, shape still is
    sched = Schedule(w.sched.amplitudes, w.sched.unit, w.sched.scale, {}, w.sched.readout)
    with sched.apply(w.g):
        pass


def test_saved_files_record_the_model_identity(w):
    from steerlin.io import model_fingerprint

    fp = model_fingerprint(w.m)
    assert fp.startswith("W_E[97x32]:") and fp != model_fingerprint(w.g)
    for obj in (w.sur, w.dirs, w.sched):
        assert obj.meta["model_fingerprint"] == fp
    assert Surrogate.load(w.dir / "sur.safetensors").meta["model_fingerprint"] == fp


def test_logit_readout_with_colliding_default_words_is_refused_before_fitting(w, monkeypatch):
    """The default label words (" positive"/" negative") on a tokenizer where both are one
    unknown token: refused at the boundary, not as "gains are zero" after the fit."""
    import steerlin.directions as D

    called = []
    monkeypatch.setattr(D, "capture", lambda *a, **k: called.append(1))
    with pytest.raises(InputError, match="label_words.*same token"):
        Surrogate.fit(w.m, (TEXTS, LABELS), d=2, readout="logits")
    assert not called
