"""The architecture matrix: ten model families, the whole path against ground truth, on the
installed TransformerLens line (tests/_hf_tiny.py builds each family's tiny random model from
its `transformers` config class: a TransformerBridge on TransformerLens 4, TransformerLens 3's
own conversion of the same weights to a HookedTransformer on 3).

Per family:
- the model itself equals the Hugging Face model it was built from (logits);
- `capture` equals an unpadded forward of each prompt alone;
- `exact_gains` agrees with the hook scan (`scan_gains(method="hooks")`) at small eps, in raw
  units (gain / scale_l: per unit of injected norm);
- `Surrogate.fit` at full order (d = d_model, one prompt) equals the exact gains, and a d = 4
  fit's `reduction_error()` runs;
- the fast engine equals TransformerLens's block where it runs, and names the fallback where
  it doesn't (TransformerLens 3; on 4 it names the bridge);
- a schedule under `generate` gives the same tokens with the K/V cache as the greedy oracle
  without it (full forwards, the schedule as hooks from the last prompt token on);
- Surrogate and Schedule save / load round trips (the reloaded schedule steers identically);
- bfloat16: exact gains equal a float32 model's on the same rounded weights (tests/test_bf16.py's
  tolerances), or the error names what fails (OLMo-2 on TransformerLens 4.3);
- on TransformerLens 4, a family the bridge backend does not drive is refused by a SteerlinError
  naming the missing feature and the line that supports it, before any model run.

Tolerances: float64 models. On TransformerLens 3 every block computes in float64: the
full-order fit equals the exact gains to ~1e-15 relative (1e-9 allowed), the fast engine
TransformerLens's block to 1e-12, capture the unpadded forward to 1e-10; the central
difference at eps = 1e-4 carries O(eps^2) ~1e-8 truncation (1e-5 allowed). On TransformerLens
4 the Hugging Face modules compute their RMSNorms and TL4 its attention softmax in float32
(~1e-7 relative per block, tests/test_bridge.py): capture 1e-6, the full-order fit 1e-6 (the
same float32 blocks in another order), and the scan at eps = 1e-3, where the float32 rounding
divided by the step (~1e-7 / 1e-3) meets the O(eps^2) truncation (the tiny Phi-3's first block
is the most curved: 4e-2 off at eps = 1e-2, 5e-4 at 1e-3, on both lines): 2e-3 allowed. A
wrong mask, position or soft-cap gives errors of order one (a missing Gemma-2 score soft-cap
moves the logits by 4e-3 relative, the final one by 1.4e-2).

Each passing check is recorded; with STEERLIN_MATRIX_DIR (or STEERLIN_REF_DIR) set, the
results are written to arch_matrix_tl{3,4}.json there for scripts/support_table.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _hf_tiny import FAMILIES, FEATURES, hf_model, wrap

from steerlin import ConceptDirections, Controller, Schedule, Surrogate, backend, capture
from steerlin.backend.common import tl_major
from steerlin.errors import SteerlinError
from steerlin.frozen import iter_contexts, resolve_engine
from steerlin.gains import exact_gains, scan_gains
from steerlin.hooks import state_hook_names

TL4 = tl_major() >= 4
LINE = "tl4" if TL4 else "tl3"
FULL = 32  # d_model of every tiny family
TOL = {
    "hf": 1e-5,
    "capture": 1e-6 if TL4 else 1e-10,
    "scan": 2e-3 if TL4 else 1e-5,
    "fit": 1e-6 if TL4 else 1e-9,
}
EPS = 1e-3 if TL4 else 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:POD basis. Krylov breakdown:UserWarning")

#: family -> check -> "ok" or the refusal / fallback message (written at the module's end)
RESULTS: dict[str, dict[str, str]] = {}


def _record(arch: str, check: str, status: str = "ok") -> None:
    RESULTS.setdefault(arch, {})[check] = status


def _results_dir() -> Path | None:
    where = os.environ.get("STEERLIN_MATRIX_DIR") or os.environ.get("STEERLIN_REF_DIR")
    return Path(where) if where else None


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    folder = _results_dir()
    if folder is None or not RESULTS:
        return
    from importlib.metadata import version

    folder.mkdir(parents=True, exist_ok=True)
    out = {
        "line": LINE,
        "transformer_lens": version("transformer-lens"),
        "transformers": version("transformers"),
        "families": {a: RESULTS.get(a, {}) for a in FAMILIES},
        "features": {a: list(FEATURES[a]) for a in FAMILIES},
    }
    (folder / f"arch_matrix_{LINE}.json").write_text(json.dumps(out, indent=1))


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(family, model, refusal message or None when steerlin drives it)."""
    import conftest

    arch = request.param
    model = wrap(arch)
    conftest._MODELS.append(model)
    try:
        backend.check_model(model)
    except SteerlinError as err:
        return arch, model, str(err)
    return arch, model, None


def _supported(family):
    arch, model, refused = family
    if refused is not None:
        pytest.skip(f"{arch}: refused on {LINE} ({refused})")
    return arch, model


def _prompts(seed: int, n: int, lo: int = 3, hi: int = 12):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(4, 97, (k,), generator=g).tolist() for k in lens]


_CONCEPT = _prompts(11, 12)
_OPS = _prompts(5, 5)
assert max(len(p) for p in _OPS) > 6  # past the 6-token sliding windows


@pytest.fixture(scope="module")
def dirs(family):
    _, model = _supported(family)
    return ConceptDirections.fit(model, _CONCEPT, [i % 2 for i in range(len(_CONCEPT))])


# ------------------------------------------------------------------ support


def test_support(family):
    """Supported: the model's logits equal the Hugging Face model's. Refused (TransformerLens 4
    only): the error names the architecture, the missing feature and TransformerLens 3."""
    arch, model, refused = family
    hf_arch, feature = FEATURES[arch]
    if refused is not None:
        assert TL4, f"{arch} refused on TransformerLens 3: {refused}"
        assert hf_arch in refused and "TransformerLens 3" in refused, refused
        with pytest.raises(SteerlinError, match=hf_arch):
            capture(model, [[1, 2, 3]])
        _record(arch, "support", refused)
        return
    toks = torch.tensor([[1, 5, 9, 12, 20, 7, 8, 30, 11, 3, 4, 17]])
    with torch.no_grad():
        want = hf_model(arch)(toks).logits
        got = model(toks)
    assert _rel(got, want) < TOL["hf"], f"{arch}: {_rel(got, want):.3g}"
    # the backend's readout (final norm, unembedding, logit soft-cap) from the final state
    x_L = capture(model, [toks[0].tolist()]).states[0, -1]
    with torch.no_grad():
        head = backend.get(model).logits(model, x_L, None)
    assert _rel(head, got[0, -1]) < TOL["capture"], f"{arch}: {_rel(head, got[0, -1]):.3g}"
    _record(arch, "support")


# ------------------------------------------------------------------ the path


def test_capture_equals_an_unpadded_forward(family):
    arch, model = _supported(family)
    got = capture(model, _OPS, batch_size=3).states
    names = state_hook_names(model.cfg.n_layers)
    engine = backend.get(model)
    for i, p in enumerate(_OPS):
        seen: dict[int, torch.Tensor] = {}

        def keep(j: int):
            return lambda t, hook: seen.__setitem__(j, t[0, -1])

        with torch.no_grad():
            engine.run_with_hooks(
                model, torch.tensor([p]), [(n, keep(j)) for j, n in enumerate(names)]
            )
        want = torch.stack([seen[j] for j in range(len(names))])
        assert _rel(got[i], want) < TOL["capture"], (arch, i, _rel(got[i], want))
    _record(arch, "capture")


def test_exact_gains_agree_with_the_hook_scan(family, dirs):
    arch, model = _supported(family)
    ex = exact_gains(model, _OPS, dirs)
    sc = scan_gains(model, _OPS, dirs, eps=EPS, method="hooks")
    scale = dirs.scale[: model.cfg.n_layers]
    raw_ex, raw_sc = ex / scale, sc / scale  # per unit of injected norm
    assert raw_ex.abs().min() > 1e-6 * raw_ex.abs().max()  # non-trivial at every layer
    assert _rel(raw_sc, raw_ex) < TOL["scan"], (arch, _rel(raw_sc, raw_ex))
    # the check can fail: a large step is visibly non-linear
    big = scan_gains(model, _OPS, dirs, eps=2.0, method="hooks") / scale
    assert _rel(big, raw_ex) > 10 * TOL["scan"]
    _record(arch, "exact_gains")


def test_full_order_fit_equals_the_exact_gains(family, dirs):
    arch, model = _supported(family)
    one = _OPS[-1:]
    ex = exact_gains(model, one, dirs)
    sur = Surrogate.fit(model, one, dirs, d=FULL)
    assert _rel(sur.gains, ex) < TOL["fit"], (arch, _rel(sur.gains, ex))
    small = Surrogate.fit(model, _OPS, dirs, d=4)
    err = small.reduction_error()
    assert err.rel_err_max == err.rel_err_max  # a number, not NaN
    assert small.gains_exact is not None
    assert _rel(small.gains_exact, exact_gains(model, _OPS, dirs)) < TOL["fit"]
    _record(arch, "fit")


def test_fast_engine_equals_the_block_or_names_the_fallback(family):
    arch, model = _supported(family)
    from steerlin.errors import UnsupportedFeatureError

    if TL4:
        assert resolve_engine(model) == "tl"
        with pytest.raises(UnsupportedFeatureError, match="HookedTransformer models only"):
            resolve_engine(model, "fast")
        _record(arch, "fast", "TransformerLens 3 only (the bridge replays the HF block)")
        return
    from steerlin.backend import fast

    why = fast.unsupported_feature(model)
    if why is not None:
        assert resolve_engine(model) == "tl"
        with pytest.raises(UnsupportedFeatureError, match="engine='tl'"):
            resolve_engine(model, "fast")
        _record(arch, "fast", f"falls back to TransformerLens's block: {why}")
        return
    assert resolve_engine(model) == "fast"
    g = torch.Generator().manual_seed(3)
    for ctx in iter_contexts(model, _OPS, batch_size=3, engine="tl"):
        kv = fast.prepare(model, ctx.keys, ctx.values, ctx.mask)
        for layer in range(model.cfg.n_layers):
            x = ctx.states[:, layer]
            x = (
                x
                + 0.3
                * x.norm(dim=-1, keepdim=True)
                * torch.randn(x.shape, generator=g, dtype=x.dtype)
                / x.shape[-1] ** 0.5
            )
            got = fast.block(model, kv, layer, x)
            assert _rel(got, ctx.block(layer, x)) < 1e-12, (arch, layer)
    _record(arch, "fast")


def test_a_schedule_generates_the_same_tokens_with_and_without_the_cache(family, dirs):
    arch, model = _supported(family)
    sur = Surrogate.fit(model, _OPS, dirs, d=4)
    sched = Controller(sur, target=1.0).schedule.scaled(3.0)
    engine = backend.get(model)
    n_new = 5
    for text in ("the movie was very", "good plot and"):
        toks = model.to_tokens(text)
        p = toks.shape[1]
        hooks = sched.hooks(model, positions=("from", p - 1))
        with torch.no_grad():
            for _ in range(n_new):
                logits = engine.run_with_hooks(model, toks, hooks)
                toks = torch.cat([toks, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        # the K/V cache: every policy that steers the last prompt token and what follows
        for positions in ("last", "generated", ("from", p - 1)):
            with sched.apply(model, positions=positions):
                cached = engine.generate_tokens(model, [text], max_new_tokens=n_new)[0]
            assert cached.tolist() == toks[0].tolist(), (arch, text, positions)
        with torch.no_grad():
            clean = model(toks)[0, p - 1 :]
            steered = engine.run_with_hooks(model, toks, hooks)[0, p - 1 :]
        assert (steered - clean).abs().max() > 1e-3 * clean.abs().max()  # the schedule acts
    _record(arch, "generate")


def test_half_precision_agrees_with_float32_or_is_refused(family):
    """A bfloat16 model (frozen maps in float32, one block's copy at a time) against a float32
    model with the same bf16-rounded weights, as tests/test_bf16.py: 1e-5 on TransformerLens 3,
    1e-2 on 4 (the bridge replays the bf16 model's own rotary tables and embedding scale).
    Where the bridge cannot run the family in half precision, the error names the feature."""
    arch = family[0]
    _supported(family)
    m16 = wrap(arch, dtype=torch.bfloat16)
    try:
        backend.check_model(m16)
    except SteerlinError as err:
        assert TL4, f"{arch} in bfloat16 refused on TransformerLens 3: {err}"
        assert "bfloat16" in str(err) and "TransformerLens 3" in str(err), str(err)
        _record(arch, "half", str(err))
        return
    m32 = wrap(arch, dtype=torch.float32)
    with torch.no_grad():
        for (name, p32), (_, p16) in zip(
            m32.named_parameters(), m16.named_parameters(), strict=True
        ):
            assert p32.shape == p16.shape, name
            p32.copy_(p16.float())
    d32 = ConceptDirections.fit(m32, _CONCEPT, [i % 2 for i in range(len(_CONCEPT))])
    want = exact_gains(m32, _OPS, d32)
    got = exact_gains(m16, _OPS, d32)
    assert _rel(got, want) < (1e-2 if TL4 else 1e-5), (arch, _rel(got, want))
    _record(arch, "half")


def test_save_load_round_trip(family, dirs, tmp_path):
    arch, model = _supported(family)
    sur = Surrogate.fit(model, _OPS, dirs, d=4)
    sur.save(tmp_path / "sur.safetensors")
    back = Surrogate.load(tmp_path / "sur.safetensors", model)
    assert torch.equal(back.gains, sur.gains) and torch.equal(back.P, sur.P)
    sched = Controller(sur, target=1.0).schedule
    sched.save(tmp_path / "sched.safetensors")
    again = Schedule.load(tmp_path / "sched.safetensors", model)
    assert torch.equal(again.amplitudes, sched.amplitudes)
    toks = torch.tensor([_OPS[0]])
    engine = backend.get(model)
    with torch.no_grad():
        a = engine.run_with_hooks(model, toks, sched.hooks(model))
        b = engine.run_with_hooks(model, toks, again.hooks(model))
    assert torch.equal(a, b)
    _record(arch, "save_load")


def test_support_table_marks_only_complete_families():
    """scripts/support_table.py: ✓ only when every check passed; a refusal or a missing check
    (a failed test) shows as such, never as ✓."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "support_table.py"
    spec = importlib.util.spec_from_file_location("support_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    every = {check: "ok" for check in table.CHECKS}
    assert table.cell(every)[0] == "✓"
    fallback = every | {"fast": "falls back to TransformerLens's block: parallel_attn_mlp (x)"}
    assert table.cell(fallback)[0] == "✓" and "parallel_attn_mlp" in table.cell(fallback)[1]
    assert table.fast_cell(fallback) == "TL's block (parallel_attn_mlp)"
    no_half = every | {"half": "model: ... in torch.bfloat16 ... TransformerLens 3"}
    assert table.cell(no_half)[0] == "✓ (float32/64 only)" and "bfloat16" in table.cell(no_half)[1]
    no_gen = {k: v for k, v in every.items() if k != "generate"}
    assert table.cell(no_gen)[0] == "✗ failed: generate"
    refused = {"support": "model: ... PhiForCausalLM ... TransformerLens 3"}
    assert table.cell(refused) == ("✗ refused", refused["support"])
    assert table.cell({})[0].startswith("✗")
