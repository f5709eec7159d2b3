"""safetensors + JSON metadata for every object steerlin saves; never unpickles.

A steerlin file is a safetensors file whose header metadata holds `{"steerlin": kind,
"format": version, "meta": json}`. Loading checks the header before any tensor is read, so
a foreign file, a truncated file or a pickle renamed to .safetensors is rejected with a
FileFormatError (safetensors parses only its own JSON header and raw buffers). Each kind's
`load` then checks every tensor's shape, dtype and finiteness against the metadata
(`check_tensor`, `meta_int`), so an inconsistent or tampered file fails at load with a message
naming the tensor, not later inside the algebra.

Model identity: `model_meta` records the model's name, shape and a weight fingerprint (a hash
of a few rows of the token embedding, `model_fingerprint`). `check_model_meta` refuses a file
(or a schedule) made for a model of another shape always, and for another model of the same
shape (different fingerprint) unless `allow_other_model=True`. Files written before the
fingerprint existed load with that check skipped.

Saves are atomic: the file is written to a unique temporary file in the target folder
(`tempfile.mkstemp`) and moved over the target with `os.replace`; on any failure the
temporary file is removed and a FileWriteError names the path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import FileFormatError, FileWriteError, InputError, OtherModelError
from .validate import check_path

FORMAT_VERSION = 1
#: dtypes a steerlin file may hold (results are float64; directions follow the model's dtype)
FLOAT_DTYPES = (torch.float32, torch.float64)
ANY_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def save_tensors(path, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `tensors` and `meta` atomically to `path` (unique temp file + os.replace)."""
    path = Path(check_path("path", path)).expanduser()
    if path.is_dir():
        raise FileWriteError(f"path: {str(path)!r} is a folder; pass a file name inside it")
    try:
        meta_json = json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise InputError(f"meta: not JSON-serialisable for {str(path)!r} ({exc})") from None
    header = {"steerlin": kind, "format": str(FORMAT_VERSION), "meta": meta_json}
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise FileWriteError(f"{str(path)!r}: cannot write there ({exc})") from None
    os.close(fd)
    try:
        save_file(data, tmp, header)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a saved result is an ordinary file
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, Exception):
            raise FileWriteError(f"{str(path)!r}: could not write the file ({exc})") from exc
        raise
    return path


def load_tensors(path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by `save_tensors(kind=...)`; FileFormatError for anything else."""
    path = Path(check_path("path", path)).expanduser()
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
    if "format" not in header:
        raise FileFormatError(f"{str(path)!r}: no steerlin format version in the header")
    try:
        version = int(header["format"])
    except ValueError:
        raise FileFormatError(
            f"{str(path)!r}: unreadable steerlin format version {header.get('format')!r}"
        ) from None
    if version < 1:
        raise FileFormatError(
            f"{str(path)!r}: invalid steerlin format version {version} (expected 1.."
            f"{FORMAT_VERSION})"
        )
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


# ------------------------------------------------------------------ checks of loaded contents


def meta_int(meta: dict[str, Any], key: str, path, *, min: int = 0) -> int | None:  # noqa: A002
    """meta[key] as an int >= min (None if absent); FileFormatError for anything else."""
    if key not in meta:
        return None
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < min:
        raise FileFormatError(
            f"{str(path)!r}: metadata {key!r} should be an integer >= {min}, got {v!r}"
        )
    return v


def check_tensor(
    path,
    name: str,
    t: torch.Tensor | None,
    shape: tuple,
    *,
    dtypes: tuple = FLOAT_DTYPES,
    finite: bool = True,
) -> None:
    """A loaded tensor has `shape` (None entries: any size), one of `dtypes`, finite values."""
    if t is None:
        raise FileFormatError(f"{str(path)!r}: tensor {name!r} is missing")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise FileFormatError(
            f"{str(path)!r}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}, "
            f"expected one of {allowed}"
        )
    ok = t.ndim == len(shape) and all(
        w is None or w == g for w, g in zip(shape, t.shape, strict=False)
    )
    if not ok:
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise FileFormatError(
            f"{str(path)!r}: tensor {name!r} has shape {list(t.shape)}, expected {want} "
            "(from the file's other tensors and metadata)"
        )
    if finite and not torch.isfinite(t).all():
        raise FileFormatError(f"{str(path)!r}: tensor {name!r} holds NaN or inf values")


def check_unexpected(path, kind: str, tensors: dict, allowed: set[str]) -> None:
    """No tensors besides `allowed` (a file of another version or a tampered one)."""
    extra = sorted(set(tensors) - allowed)
    if extra:
        raise FileFormatError(f"{str(path)!r}: {kind} file has unexpected tensors {extra}")


def check_number_list(path, key: str, value, length: int, *, positive: bool = False) -> None:
    """meta[key] is a list of at least `length` finite (positive) numbers."""
    ok = isinstance(value, list) and len(value) >= length
    ok = ok and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if ok and positive:
        ok = all(v > 0 for v in value)
    if not ok:
        what = "positive " if positive else ""
        raise FileFormatError(
            f"{str(path)!r}: metadata {key!r} should be a list of {length} finite {what}numbers"
        )


# ------------------------------------------------------------------ model identity


def model_fingerprint(model) -> str | None:
    """A cheap identity of a model's weights: a hash of a few rows of its token embedding.

    The rows are rounded to bfloat16 before hashing, so a float32, float64 or bfloat16 copy of
    the same weights (on any device) has the same fingerprint. None when the weights cannot be
    read (a model on the meta device, no embedding).
    """
    try:
        W = model.W_E if hasattr(model, "W_E") else model.embed.W_E
        V, H = int(W.shape[0]), int(W.shape[1])
        rows = sorted({r for r in (0, 1, 2, V // 3, V // 2, (2 * V) // 3, V - 1) if 0 <= r < V})
        with torch.no_grad():
            x = W.detach()[rows].to(device="cpu", dtype=torch.float32)
            x = x.to(torch.bfloat16).to(torch.float32).contiguous()
        digest = hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]
    except Exception:  # noqa: BLE001 - any model whose weights cannot be read: no fingerprint
        return None
    return f"W_E[{V}x{H}]:{digest}"


def model_meta(model) -> dict[str, Any]:
    """Identity of the model a result was fitted on: name, shape and weight fingerprint."""
    cfg = model.cfg
    out = {"model_name": cfg.model_name, "n_layers": cfg.n_layers, "d_model": cfg.d_model}
    fp = model_fingerprint(model)
    if fp is not None:
        out["model_fingerprint"] = fp
    return out


def check_model_meta(
    meta: dict[str, Any], model, path, *, allow_other_model: bool = False, what: str | None = None
) -> None:
    """Refuse a file (or object) made for a model of another shape (n_layers, d_model), and
    one made for another model of the same shape (weight fingerprint) unless
    `allow_other_model`. `model`: the model (or its cfg: shape check only). Meta without a
    fingerprint (older files) skips the identity check."""
    cfg = getattr(model, "cfg", model)
    where = what or repr(str(path))
    for key in ("n_layers", "d_model"):
        if key not in meta:
            continue
        v = meta[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise FileFormatError(f"{where}: metadata {key!r} should be an integer, got {v!r}")
        if v != int(getattr(cfg, key)):
            raise FileFormatError(
                f"{where} was made for a model with {key}={v}, "
                f"this model has {key}={getattr(cfg, key)}"
            )
    if allow_other_model or model is cfg:
        return
    saved = meta.get("model_fingerprint")
    if not saved:
        return
    here = model_fingerprint(model)
    if here is None or here == saved:
        return
    name = meta.get("model_name")
    raise OtherModelError(
        f"{where} was made for another model ({name!r}, weights fingerprint {saved}); this "
        f"model ({getattr(cfg, 'model_name', None)!r}) has the same shape but fingerprint "
        f"{here}. Pass allow_other_model=True to use it anyway"
    )


__all__ = [
    "FORMAT_VERSION",
    "save_tensors",
    "load_tensors",
    "meta_int",
    "check_tensor",
    "check_unexpected",
    "check_number_list",
    "model_fingerprint",
    "model_meta",
    "check_model_meta",
]
