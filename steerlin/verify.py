"""The full model checks the minimum-energy claim: `compare_energy` calibrates the least-norm
schedule and the baselines to the same measured shift (`steerlin.measure.calibrate`) and
reports their energies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .backend import Model
from .control import Controller
from .errors import InputError, UnreachableTargetError
from .frozen import ContextPool
from .measure import TOL, Calibration, calibrate, measure_shift, raw_target  # noqa: F401
from .tokens import PromptsLike
from .validate import check_int, check_number


def compare_energy(
    model: Model,
    prompts: PromptsLike,
    surrogate,
    target: float,
    *,
    units: str | None = None,
    baselines: Sequence[str] = ("uniform", "last", "random"),
    n_random: int = 5,
    layers: Sequence[int] | None = None,
    tol: float = TOL,
    batch_size: int = 16,
    seed: int = 0,
) -> list[dict]:
    """Calibrate the minimum-energy (LLV) schedule and the baselines on the full model.

    Returns one row per strategy: strategy, energy (Σu², norm-relative: the headline),
    ratio_to_llv, raw_energy, measured_shift, multiplier, evaluations, layers; "random" gives
    `n_random` seeded draws and a median row. A strategy that cannot reach the target keeps
    its row with energy = inf and the error message.

    units: "raw" (readout units) or "separations" (class separations of the surrogate's
    readout, stored at fit time). Not given: raw, as before, with a DeprecationWarning when
    the surrogate knows its separation (the default becomes "separations" in the next
    release). The rows' `measured_shift` is raw.
    """
    from .targets import separation_info

    n_random = check_int("n_random", n_random, min=0)
    if isinstance(baselines, str) or not isinstance(baselines, Sequence):
        raise InputError(f"baselines: expected a list of baseline names, got {baselines!r}")
    for b in baselines:
        if not isinstance(b, str):
            raise InputError(f"baselines: expected names such as 'uniform', got {b!r}")
    tol = check_number("tol", tol, positive=True)
    batch_size = check_int("batch_size", batch_size, min=1)
    if isinstance(target, str):  # a label name: ±1 class separation, whatever units says
        ctrl = Controller(surrogate, target, layers=layers, seed=seed)
    else:
        sep = separation_info(getattr(surrogate, "meta", None) or {})[0]
        target = raw_target(check_number("target", target), units, sep, "compare_energy")
        ctrl = Controller(surrogate, target, units="raw", layers=layers, seed=seed)
    target = float(ctrl.target[0])
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
            cal = calibrate(model, pool, sched, target, units="raw", tol=tol, batch_size=batch_size)
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


__all__ = ["compare_energy"]
