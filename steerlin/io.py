"""safetensors + JSON metadata for every object steerlin saves; never unpickles.

A steerlin file is a safetensors file whose header metadata holds `{"steerlin": kind,
"format": version, "meta": json}`. Loading checks the header before any tensor is read, so
a foreign file, a truncated file or a pickle renamed to .safetensors is rejected with a
FileFormatError (safetensors parses only its own JSON header and raw buffers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import FileFormatError

FORMAT_VERSION = 1


def save_tensors(path, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `tensors` and `meta` atomically (temp file + rename) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"steerlin": kind, "format": str(FORMAT_VERSION), "meta": json.dumps(meta)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), header)
    os.replace(tmp, path)
    return path


def load_tensors(path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by `save_tensors(kind=...)`; FileFormatError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"path: no such file {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise FileFormatError(
            f"{str(path)!r} is not a readable safetensors file (truncated, corrupt, or another "
            f"format such as a pickle): {exc}"
        ) from None
    if header.get("steerlin") != kind:
        got = header.get("steerlin")
        raise FileFormatError(
            f"{str(path)!r} is not a steerlin {kind} file"
            + (f" (it holds a {got})" if got else " (no steerlin metadata)")
        )
    try:
        version = int(header.get("format", -1))
    except ValueError:
        raise FileFormatError(
            f"{str(path)!r}: unreadable steerlin format version {header.get('format')!r}"
        ) from None
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{str(path)!r} was written by a newer steerlin (format {header['format']}); upgrade"
        )
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{str(path)!r}: metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise FileFormatError(f"{str(path)!r}: metadata is not a JSON object")
    return tensors, meta


def check_model_meta(meta: dict[str, Any], model_cfg, path) -> None:
    """Refuse a file fitted on a model of another shape (n_layers, d_model)."""
    for key in ("n_layers", "d_model"):
        if key in meta and int(meta[key]) != int(getattr(model_cfg, key)):
            raise FileFormatError(
                f"{str(path)!r} was made for a model with {key}={meta[key]}, "
                f"this model has {key}={getattr(model_cfg, key)}"
            )


def model_meta(model) -> dict[str, Any]:
    """Identity of the model a result was fitted on."""
    cfg = model.cfg
    return {"model_name": cfg.model_name, "n_layers": cfg.n_layers, "d_model": cfg.d_model}
