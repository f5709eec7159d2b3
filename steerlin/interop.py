"""Steering vectors from other tools, mapped onto steerlin's layer index (no hard dependencies).

steerlin's state x_l is the residual stream ENTERING block l (`blocks.{l}.hook_resid_pre`,
l = 0..L-1) and x_L the last block's output. The tools below index a vector by the block whose
OUTPUT it is added to, so their index n is steerlin's x_{n+1} (checked in each project's source):

- steering-vectors `SteeringVector(layer_activations={n: v}, layer_type="decoder_block")`:
  `patch_activations` registers a forward hook on decoder block n that adds v to the block's
  output (`steering_vectors/steering_vector.py`, `_create_additive_hook`). Negative n counts
  from the end, as their list indexing does. Other layer types (attention, MLP outputs) are not
  points of the residual stream and are refused.
- repeng `ControlVector(model_type, directions={n: v})`: `ControlModule` wraps layer n and adds
  v to its output; `read_representations` reads `hidden_states[n + 1]`, the output of layer n
  (`repeng/control.py`, `repeng/extract.py`).
- llama.cpp control-vector GGUF (also what repeng's `export_gguf` writes): tensor
  `direction.N` is added to the output of layer N (`build_cvec(cur, il)` after the layer's
  residual add, `src/models/*.cpp`; loaded by `common_control_vector_load_one` into slot N - 1;
  N = 0 is rejected; only N = 1..n_layer - 1 are applied, `llama_adapter_cvec::apply`). So
  `direction.N` lands on x_{N+1}: blocks 2..L-1 as injection points, and N = L - 1 on x_L.

A plain tensor or dict is taken in steerlin's own index: Float[L+1, H] for x_0..x_L, Float[H]
for the same vector at every layer, or {l: Float[H]} with l in 0..L (negative from the end).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import FileFormatError, InputError, LayerError, ModelTypeError, ShapeError

#: A foreign index n (vector added to the output of block n) is steerlin's x_{n + OUTPUT_SHIFT}.
OUTPUT_SHIFT = 1


def _as_tensor(v: Any, what: str, d_model: int) -> torch.Tensor:
    try:
        t = torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v)
    except Exception as exc:  # noqa: BLE001 - anything unconvertible gets the same message
        raise ModelTypeError(f"{what}: expected a vector, got {type(v).__name__} ({exc})") from None
    t = t.detach().to("cpu")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.ndim != 1 or t.shape[0] != d_model:
        raise ShapeError(f"{what}: expected a vector of shape [{d_model}], got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError(f"{what}: contains NaN or inf")
    return t


def _index(n: Any, top: int, what: str) -> int:
    """An int in -(top+1)..top, negative counted from the end, as a non-negative index."""
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise LayerError(f"{what}: expected an int layer index, got {type(n).__name__}")
    n = n.__index__()
    m = n + top + 1 if n < 0 else n
    if not 0 <= m <= top:
        raise LayerError(f"{what}: layer index {n} outside -{top + 1}..{top}")
    return m


def is_gguf_path(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike)) and str(obj).lower().endswith(".gguf")


INDEXES = ("resid_pre", "block_output")


class BlockOutputs(dict):
    """A dict {n: vector} in the other tools' numbering: n is the block whose OUTPUT the vector
    is added to (steering-vectors, repeng, llama.cpp), i.e. steerlin's x_{n+1}.

    Accepted wherever directions are (`Surrogate.fit(..., directions=)`, `steerlin.steer`,
    `ConceptDirections.from_vectors`), where a plain dict is read in steerlin's own x_l.
    """

    def __repr__(self) -> str:
        return f"block_outputs({dict.__repr__(self)})"


def block_outputs(vectors: Mapping) -> BlockOutputs:
    """Mark a dict {n: vector} as keyed by block output (the other tools' layer numbers):
    `steerlin.block_outputs({6: v})` is steerlin's x_7."""
    if not isinstance(vectors, Mapping):
        raise ModelTypeError(
            f"vectors: expected a dict block -> vector, got {type(vectors).__name__}"
        )
    return BlockOutputs(vectors)


def to_steerlin_layers(
    obj: Any, n_layers: int, d_model: int, *, index: str = "resid_pre"
) -> tuple[dict[int, torch.Tensor], str]:
    """Vectors keyed by steerlin state index l in 0..L, and a word for where they came from.

    Accepts a tensor/array [L+1, H] or [H], a dict {l: vector}, a steering-vectors
    `SteeringVector`, a repeng `ControlVector` (duck-typed) or a path to a llama.cpp/repeng
    control-vector GGUF. A dict's keys are steerlin's x_l (`index="resid_pre"`, default) or,
    for a `BlockOutputs` (`block_outputs(d)`) or with `index="block_output"`, the block whose
    output the vector is added to (the other tools' convention: key n -> x_{n+1}). Anything
    else raises ModelTypeError naming what came.
    """
    L = n_layers
    if index not in INDEXES:
        raise InputError(f"index: expected one of {INDEXES}, got {index!r}")
    if is_gguf_path(obj):
        found, _ = read_gguf(obj)
        return _shifted(found, L, d_model, "GGUF direction"), f"gguf:{Path(obj).name}"
    layer_acts = getattr(obj, "layer_activations", None)
    if isinstance(layer_acts, Mapping):
        kind = getattr(obj, "layer_type", "decoder_block")
        if kind != "decoder_block":
            raise InputError(
                f"directions: a SteeringVector with layer_type={kind!r} adds to a sub-layer "
                "output, not to the residual stream between blocks; steerlin needs "
                "layer_type='decoder_block'"
            )
        return _shifted(layer_acts, L, d_model, "SteeringVector.layer_activations"), (
            "steering-vectors"
        )
    dirs = getattr(obj, "directions", None)
    if isinstance(dirs, Mapping) and hasattr(obj, "model_type"):
        return _shifted(dirs, L, d_model, "ControlVector.directions"), "repeng"
    if isinstance(obj, BlockOutputs) or (isinstance(obj, Mapping) and index == "block_output"):
        return _shifted(obj, L, d_model, "directions"), "dict (block outputs)"
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            layer = _index(k, L, "directions key")
            if layer in out:
                raise InputError(f"directions: layer {layer} given twice (keys {list(obj)})")
            out[layer] = _as_tensor(v, f"directions[{k}]", d_model)
        if not out:
            raise InputError("directions: got an empty dict")
        return out, "dict"
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(obj).detach().to("cpu")
        if t.ndim == 1:
            v = _as_tensor(t, "directions", d_model)
            return {layer: v for layer in range(L + 1)}, "vector"
        if t.ndim == 2 and t.shape == (L + 1, d_model):
            return {
                layer: _as_tensor(t[layer], f"directions[{layer}]", d_model)
                for layer in range(L + 1)
            }, "tensor"
        raise ShapeError(
            f"directions: expected a tensor of shape [{L + 1}, {d_model}] (x_0..x_L) or "
            f"[{d_model}] (the same at every layer), got {tuple(t.shape)}; for vectors at some "
            "layers pass a dict {layer: vector}"
        )
    raise ModelTypeError(
        "directions: expected ConceptDirections, a tensor [L+1, H] or [H], a dict layer -> "
        "vector, a steering-vectors SteeringVector, a repeng ControlVector or a .gguf path, got "
        f"{type(obj).__module__}.{type(obj).__qualname__}"
    )


def _shifted(found: Mapping, L: int, d_model: int, what: str) -> dict[int, torch.Tensor]:
    """Output-of-block-n vectors -> steerlin x_{n+1} (n negative: from the end, n = -1 is L-1)."""
    if not found:
        raise InputError(f"directions: {what} is empty")
    out = {}
    for n, v in found.items():
        block = _index(n, L - 1, f"{what} key")
        out[block + OUTPUT_SHIFT] = _as_tensor(v, f"{what}[{n}]", d_model)
    return out


def fill_nearest(vectors: Mapping[int, torch.Tensor], n_states: int) -> torch.Tensor:
    """Float[n_states, H]: each layer's vector, or the nearest given layer's (ties: the later).

    A vector given at some layers only is used at the others as it is: a direction in residual
    space, which is what "the same vector at every layer" means for a [H] tensor.
    """
    given = sorted(vectors)
    rows = []
    for layer in range(n_states):
        near = min(given, key=lambda g: (abs(g - layer), -g))
        rows.append(vectors[near])
    return torch.stack(rows).to(torch.float64)


def read_gguf(path) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """A control-vector GGUF as {N: Float[H]} keyed by its own `direction.N`, plus its metadata.

    The file format of llama.cpp's `--control-vector` and repeng's `export_gguf`: tensors named
    `direction.N` (1-D float32), `general.architecture = "controlvector"`,
    `controlvector.model_hint`, `controlvector.layer_count`.
    """
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is in the default install
        raise InputError("reading GGUF control vectors needs `pip install gguf`") from exc
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{str(path)!r}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - gguf raises various errors on bad files
        raise FileFormatError(f"{str(path)!r}: not a readable GGUF file ({exc})") from None
    meta: dict[str, Any] = {}
    for key in ("general.architecture", "controlvector.model_hint"):
        f = reader.get_field(key)
        if f is not None and len(f.parts):
            meta[key] = bytes(f.parts[-1]).decode("utf-8", errors="replace")
    f = reader.get_field("controlvector.layer_count")
    if f is not None and len(f.parts):
        meta["controlvector.layer_count"] = int(f.parts[-1][0])
    arch = meta.get("general.architecture")
    if arch is not None and arch != "controlvector":
        raise FileFormatError(
            f"{str(path)!r}: general.architecture is {arch!r}, not 'controlvector' (a model "
            "file, not a control vector?)"
        )
    out: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        name = t.name
        head, _, tail = name.partition(".")
        if head != "direction" or not tail.isdigit():
            raise FileFormatError(f"{str(path)!r}: unexpected tensor {name!r} (want direction.N)")
        n = int(tail)
        if n == 0:
            raise FileFormatError(
                f"{str(path)!r}: direction.0 (llama.cpp rejects it: it would be the embedding)"
            )
        data = _gguf_direction(path, name, t, gguf)
        if n in out:
            out[n] = out[n] + data  # llama.cpp sums repeated directions of one layer
        else:
            out[n] = data.copy()
    if not out:
        raise FileFormatError(f"{str(path)!r}: no direction.N tensors")
    return out, meta


def _gguf_direction(path, name: str, t, gguf) -> np.ndarray:
    """The float32 vector of one `direction.N` tensor; FileFormatError for an integer,
    quantised or multi-dimensional tensor (llama.cpp control vectors are 1-D floats)."""
    Q = gguf.GGMLQuantizationType
    kind = Q(int(t.tensor_type)) if int(t.tensor_type) in Q._value2member_map_ else t.tensor_type
    label = getattr(kind, "name", str(kind))
    if kind in (Q.I8, Q.I16, Q.I32, Q.I64):
        raise FileFormatError(
            f"{str(path)!r}: {name} is an integer tensor ({label}); a control vector holds "
            "floats (F32)"
        )
    if kind not in (Q.F32, Q.F16, Q.BF16, Q.F64):
        raise FileFormatError(
            f"{str(path)!r}: {name} is quantised ({label}); steerlin reads float (F32/F16/BF16) "
            "control vectors only: write it unquantised"
        )
    shape = [int(x) for x in t.shape]
    if len(shape) != 1:
        raise FileFormatError(
            f"{str(path)!r}: {name} has shape {shape}; a control vector direction is 1-D [d_model]"
        )
    if kind == Q.BF16:  # stored as raw 16-bit words: the high half of a float32
        raw = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
        data = raw.view(np.float32)
    else:
        data = np.asarray(t.data)
        if data.dtype.kind != "f":
            raise FileFormatError(f"{str(path)!r}: {name} holds {data.dtype} data, not floats")
    data = data.astype(np.float32).reshape(-1)
    if data.size != int(t.n_elements):
        raise FileFormatError(
            f"{str(path)!r}: {name} holds {data.size} values, its header says {t.n_elements}"
        )
    if not np.isfinite(data).all():
        raise FileFormatError(f"{str(path)!r}: {name} holds NaN or inf values")
    return data


def write_gguf(path, directions: Mapping[int, Any], *, model_hint: str) -> Path:
    """Write {N: Float[H]} as `direction.N` tensors of a llama.cpp control-vector GGUF."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_hint)
    writer.add_uint32("controlvector.layer_count", len(directions))
    for n in sorted(directions):
        if n < 1:
            raise LayerError(f"write_gguf: direction.{n} is not a llama.cpp layer (N >= 1)")
        v = directions[n]
        v = v.detach().to("cpu", torch.float32).numpy() if isinstance(v, torch.Tensor) else v
        writer.add_tensor(f"direction.{n}", np.asarray(v, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


__all__ = [
    "BlockOutputs",
    "INDEXES",
    "OUTPUT_SHIFT",
    "block_outputs",
    "fill_nearest",
    "is_gguf_path",
    "read_gguf",
    "to_steerlin_layers",
    "write_gguf",
]
