"""Offline models under TransformerLens 4: the GGUF dequantised once to a Hugging Face model,
cached in Hugging Face's own safetensors layout, and wrapped in a `TransformerBridge`.

Its cache sits next to the TransformerLens 3 one (`<cache root>/<model>.hf/`, format
`BRIDGE_CACHE_FORMAT`): the two lines store different things (Hugging Face weights here,
folded HookedTransformer weights there) and never read each other's folder. The meta file is
written last and checked on every load (format, model, GGUF source, weights size and sha256).
"""

from __future__ import annotations

import gc
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import FileFormatError
from ..report import read_json
from .cache import _sha256, read_or_none, write_staged
from .common import _first_line, _read_tokenizer, _say
from .gguf import _hf_from_gguf, _OfflineModel, _sanity_check, _source_id

#: Bump when the bridge cache layout or conversion changes; older caches are then rebuilt.
BRIDGE_CACHE_FORMAT = "hf-1"

_HF = "hf"  # save_pretrained folder (config.json + model.safetensors)
_WEIGHTS = "model.safetensors"
_TOKENIZER = "tokenizer"
_META = "steerlin_meta.json"


def bridge_folder(root: Path, spec: _OfflineModel) -> Path:
    """The TransformerLens 4 cache folder of `spec` under the cache root."""
    return root / f"{spec.key}.hf"


def boot(hf_model: Any, tokenizer: Any, hub_id: str, device: str, dtype: torch.dtype) -> Any:
    """Wrap a Hugging Face causal LM in a TransformerBridge (no hub access)."""
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_transformers(
            hub_id, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )
    return model


def write_bridge_cache(hf_model: Any, tokenizer: Any, spec: _OfflineModel, folder: Path) -> None:
    """Hugging Face weights + config, tokenizer, then the meta file (`write_staged`). A
    failure to write is a warning: the model still loads."""

    def fill(tmp: Path) -> dict:
        hf_model.save_pretrained(str(tmp / _HF), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp / _TOKENIZER))
        weights = tmp / _HF / _WEIGHTS
        return {
            "format": BRIDGE_CACHE_FORMAT,
            "model": spec.key,
            "hub_id": spec.hub_id,
            "dtype": "float32",
            "weights": {"size": weights.stat().st_size, "sha256": _sha256(weights)},
        }

    write_staged(folder, spec, fill)


def read_bridge_cache(folder: Path, spec: _OfflineModel, device: str, dtype: torch.dtype) -> Any:
    """The bridge from a cache folder; any damage raises FileFormatError with the reason."""
    from transformers import AutoModelForCausalLM

    meta = read_json(folder / _META, "meta file")
    if meta.get("format") != BRIDGE_CACHE_FORMAT:
        raise FileFormatError(
            f"cache format {meta.get('format')!r}, expected {BRIDGE_CACHE_FORMAT!r}"
        )
    if meta.get("model") != spec.key:
        raise FileFormatError(f"cache holds {meta.get('model')!r}, expected {spec.key!r}")
    source = _source_id(spec)
    if source is not None and meta.get("source") not in (None, source):
        raise FileFormatError(f"cache was built from {meta.get('source')}, not {source}")
    weights = folder / _HF / _WEIGHTS
    try:
        if weights.stat().st_size != meta["weights"]["size"]:
            raise FileFormatError(f"{_WEIGHTS} has the wrong size (truncated?)")
        if _sha256(weights) != meta["weights"]["sha256"]:
            raise FileFormatError(f"{_WEIGHTS} does not match its recorded sha256")
    except FileNotFoundError as exc:
        raise FileFormatError(f"missing {Path(exc.filename).name}") from exc
    except (KeyError, TypeError) as exc:
        raise FileFormatError(f"meta file lacks {exc}") from exc
    tokenizer = _read_tokenizer(folder / _TOKENIZER)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(folder / _HF), local_files_only=True, dtype=dtype
        )
    except Exception as exc:  # transformers raises many types for a broken folder
        raise FileFormatError(f"cannot load the Hugging Face model: {_first_line(exc)}") from exc
    hf_model.eval()
    return boot(hf_model, tokenizer, spec.hub_id, device, dtype)


def load_offline_bridge(spec: _OfflineModel, device: str, dtype: torch.dtype, root: Path) -> Any:
    """`spec` as a TransformerBridge from its cache; (re)build the cache first if needed."""
    folder = bridge_folder(root, spec)
    model = read_or_none(folder, spec, lambda: read_bridge_cache(folder, spec, device, dtype))
    if model is not None:
        return model
    _say(f"converting {spec.title} GGUF to fp32 for TransformerLens 4 (one-time, {spec.eta})...")
    start = time.perf_counter()
    hf_model, tokenizer = _hf_from_gguf(spec)
    hf_model.eval()
    # written before any bridge wraps the model (booting replaces its submodules in place)
    write_bridge_cache(hf_model, tokenizer, spec, folder)
    if (folder / _META).exists():
        del hf_model
        gc.collect()
        model = read_bridge_cache(folder, spec, device, dtype)
    else:  # the cache could not be written (warned): serve the converted model itself
        model = boot(hf_model.to(device=device, dtype=dtype), tokenizer, spec.hub_id, device, dtype)
    try:
        _sanity_check(model, spec)
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)  # never leave an implausible conversion cached
        raise
    _say(f"converted {spec.title} in {time.perf_counter() - start:.0f} s")
    return model


__all__ = ["BRIDGE_CACHE_FORMAT", "boot", "bridge_folder", "load_offline_bridge"]
