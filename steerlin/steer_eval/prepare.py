"""How each kind of strategy is prepared before the held-out evaluation (`PREPARE`, keyed by
`Strategy.kind`): a computed shape calibrated in the regime of use to each ±t ("calibrated"),
the searched grid's best point ("searched"), or an instruction alone ("prompt"). Each returns
its own cost ({"<|t|>": cost} or {"search": cost}) and the search it ran, if any."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..energy import Metric
from ..errors import UnreachableTargetError
from ..measure import calibrate
from .cost import Cost
from .evaluate import Evaluation
from .search import search_grid
from .strategies import F64, Strategy, strategy_shape


@dataclass
class Inputs:
    """What preparing a strategy is given (see `steer_eval`'s arguments)."""

    model: object
    directions: object
    readout: Callable
    h: torch.Tensor
    kl: Metric
    exact_gains: object
    separation: float
    strengths: Sequence[float]
    schedule_factory: Callable
    cal_stems: list[str]
    cal_cont: object  # the unsteered calibration continuations, generated once
    cal_base: Cost  # what generating them cost (part of every calibrated strategy's cost)
    calibration_tokens: int
    max_new_tokens: int
    search_coefs: Sequence[float]
    log: Callable
    partial: Callable  # checkpoint of the run so far (the search's progress as an argument)


def calibrated(ev: Evaluation, s: Strategy, x: Inputs) -> tuple[dict, None]:
    """The strategy's shape sized to ±t separations by calibration, then evaluated."""
    name, model = s.name, x.model
    shape = strategy_shape(
        s.shape_of or name, x.h, kl=x.kl, directions=x.directions, exact=x.exact_gains
    )
    costs: dict[str, dict] = {}
    for t in x.strengths:
        cost = Cost() + x.cal_base
        for sign in (+1, -1):
            tt = sign * t
            target = tt * x.separation
            sched = x.schedule_factory(target * shape, f"{name} {tt:+g}")
            row = {"strategy": name, "t": tt, "layers": sched.layers}
            try:
                with cost.measure(model):
                    cal = calibrate(
                        model,
                        x.cal_cont,
                        sched,
                        target,
                        units="raw",
                        readout=x.readout,
                        positions="generated",
                        n_tokens=x.calibration_tokens,
                    )
            except UnreachableTargetError as exc:
                row.update(error=str(exc))
                ev.rows.append(row)
                x.log(f"  {name:>10} {tt:+.2g}: unreachable ({exc})")
                continue
            row.update(
                multiplier=cal.multiplier,
                measured_shift=cal.measured_shift,
                evaluations=cal.evaluations,
            )
            prefix = ev.setting.instructions[0 if sign > 0 else 1] if s.prompted else None
            ev.evaluate(row, cal.schedule, f"{name} {tt:+g}", prefix)
        costs[f"{t:g}"] = cost.to_dict()
    return costs, None


def searched(ev: Evaluation, s: Strategy, x: Inputs) -> tuple[dict, dict]:
    """`search_grid` on the calibration stems; its best point evaluated at ±its coefficient."""
    name, L = s.name, x.h.shape[0]
    cost = Cost()
    with cost.measure(x.model):
        search = search_grid(
            x.model,
            x.directions,
            x.cal_stems,
            ev.judge,
            schedule_factory=x.schedule_factory,
            coefs=x.search_coefs,
            max_new_tokens=x.max_new_tokens,
            log=x.log,
            checkpoint=x.partial,
        )
    best = search["best"]
    if best is None:
        ev.rows.append({"strategy": name, "t": 1.0, "error": "no grid point kept ppl"})
        ev.rows.append({"strategy": name, "t": -1.0, "error": "no grid point kept ppl"})
        return {"search": cost.to_dict()}, search
    shape = torch.zeros(L, dtype=F64)
    per_c = torch.tensor(search["amplitudes_per_coef"], dtype=F64)
    shape[best["layers"]] = per_c[best["layers"]]
    for sign in (1, -1):
        c = sign * best["coef"]
        sched = x.schedule_factory(c * shape, f"searched {c:+g}")
        row = {"strategy": name, "t": c, "layers": sched.layers, "choice": best["choice"]}
        row.update(multiplier=best["coef"], measured_shift=float("nan"))
        ev.evaluate(row, sched, f"{name} {c:+g}")
    return {"search": cost.to_dict()}, search


def prompt(ev: Evaluation, s: Strategy, x: Inputs) -> tuple[dict, None]:
    """No steering: the setting's instruction before each stem, at +1 and −1."""
    for sign in (1, -1):
        prefix = ev.setting.instructions[0 if sign > 0 else 1]
        ev.evaluate({"strategy": s.name, "t": float(sign)}, None, f"{s.name} {sign:+d}", prefix)
    return {"1": Cost().to_dict()}, None


PREPARE: dict[str, Callable[[Evaluation, Strategy, Inputs], tuple[dict, dict | None]]] = {
    "calibrated": calibrated,
    "searched": searched,
    "prompt": prompt,
}
