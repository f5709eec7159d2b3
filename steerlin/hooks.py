"""Live hooks on a model: add vectors to the residual stream, as context managers.

Every hook here returns a new tensor (never writes in place, so it is safe under autograd and
`torch.func`) and is registered through the backend's hook context (for TransformerLens its
own `model.hooks()`), which tags hooks with a context level: nested `with` blocks remove only
their own hooks, and the hooks are removed on exit and on any exception, KeyboardInterrupt
included. Which positions are steered is a pure function of each forward and of its own KV
cache (`PositionPolicy`); nothing carries from one forward or generation to the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from . import backend
from .backend import Model, check_model
from .errors import InputError, LayerError, ModelTypeError, NonFiniteError, ShapeError

Positions = Literal["last", "all", "generated"] | tuple[Literal["from"], int]
#: The one default of every steering entry point (`inject`, `Schedule.apply`, `Controller.apply`,
#: `Schedule.hooks`): the last real token of each forward, which is what the surrogate models
#: (the frozen-context injection at the last token) and, under `model.generate` with its KV cache
#: (TransformerLens's default), the last prompt token and every generated token.
DEFAULT_POSITIONS = "last"


def resid_pre_name(layer: int) -> str:
    """Hook name of the residual stream entering block `layer`."""
    return f"blocks.{layer}.hook_resid_pre"


def resid_post_name(layer: int) -> str:
    """Hook name of the residual stream leaving block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def check_layer(layer, n_layers: int, *, what: str = "layer", allow_final: bool = False) -> int:
    """Validate a block index (0..n_layers-1, or ..n_layers for states when allow_final)."""
    top = n_layers if allow_final else n_layers - 1
    if isinstance(layer, bool) or not hasattr(layer, "__index__"):
        raise LayerError(f"{what}: expected an int in 0..{top}, got {type(layer).__name__}")
    layer = layer.__index__()
    if not 0 <= layer <= top:
        raise LayerError(
            f"{what}: expected a layer index in 0..{top} (the model has {n_layers} blocks), "
            f"got {layer}"
        )
    return layer


def check_vector(vec, d_model: int, *, what: str, batched: bool = False) -> torch.Tensor:
    """Validate a direction: a finite tensor of shape [d_model] (or [n, d_model] if batched)."""
    vec = torch.as_tensor(vec)
    ok = vec.ndim == 1 or (batched and vec.ndim == 2)
    if not ok or vec.shape[-1] != d_model:
        want = f"[{d_model}]" + (f" or [n, {d_model}]" if batched else "")
        raise ShapeError(f"{what}: expected a vector of shape {want}, got {tuple(vec.shape)}")
    if not torch.isfinite(vec).all():
        raise NonFiniteError(f"{what}: contains NaN or inf")
    return vec


@dataclass(frozen=True)
class PositionPolicy:
    """Which positions of a forward receive the addition; a pure function of that forward.

    `offset` is the number of positions already in the forward's KV cache (TransformerLens's
    `past_kv_cache_entry`, read per block when the forward runs), or None when the forward has no
    cache. A column j of the forward is the absolute position `offset + j`.

    kind:
        "last"      the last real token: column `lengths - 1 - offset` when `lengths` (real
                    lengths of a right-padded batch, absolute) is given, else the last column
                    (right for unpadded and left-padded batches).
        "all"       every column.
        "from"      absolute positions >= `start` (an int, or one int per row).
        "generated" the prompt's last token and everything after it, read from the cache: a
                    forward that starts an empty cache (offset 0) is the prompt (steer its last
                    token, as "last"); a forward that continues a cache (offset > 0) holds only
                    generated tokens (steer them all). A forward without a KV cache raises: it
                    cannot say where the prompt ended; pass ("from", n_prompt - 1) there.
    """

    kind: str
    start: tuple[int, ...] | int | None = None

    def mask(
        self,
        batch: int,
        seq: int,
        offset: int | None,
        lengths: torch.Tensor | None,
        *,
        device,
        dtype,
    ) -> torch.Tensor:
        """[batch, seq, 1] 0/1 mask of the columns that receive the addition."""
        if self.kind == "all":
            return torch.ones(batch, seq, 1, dtype=dtype, device=device)
        if self.kind == "generated":
            if offset is None:
                raise InputError(
                    "positions='generated' reads where the prompt ends from the KV cache, and this "
                    "forward has none (a plain forward, or model.generate(..., "
                    "use_past_kv_cache=False)); use positions=('from', n_prompt_tokens - 1) or "
                    "'last' there"
                )
            if offset > 0:
                return torch.ones(batch, seq, 1, dtype=dtype, device=device)
            return _last_mask(batch, seq, 0, lengths, device=device, dtype=dtype)
        if self.kind == "last":
            return _last_mask(batch, seq, offset or 0, lengths, device=device, dtype=dtype)
        # from
        start = torch.as_tensor(self.start, device=device).reshape(-1)
        if start.numel() not in (1, batch):
            raise ShapeError(
                f"positions: ('from', ...) got {start.numel()} start indices for a batch of {batch}"
            )
        col = torch.arange(seq, device=device)[None, :] + (offset or 0)
        return (col >= start[:, None]).to(dtype)[..., None].expand(batch, seq, 1)


def _last_mask(batch, seq, offset, lengths, *, device, dtype) -> torch.Tensor:
    mask = torch.zeros(batch, seq, 1, dtype=dtype, device=device)
    if lengths is None:
        mask[:, -1] = 1
        return mask
    if lengths.shape[0] != batch:
        raise ShapeError(f"lengths: expected {batch} entries (the batch), got {lengths.shape[0]}")
    col = lengths.to(device) - 1 - offset
    rows = ((col >= 0) & (col < seq)).nonzero().flatten()
    mask[rows, col[rows]] = 1
    return mask


def parse_positions(positions) -> PositionPolicy:
    """Validate a position policy: "last", "all", "generated" or ("from", index)."""
    if isinstance(positions, PositionPolicy):
        return positions
    if isinstance(positions, str) and positions in ("last", "all", "generated"):
        return PositionPolicy(positions)
    if isinstance(positions, tuple) and len(positions) == 2 and positions[0] == "from":
        start = positions[1]
        if isinstance(start, torch.Tensor):
            start = start.tolist()
        starts = [start] if not isinstance(start, Sequence) else list(start)
        ok = starts and all(
            hasattr(s, "__index__") and not isinstance(s, bool) and s.__index__() >= 0
            for s in starts
        )
        if not ok:
            raise InputError(
                f"positions: ('from', index) needs a non-negative int index (or one per row), "
                f"got {start!r}"
            )
        starts = tuple(s.__index__() for s in starts)
        return PositionPolicy("from", starts[0] if not isinstance(start, Sequence) else starts)
    raise InputError(
        "positions: expected one of 'last', 'all', 'generated' or ('from', index), got "
        f"{positions!r}"
    )


class _CacheProbe:
    """Per-block record of the KV-cache offset of the forward now running (None: no cache).

    The backend's position probe (for TransformerLens a forward pre-hook on each steered block
    reading `past_kv_cache_entry.past_keys.shape[1]`) records it just before the block's own
    `hook_resid_pre` fires, which takes it out again. Nothing carries from one forward to the
    next: every value is read from that forward's own cache.
    """

    def __init__(self) -> None:
        self.offsets: dict[int, int | None] = {}

    def record(self, layer: int, offset: int | None) -> None:
        self.offsets[layer] = offset

    def take(self, layer: int) -> int | None:
        return self.offsets.pop(layer, None)


def addition_name(layer: int, n_layers: int) -> str:
    """Where an addition to x_l goes: `blocks.{l}.hook_resid_pre`, and for x_L (l = n_layers)
    the last block's `hook_resid_post`."""
    return resid_pre_name(layer) if layer < n_layers else resid_post_name(n_layers - 1)


def _check_additions(model, additions) -> dict[int, torch.Tensor]:
    if not isinstance(additions, Mapping):
        raise ModelTypeError(
            f"additions: expected a mapping layer -> vector, got {type(additions).__name__}"
        )
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    checked: dict[int, torch.Tensor] = {}
    for layer, vec in additions.items():
        layer = check_layer(layer, n_layers, what="additions layer", allow_final=True)
        checked[layer] = check_vector(vec, d_model, what=f"additions[{layer}]", batched=True)
    return checked


def _make_hook(layer: int, vec: torch.Tensor, policy: PositionPolicy, lengths, probe):
    def hook(resid: torch.Tensor, hook) -> torch.Tensor:
        v = vec.to(device=resid.device, dtype=resid.dtype)
        if v.ndim == 2:
            if v.shape[0] != resid.shape[0]:
                raise ShapeError(
                    f"additions[{layer}]: {v.shape[0]} per-sequence vectors for a batch "
                    f"of {resid.shape[0]}"
                )
            v = v[:, None, :]
        offset = probe.take(layer) if probe is not None else None
        batch, seq, _ = resid.shape
        mask = policy.mask(batch, seq, offset, lengths, device=resid.device, dtype=resid.dtype)
        return resid + mask * v

    return hook


def steering_hooks(
    model: Model,
    additions: Mapping[int, torch.Tensor],
    *,
    positions: Positions = DEFAULT_POSITIONS,
    lengths: Sequence[int] | torch.Tensor | None = None,
) -> list[tuple[str, Callable]]:
    """Stateless `[(hook_name, fn)]` adding `additions[l]` at `blocks.{l}.hook_resid_pre`.

    For `model.run_with_hooks(tokens, fwd_hooks=...)` or `with model.hooks(fwd_hooks=...)` on
    forwards WITHOUT a KV cache (a TransformerLens hook sees only the residual, not the cache):
    column j is position j. positions: "last", "all" or ("from", index); "generated" needs the
    cache's position and is available through `inject` / `Schedule.apply` only.
    """
    check_model(model)
    policy = parse_positions(positions)
    if policy.kind == "generated":
        raise InputError(
            "positions='generated' needs each forward's KV-cache position, which plain "
            "(hook_name, fn) pairs cannot see; use `with steerlin.inject(...)` or "
            "`with schedule.apply(model, positions='generated')`, or ('from', index) here"
        )
    checked = _check_additions(model, additions)
    len_t = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
    L = model.cfg.n_layers
    return [
        (addition_name(l, L), _make_hook(l, v, policy, len_t, None))
        for l, v in sorted(checked.items())
    ]


class Injection:
    """Handle yielded by `inject`: the policy and lengths in force (no state of its own)."""

    def __init__(self, positions, lengths: torch.Tensor | None) -> None:
        self.positions = positions
        self.lengths = lengths


@contextmanager
def inject(
    model: Model,
    additions: Mapping[int, torch.Tensor],
    *,
    positions: Positions = DEFAULT_POSITIONS,
    lengths: Sequence[int] | torch.Tensor | None = None,
) -> Iterator[Injection]:
    """Add `additions[l]` to x_l (`blocks.{l}.hook_resid_pre`; x_L: the last block's
    `hook_resid_post`) while the context is open.

    Args:
        model: the model to steer.
        additions: layer l in 0..L -> vector Float[d_model] (same for every sequence) or
            Float[batch, d_model] (one per sequence of the batch that will run).
        positions: which positions of each forward are steered (see `PositionPolicy`); every
            forward is judged on its own, with its own KV-cache position, so one context serves
            any number of forwards and generations:
            "last" (default): the last real token (`lengths - 1` for a right-padded batch when
            `lengths` is given, else the last column). Under `model.generate` with the KV cache
            (TransformerLens's default) that is the last prompt token and then every generated
            token. With `use_past_kv_cache=False` every step re-runs the whole sequence and
            only its newest token is steered; pass ("from", n_prompt - 1) for the cached result.
            "all": every position. ("from", i): absolute positions >= i (cache offset included).
            "generated": the last prompt token and every token after it, read from the cache;
            a forward without a KV cache raises InputError.
        lengths: real lengths of a right-padded batch (for "last" and "generated").

    Yields:
        An `Injection` handle (positions and lengths; no state).
    """
    check_model(model)
    policy = parse_positions(positions)
    checked = _check_additions(model, additions)
    len_t = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
    handle = Injection(positions, len_t)
    probe = _CacheProbe()
    L = model.cfg.n_layers
    fwd_hooks = [
        (addition_name(l, L), _make_hook(l, v, policy, len_t, probe))
        for l, v in sorted(checked.items())
    ]

    def record(block: int, offset: int | None) -> None:
        probe.record(block, offset)
        if block == L - 1 and L in checked:  # x_L is read off the last block's own cache
            probe.record(L, offset)

    blocks = sorted({min(l, L - 1) for l in checked})
    be = backend.get(model)
    with be.position_probe(model, blocks, record), be.hooks(model, fwd_hooks):
        yield handle


def state_hook_names(n_layers: int) -> list[str]:
    """Hook names of x_0..x_L: resid_pre of every block, then the last block's resid_post."""
    return [resid_pre_name(l) for l in range(n_layers)] + [resid_post_name(n_layers - 1)]


__all__ = [
    "state_hook_names",
    "DEFAULT_POSITIONS",
    "Injection",
    "addition_name",
    "PositionPolicy",
    "check_model",
    "inject",
    "parse_positions",
    "resid_post_name",
    "resid_pre_name",
    "steering_hooks",
]
