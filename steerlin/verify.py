"""The full model checks a schedule: measured readout shift, calibration, energy comparison.

`measure_shift` runs a schedule on the full model (frozen-context single-token path, or hooks
and full forwards); `calibrate` bisects one multiplier until the measured shift hits the
target (the paper's procedure); `compare_energy` calibrates the minimum-energy schedule and
the baselines and reports their energies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import backend
from .backend import Model, check_model
from .control import Controller
from .errors import InputError, NonFiniteError, UnreachableTargetError
from .frozen import ContextPool, compute_dtype, iter_contexts
from .gains import METHODS
from .hooks import inject, resid_post_name
from .readouts import schedule_readouts
from .regime import bisect_multiplier
from .trajectory import PromptsLike, iter_batches, pad_id, tokenize
from .validate import check_int, check_number, check_schedule


def _shift_contexts(model, contexts, vectors, readouts, alphas) -> torch.Tensor:
    """Mean readout shifts [m, r] for schedule multipliers `alphas` (cached single-token path;
    `contexts`: any iterable of frozen contexts, e.g. streamed batch by batch)."""
    dt = compute_dtype(model)  # float32 for a half-precision model (its maps' dtype)
    alphas = torch.as_tensor(alphas, dtype=dt, device=model.cfg.device)
    m = alphas.shape[0]
    total = torch.zeros(m, len(readouts), dtype=torch.float64)
    n = 0
    vec = vectors.to(device=model.cfg.device, dtype=dt)
    active = (vec != 0).any(-1)
    with torch.no_grad():
        for ctx in contexts:
            x0 = ctx.states[:, -1]
            z = ctx.states[:, 0][:, None, :].expand(-1, m, -1)  # [b, m, H]
            for layer in range(ctx.n_layers):
                if active[layer]:
                    z = z + alphas[None, :, None] * vec[layer]
                z = ctx.block_many(layer, z)
            for j, rd in enumerate(readouts):
                dy = rd(model, z) - rd(model, x0)[:, None]  # [b, m]
                total[:, j] += dy.to("cpu", torch.float64).sum(0)
            n += len(ctx)
    out = total / n
    if not torch.isfinite(out).all():
        raise NonFiniteError("schedule shift: non-finite readout")
    return out


def _shift_hooks(model, prompts, schedule, readouts, alpha, batch_size) -> torch.Tensor:
    """Mean readout shifts [r] for one multiplier with hooks and full forwards."""
    ids = tokenize(model, prompts)
    name = resid_post_name(model.cfg.n_layers - 1)
    engine = backend.get(model)
    total = torch.zeros(len(readouts), dtype=torch.float64)
    adds = {
        k: alpha * v.to(device=model.cfg.device, dtype=model.cfg.dtype)
        for k, v in schedule.additions().items()
    }
    for bt in iter_batches(ids, batch_size, pad=pad_id(model), device=model.cfg.device):
        rows = torch.arange(len(bt.index), device=bt.tokens.device)
        got = {}
        grab = lambda r, hook: got.__setitem__("x", r[rows, bt.lengths - 1])
        with torch.no_grad():
            engine.run_with_hooks(model, bt.tokens, [(name, grab)], return_type=None)
            x0 = got["x"]
            with inject(model, adds, positions="last", lengths=bt.lengths):
                engine.run_with_hooks(model, bt.tokens, [(name, grab)], return_type=None)
        for j, rd in enumerate(readouts):
            total[j] += (rd(model, got["x"]) - rd(model, x0)).to("cpu", torch.float64).sum()
    return total / len(ids)


def measure_shift(
    model: Model,
    prompts: PromptsLike,
    schedule,
    *,
    readout=None,
    label_words: Sequence[str] | Sequence[int] | None = None,
    method: str = "cached",
    batch_size: int = 16,
    engine: str = "auto",
) -> torch.Tensor:
    """Full-model mean readout shift(s) Float[r] that `schedule` causes on the prompts.

    engine: the frozen-context engine of method="cached" (see `steerlin.frozen`)."""
    check_model(model)
    check_schedule("schedule", schedule)
    schedule.check_for(model)
    if method not in METHODS:
        raise InputError(f"method: expected one of {METHODS}, got {method!r}")
    batch_size = check_int("batch_size", batch_size, min=1)
    rds = schedule_readouts(model, schedule, readout, label_words)
    if method == "hooks":
        return _shift_hooks(model, prompts, schedule, rds, 1.0, batch_size)
    contexts = iter_contexts(model, prompts, batch_size=batch_size, engine=engine)  # streamed
    return _shift_contexts(model, contexts, schedule.vectors, rds, [1.0])[0]


@dataclass(frozen=True)
class Calibration:
    """Result of `calibrate`: the rescaled schedule and what the full model did with it."""

    schedule: object
    multiplier: float
    measured_shift: float
    evaluations: int


def calibrate(
    model: Model,
    prompts: PromptsLike,
    schedule,
    target: float,
    *,
    readout=None,
    label_words: Sequence[str] | Sequence[int] | None = None,
    tol: float = 1e-3,
    max_multiplier: float = 1024.0,
    max_evaluations: int = 60,
    method: str = "cached",
    batch_size: int = 16,
    engine: str = "auto",
    context_memory: int = 256 * 2**20,
) -> Calibration:
    """Bisection on one multiplier α of `schedule` until the full model's mean readout shift
    equals `target` (to `tol` relative): the paper's procedure.

    The bracket starts at [0, 1] (α = 1 is the surrogate's prediction) and doubles up to
    `max_multiplier`; with no sign change there, UnreachableTargetError says how far it got.
    method="cached" evaluates on the frozen-context single-token path; "hooks" uses full
    forwards with TransformerLens hooks (for checks on a few prompts). engine: the
    frozen-context engine of method="cached" (see `steerlin.frozen`). context_memory: bytes
    of frozen contexts kept across the bisection's evaluations; batches beyond it are rebuilt
    on each evaluation (`steerlin.frozen.ContextPool`; 0: stream every batch). `prompts` may
    be a `ContextPool` already built (method="cached"), to calibrate several schedules on it.
    """
    check_model(model)
    check_schedule("schedule", schedule)
    schedule.check_for(model)
    target = check_number("target", target)
    if target == 0:
        raise InputError(f"target: expected a finite non-zero shift, got {target}")
    tol = check_number("tol", tol, positive=True)
    max_multiplier = check_number("max_multiplier", max_multiplier, min=1.0)
    max_evaluations = check_int("max_evaluations", max_evaluations, min=1)
    batch_size = check_int("batch_size", batch_size, min=1)
    context_memory = check_int("context_memory", context_memory, min=0)
    if method not in METHODS:
        raise InputError(f"method: expected one of {METHODS}, got {method!r}")
    if not schedule.layers:
        raise InputError("schedule: all amplitudes are zero; nothing to calibrate")
    rds = schedule_readouts(model, schedule, readout, label_words)[:1]
    if isinstance(prompts, ContextPool) and method != "cached":
        raise InputError('prompts: a ContextPool is for method="cached"; pass the prompts')
    if method == "cached":
        contexts = (
            prompts
            if isinstance(prompts, ContextPool)
            else ContextPool(
                model, prompts, batch_size=batch_size, engine=engine, budget=context_memory
            )
        )
        f = lambda a: float(_shift_contexts(model, contexts, schedule.vectors, rds, [a])[0, 0])
    else:
        f = lambda a: float(_shift_hooks(model, prompts, schedule, rds, a, batch_size)[0])
    a, fa, evals = bisect_multiplier(
        f,
        target,
        tol=tol,
        max_multiplier=max_multiplier,
        max_evaluations=max_evaluations,
        secant=False,
    )
    cal = schedule.scaled(a, calibrated=True, measured_shift=fa, multiplier=a)
    return Calibration(schedule=cal, multiplier=a, measured_shift=fa, evaluations=evals)


def compare_energy(
    model: Model,
    prompts: PromptsLike,
    surrogate,
    target: float,
    *,
    baselines: Sequence[str] = ("uniform", "last", "random"),
    n_random: int = 5,
    layers: Sequence[int] | None = None,
    tol: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> list[dict]:
    """Calibrate the minimum-energy (LLV) schedule and the baselines on the full model.

    Returns one row per strategy: strategy, energy (Σu², norm-relative: the headline),
    ratio_to_llv, raw_energy, measured_shift, multiplier, evaluations, layers; "random" gives
    `n_random` seeded draws and a median row. A strategy that cannot reach the target keeps
    its row with energy = inf and the error message.
    """
    n_random = check_int("n_random", n_random, min=0)
    if isinstance(baselines, str) or not isinstance(baselines, Sequence):
        raise InputError(f"baselines: expected a list of baseline names, got {baselines!r}")
    for b in baselines:
        if not isinstance(b, str):
            raise InputError(f"baselines: expected names such as 'uniform', got {b!r}")
    tol = check_number("tol", tol, positive=True)
    batch_size = check_int("batch_size", batch_size, min=1)
    ctrl = Controller(surrogate, target, units="raw", layers=layers, seed=seed)
    plans = [("llv", ctrl.schedule)]
    for kind in baselines:
        if kind == "random":
            # distinct seeded layers (a draw with replacement would repeat rows)
            picks = np.random.default_rng(seed).permutation(ctrl.layers)[:n_random]
            plans += [(f"random:{int(p)}", ctrl.baseline(f"single:{int(p)}")) for p in picks]
        else:
            plans.append((kind, ctrl.baseline(kind)))
    rows = []
    pool = ContextPool(model, prompts, batch_size=batch_size)  # built once for every schedule
    for name, sched in plans:
        row = {"strategy": name or sched.strategy, "layers": sched.layers}
        try:
            cal = calibrate(model, pool, sched, target, tol=tol, batch_size=batch_size)
            row.update(
                energy=cal.schedule.energy,
                raw_energy=cal.schedule.raw_energy,
                measured_shift=cal.measured_shift,
                multiplier=cal.multiplier,
                evaluations=cal.evaluations,
            )
        except UnreachableTargetError as exc:
            row.update(
                energy=math.inf,
                raw_energy=math.inf,
                measured_shift=math.nan,
                multiplier=math.nan,
                evaluations=0,
                error=str(exc),
            )
        rows.append(row)
    e_llv = rows[0]["energy"]
    randoms = [r for r in rows if r["strategy"].startswith("random")]
    if len(randoms) > 1:
        med = sorted(randoms, key=lambda r: r["energy"])[len(randoms) // 2]
        rows.append(dict(med, strategy=f"random (median of {len(randoms)})"))
    for r in rows:
        r["ratio_to_llv"] = r["energy"] / e_llv if e_llv > 0 else math.nan
        r["raw_ratio_to_llv"] = r["raw_energy"] / rows[0]["raw_energy"]
    return rows


__all__ = ["Calibration", "calibrate", "compare_energy", "measure_shift"]
