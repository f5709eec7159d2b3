"""Half-precision models' frozen maps in float32, one block at a time (`BlockUpcast`).

Half-precision models (bfloat16/float16) are computed in float32 one block at a time
(`BlockUpcast`): the context is one layer-by-layer float32 forward (embeddings summed in
float32, each block run as a float32 copy of only that block, released before the next), its
keys/values and states are kept in float32 (they are the maps' constants: rounding them to 8
bits would put a bf16 error into every Jacobian), and every later single-token call runs
against the float32 copy of its block. A bf16 model's maps are thus a float32 model's maps
with bf16-rounded weights, without a float32 copy of the model (tests/test_bf16.py).

`compute_dtype` and `check_jvp_dtype` say which dtype the maps compute in and refuse the
others; `upcaster` hands out the one `BlockUpcast` per model; `upcast_stats` reports the bytes
of float32 copies alive (tests and benchmarks: no float32 model copy).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch

from . import backend
from .backend import Model
from .errors import InputError

JVP_DTYPES = (torch.float32, torch.float64)
#: dtypes whose frozen maps are computed in float32 one block at a time (`BlockUpcast`)
HALF_DTYPES = (torch.bfloat16, torch.float16)


def compute_dtype(model: Model) -> torch.dtype:
    """The dtype the frozen maps, their JVPs/VJPs and the contexts' states compute in: the
    model's for float32/float64, float32 for a bfloat16/float16 model (`BlockUpcast`)."""
    dt = model.cfg.dtype
    return dt if dt in JVP_DTYPES else torch.float32


def check_jvp_dtype(model: Model) -> None:
    """InputError unless the frozen maps can be computed for the model's dtype.

    The frozen-context maps, their JVPs and the gain scans difference and differentiate block
    outputs; in bfloat16/float16 (8-11 bit mantissas) a JVP or an eps = 0.1 central difference
    would be mostly rounding. float32/float64 models compute in their dtype; bfloat16/float16
    models in float32, one block's float32 copy at a time (`BlockUpcast`: no float32 copy of
    the model); any other dtype is refused.
    """
    dt = model.cfg.dtype
    if dt in JVP_DTYPES:
        return
    if dt not in HALF_DTYPES:
        raise InputError(
            f"model: dtype {dt} is not supported for Jacobian-vector products and gain scans "
            "(float32/float64, or bfloat16/float16 computed in float32 block by block)"
        )
    be = backend.get(model)
    if type(be).upcast_block is backend.Backend.upcast_block:
        raise InputError(
            f"model: dtype {dt}: the {be.name!r} backend cannot compute a half-precision "
            "model's blocks in float32; pass a float32 copy, e.g. "
            "copy.deepcopy(model).to(torch.float32), or load_model(name, dtype=torch.float32)"
        )


class BlockUpcast:
    """float32 copies of a bfloat16/float16 model's blocks, `keep` blocks at a time.

    `block(layer)` returns a copy of block `layer` computing in float32 (the backend's
    `upcast_block`: weights cast, rotary tables recomputed in float32, no hooks), filled on
    first use and emptied when another block is asked for (least recently used beyond `keep`),
    so at most `keep` blocks' weights exist in float32 at once: memory one block in float32,
    never the model. An emptied copy keeps its module objects (no storage) and is refilled by
    casting the model's weights again, ~5x cheaper than a new copy; its float32 buffers (rotary
    tables) are shared by every copy that has equal ones. Weights edited in place are picked
    up on the next fill. `derived(layer, name, build)` caches build(copy) while the copy is
    filled (the fast engine's fused weights). One instance is shared per model by every live
    context (`upcaster`); it goes with the last of them.
    """

    def __init__(self, model: Model, dtype: torch.dtype = torch.float32, keep: int = 1):
        self.model, self.dtype, self.keep = model, dtype, keep
        self._cache: OrderedDict[int, tuple[tuple, torch.nn.Module, dict]] = OrderedDict()
        self._skeletons: dict[int, tuple[torch.nn.Module, list, int]] = {}
        self._pool: list[torch.Tensor] = []  # float32 buffers shared by the copies
        self._bytes = [0]  # float32 bytes this instance holds (upcast_stats)
        weakref.finalize(self, _release_bytes, self._bytes)

    def _key(self, layer: int) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.model.blocks[layer].parameters())

    def block(self, layer: int) -> torch.nn.Module:
        key = self._key(layer)
        hit = self._cache.get(layer)
        if hit is not None and hit[0] == key:
            self._cache.move_to_end(layer)
            return hit[1]
        self._evict(layer)
        while len(self._cache) >= self.keep:  # release before filling the next copy
            self._evict(next(iter(self._cache)))
        skel = self._skeletons.get(layer)
        if skel is None:
            mod = backend.get(self.model).upcast_block(self.model, layer, self.dtype)
            src = list(self.model.blocks[layer].parameters())
            pairs = list(zip(mod.parameters(), src, strict=True))
            if any(d.shape != s_.shape for d, s_ in pairs):
                raise RuntimeError("internal: a block copy's parameters do not match the block's")
            self._share_buffers(mod)
            nbytes = sum(d.numel() * d.element_size() for d, _ in pairs)
            self._skeletons[layer] = (mod, pairs, nbytes)
        else:
            mod, pairs, nbytes = skel
            with torch.no_grad():
                for dst, src_p in pairs:
                    dst.data = src_p.detach().to(self.dtype)
        _add_bytes(nbytes, self._bytes)
        self._cache[layer] = (key, mod, {})
        return mod

    def _evict(self, layer: int) -> None:
        """Empty block `layer`'s copy (its weights' storage and derived tensors go)."""
        if self._cache.pop(layer, None) is None:
            return
        _, pairs, nbytes = self._skeletons[layer]
        for dst, _ in pairs:
            dst.data = dst.data.new_empty(0)
        _add_bytes(-nbytes, self._bytes)

    def _share_buffers(self, mod: torch.nn.Module) -> None:
        for m in mod.modules():
            for name, buf in list(m._buffers.items()):
                if buf is None or not buf.is_floating_point():
                    continue
                same = next(
                    (
                        t
                        for t in self._pool
                        if t.shape == buf.shape
                        and t.dtype == buf.dtype
                        and t.device == buf.device
                        and torch.equal(t, buf)
                    ),
                    None,
                )
                if same is None:
                    self._pool.append(buf)
                    _add_bytes(buf.numel() * buf.element_size(), self._bytes)
                else:
                    m._buffers[name] = same

    def derived(self, layer: int, name: str, build: Callable[[torch.nn.Module], object]):
        mod = self.block(layer)
        extras = self._cache[layer][2]
        if name not in extras:
            extras[name] = build(mod)
            parts = extras[name].__dict__.values() if hasattr(extras[name], "__dict__") else ()
            _track([t for t in parts if isinstance(t, torch.Tensor)])
        return extras[name]

    def release(self) -> None:
        """Empty every float32 copy now."""
        for layer in list(self._cache):
            self._evict(layer)


_UPCASTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LIVE = {"bytes": 0, "peak": 0}


def _add_bytes(n: int, holder: list) -> None:
    holder[0] += n
    _LIVE["bytes"] += n
    _LIVE["peak"] = max(_LIVE["peak"], _LIVE["bytes"])


def _release_bytes(holder: list) -> None:
    _LIVE["bytes"] -= holder[0]


def _track(tensors: list[torch.Tensor]) -> None:
    """Count the bytes of float32 tensors alive (upcast_stats), freed when each tensor is
    (views of another tensor are not counted again)."""
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen or t.dtype not in JVP_DTYPES or t._base is not None:
            continue
        seen.add(id(t))
        n = t.numel() * t.element_size()
        _LIVE["bytes"] += n
        _LIVE["peak"] = max(_LIVE["peak"], _LIVE["bytes"])
        weakref.finalize(t, _untrack, n)


def _untrack(n: int) -> None:
    _LIVE["bytes"] -= n


def upcast_stats(reset: bool = False) -> dict[str, int]:
    """Bytes of float32 block copies alive now ("bytes") and at most so far ("peak");
    `reset` starts the peak again from now (tests and benchmarks: no float32 model copy)."""
    out = {"bytes": _LIVE["bytes"], "peak": _LIVE["peak"]}
    if reset:
        _LIVE["peak"] = _LIVE["bytes"]
    return out


def upcaster(model: Model) -> BlockUpcast | None:
    """The model's shared `BlockUpcast` (None for a float32/float64 model)."""
    if model.cfg.dtype in JVP_DTYPES:
        return None
    check_jvp_dtype(model)
    ref = _UPCASTS.get(model)
    up = ref() if ref is not None else None
    if up is None:
        up = BlockUpcast(model, compute_dtype(model))
        _UPCASTS[model] = weakref.ref(up)
    return up


__all__ = [
    "BlockUpcast",
    "HALF_DTYPES",
    "JVP_DTYPES",
    "check_jvp_dtype",
    "compute_dtype",
    "upcast_stats",
    "upcaster",
]
