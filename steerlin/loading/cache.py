"""steerlin's cache of converted models: safetensors weights + config JSON + tokenizer + a meta
file written last, read back strictly (sizes, sha256, names and shapes) and fast (the weights
read straight into the parameters while the hash and the tokenizer load run in threads)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import FileFormatError
from ..report import read_json, versions
from .common import _first_line, _quiet_tl, _read_tokenizer, _unembed_layout
from .gguf import _OfflineModel, _source_id

if TYPE_CHECKING:  # TransformerLens 3 only: imported where used
    from transformer_lens import HookedTransformer, HookedTransformerConfig

#: Bump when the cache layout or the conversion changes; older caches are then rebuilt.
CACHE_FORMAT = 1

_WEIGHTS = "model.safetensors"
_CONFIG = "hooked_config.json"
_TOKENIZER = "tokenizer"
_META = "steerlin_meta.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def write_staged(folder: Path, spec: _OfflineModel, fill: Callable[[Path], dict]) -> None:
    """Write a cache folder atomically: `fill(tmp)` writes the files into a temp dir beside
    `folder` and returns its part of the meta; the meta file (with the GGUF source, versions
    and date) is written last, marking the cache complete, and the temp dir is renamed into
    place. A failure to write is a warning, not an error: the model still loads."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache may be shared (STEERLIN_CACHE)
        meta = fill(tmp) | {
            "source": _source_id(spec),
            "versions": versions(),
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


def read_or_none(folder: Path, spec: _OfflineModel, read: Callable[[], Any]) -> Any:
    """`read()` the cache folder if it exists; None (with a warning saying why it will be
    rebuilt) if it is absent, damaged or stale."""
    if not folder.exists():
        return None
    try:
        return read()
    except FileFormatError as exc:
        warnings.warn(
            f"steerlin cache {folder} is damaged or stale ({exc}); rebuilding it from the "
            f"GGUF (one-time, {spec.eta})",
            UserWarning,
            stacklevel=4,
        )
        return None


def _write_cache(model: HookedTransformer, spec: _OfflineModel, folder: Path) -> None:
    """Weights, config, tokenizer, then the meta file (`write_staged`).

    Only parameters are stored: buffers (rotary tables, masks) are rebuilt from the config in
    the requested dtype. A failure to write is a warning, not an error: the model still loads.
    """
    from safetensors.torch import save_file

    def fill(tmp: Path) -> dict:
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
        return {
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
        }

    write_staged(folder, spec, fill)


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
    meta = read_json(folder / _META, "meta file")
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
    cfg = _cfg_from_json(read_json(folder / _CONFIG, "config"), device, dtype)
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
    from transformer_lens import HookedTransformer

    tokenizer_name, cfg.tokenizer_name = cfg.tokenizer_name, None
    try:
        with _quiet_tl():
            model = HookedTransformer(cfg, move_to_device=False)
    except Exception as exc:  # a config this TransformerLens version cannot build
        raise FileFormatError(f"cannot build the model from {_CONFIG}: {exc}") from exc
    finally:
        cfg.tokenizer_name = tokenizer_name
    return model


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
    from transformer_lens import HookedTransformerConfig

    fields = {k: _from_jsonable(v) for k, v in data.items()}
    fields.update(device=device, dtype=dtype, n_devices=1, init_weights=False)
    try:
        return HookedTransformerConfig(**fields)
    except Exception as exc:
        raise FileFormatError(f"{_CONFIG} does not fit this TransformerLens: {exc}") from exc
