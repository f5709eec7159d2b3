"""What a strategy is: a per-layer shape of the schedule, how it is prepared, and which shared
steps it is produced from (`REGISTRY`; a new strategy joins with one `Strategy` entry).

Kinds of preparation (`steerlin.steer_eval.prepare`): "calibrated" (a shape u [L] with hᵀu = 1,
calibrated in the regime of use to each ±t), "searched" (`search_grid` on the calibration
stems, no calibration) and "prompt" (no schedule: an instruction before each stem). `prompted`
puts the instruction before each stem as well; `shape_of` borrows another entry's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..energy import Metric, least_norm
from ..errors import InputError

F64 = torch.float64

#: the shared steps a strategy's schedules can come from (`steerlin.steer_eval.run_task`)
DIRECTIONS, FIT, KL, EXACT = "directions", "fit", "kl", "exact"


@dataclass(frozen=True)
class Strategy:
    """One strategy: its name, how it is prepared (`kind`), its shape if computed, and the
    shared steps its cost includes (`needs`, in the order they are added)."""

    name: str
    kind: str = "calibrated"  # "calibrated", "searched" or "prompt"
    #: shape(h, kl=, directions=, exact=) -> (u [L], the gains hᵀu is normalised by)
    shape: Callable | None = None
    shape_of: str | None = None  # another entry's shape (the instruction on top of it)
    prompted: bool = False  # the instruction prefix before each stem as well
    needs: tuple[str, ...] = ()


def middle_layers(n_layers: int) -> list[int]:
    """The middle third of the blocks: round(L/3) .. round(2L/3) - 1."""
    lo, hi = round(n_layers / 3), round(2 * n_layers / 3)
    return list(range(lo, max(hi, lo + 1)))


def _min_norm(h, **_):
    L = h.shape[0]
    return least_norm(h, 1.0, torch.eye(L, dtype=F64), list(range(L))), h


def _min_kl(h, *, kl, **_):
    if kl is None:
        raise InputError("strategy 'min-kl' needs the KL metric (steerlin.kl_metric)")
    return least_norm(h, 1.0, kl.W, list(range(h.shape[0]))), h


def _uniform(h, **_):
    return torch.ones(h.shape[0], dtype=F64), h


def _last(h, **_):
    u = torch.zeros(h.shape[0], dtype=F64)
    u[-1] = 1
    return u, h


def _best_layer(h, *, kl, **_):
    # the single layer with the most readout change per unit of predicted KL, h_l²/F_ll
    # (the largest |h_l| in norm-relative units is the last layer: "last" covers it)
    if kl is None:
        raise InputError("strategy 'best-layer' needs the KL metric (steerlin.kl_metric)")
    u = torch.zeros(h.shape[0], dtype=F64)
    u[int((h.pow(2) / kl.W.diagonal().to(F64)).argmax())] = 1
    return u, h


def _exact(h, *, exact, **_):
    if exact is None:
        raise InputError("strategy 'exact' needs exact gains (steerlin.exact_gains)")
    L = h.shape[0]
    h = torch.as_tensor(exact, dtype=F64)
    return least_norm(h, 1.0, torch.eye(L, dtype=F64), list(range(L))), h


def _middle(h, *, directions, **_):
    if directions is None:
        raise InputError("strategy 'middle' needs the ConceptDirections (raw v_l)")
    L = h.shape[0]
    v = directions.vectors[:L].to(F64).norm(dim=-1) / directions.scale[:L].to(F64)
    u = torch.zeros(L, dtype=F64)
    mid = middle_layers(L)
    u[mid] = v[mid]
    return u, h


REGISTRY: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("min-norm", shape=_min_norm, needs=(DIRECTIONS, FIT)),
        Strategy("min-kl", shape=_min_kl, needs=(DIRECTIONS, FIT, KL)),
        Strategy("uniform", shape=_uniform, needs=(DIRECTIONS, FIT)),
        Strategy("last", shape=_last, needs=(DIRECTIONS, FIT)),
        Strategy("best-layer", shape=_best_layer, needs=(DIRECTIONS, FIT, KL)),
        # the surrogate only sizes the start of the calibration
        Strategy("middle", shape=_middle, needs=(DIRECTIONS, FIT)),
        Strategy("exact", shape=_exact, needs=(DIRECTIONS, EXACT)),
        Strategy("searched", kind="searched", needs=(DIRECTIONS,)),
        Strategy("prompt", kind="prompt"),
        Strategy("prompt+min-norm", shape_of="min-norm", prompted=True),
    )
}
STRATEGIES = tuple(REGISTRY)


def get_strategy(name: str) -> Strategy:
    """The registry entry of `name` (InputError naming the strategies otherwise)."""
    if name not in REGISTRY:
        raise InputError(f"strategy: expected one of {STRATEGIES}, got {name!r}")
    return REGISTRY[name]


def strategy_shape(
    name: str, h: torch.Tensor, *, kl: Metric | None = None, directions=None, exact=None
) -> torch.Tensor:
    """Per-layer amplitude shape u [L] (norm-relative) for a strategy, with hᵀu = 1 (h: the
    surrogate's gains; for "exact", the exact gains `exact` play its part)."""
    if name == "searched":
        raise InputError("strategy 'searched' has no computed shape: `search_grid` finds it")
    h = torch.as_tensor(h, dtype=F64)
    entry = REGISTRY.get(name)
    if entry is None or entry.shape is None:
        raise InputError(f"strategy: expected one of {STRATEGIES}, got {name!r}")
    u, h = entry.shape(h, kl=kl, directions=directions, exact=exact)
    pred = float(h @ u)
    if pred == 0:
        raise InputError(f"strategy {name!r}: the surrogate predicts no effect from that shape")
    return u / pred
