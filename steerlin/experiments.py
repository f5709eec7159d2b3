"""The paper's experiments as functions: one task -> directions, surrogates, scans, fidelity.

Used by the CLI, the examples and the benchmarks, so every table is produced the same way:
`fit_surrogates` and `scan_eps` are the fit and scan loops (one surrogate per basis and order,
one full-model scan per step ε), `run_fidelity` chains them for one task into a `TaskRun`,
whose `table()` is the fidelity table (norm-relative and raw units); `separation` is the
readout's class-mean separation that energy targets are fractions of.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .directions import ConceptDirections
from .gains import exact_gains, scan_gains
from .metrics import fidelity
from .readouts import make_readout
from .report import Timer, versions
from .surrogate import Surrogate
from .trajectory import capture


@dataclass
class TaskRun:
    """Everything one fidelity run measured, on one task and one split seed.

    Two references, two errors (docs/method.md):
      reduction  surrogate vs `exact_gains` on the operating split it was fitted on: what the
                 reduction loses (no ε, no split noise);
      end-to-end surrogate vs the ±ε scan on the disjoint eval split (the paper's metric),
                 beside its ceiling: exact gains on the operating split vs the same scan.
    Every score comes with the two null models (scale-only, identity-Jacobian).
    """

    task: str
    directions: ConceptDirections
    surrogates: dict[str, Surrogate]
    measured: dict[str, torch.Tensor]
    exact: dict[str, torch.Tensor]
    exact_eval: dict[str, torch.Tensor]
    timings: dict[str, float]
    config: dict[str, Any]

    def surrogate(
        self, readout: str = "concept", basis: str | None = None, d: int | None = None
    ) -> Surrogate:
        """The fitted surrogate for `readout` (and `basis`, `d` when given; the first fitted
        one otherwise), without knowing how the keys of `surrogates` are spelled."""
        for s in self.surrogates.values():
            if s.meta["readout"]["kind"] != readout:
                continue
            if basis is not None and s.meta["basis"] != basis:
                continue
            if d is not None and s.d != int(d):
                continue
            return s
        have = sorted(
            f"{s.meta['basis']}/{s.meta['readout']['kind']}/d={s.d}"
            for s in self.surrogates.values()
        )
        raise KeyError(f"no surrogate for readout={readout!r} basis={basis!r} d={d!r}; have {have}")

    def _fid(self, pred, meas, identity):
        return fidelity(pred, meas, scale=self.directions.scale[:-1], identity=identity)

    def table(self) -> list[dict[str, Any]]:
        """One row per (readout, basis, d, variant), plus rows for exact gains.

        Columns: e2e_* (vs the eval scan), red_* (vs exact gains on the operating split, when
        `exact` has that readout), and the nulls' scores against the same references
        (…_null_scale_*, …_null_identity_*). Exact-gain rows: "exact (operating)" vs the scan
        is the end-to-end ceiling; "exact (eval)" vs the scan is the model's non-linearity at
        ε; split_* compares the two exact curves (split noise).
        """
        rows = []
        for key, s in self.surrogates.items():
            rd = s.meta["readout"]["kind"]
            # a "paper"-variant surrogate stores the paper gains only (its `gains` are those)
            variants = [("per-prompt", s.gains)] if s.variant == "per-prompt" else []
            for variant, g in variants + [("paper", s.gains_paper)]:
                row = {
                    "task": self.task,
                    "seed": self.config.get("seed"),
                    "readout": rd,
                    "basis": s.meta["basis"],
                    "d": s.d,
                    "variant": variant,
                    "key": key,
                }
                if rd in self.measured:
                    e2e = self._fid(g, self.measured[rd], s.gains_identity).as_dict()
                    row.update({f"e2e_{k}": v for k, v in e2e.items()})
                if rd in self.exact:
                    red = self._fid(g, self.exact[rd], s.gains_identity).as_dict()
                    row.update({f"red_{k}": v for k, v in red.items()})
                rows.append(row)
        for name, curves in (("exact (operating)", self.exact), ("exact (eval)", self.exact_eval)):
            for rd, g in curves.items():
                if rd not in self.measured:
                    continue
                row = {
                    "task": self.task,
                    "seed": self.config.get("seed"),
                    "readout": rd,
                    "basis": "-",
                    "d": None,
                    "variant": name,
                    "key": f"{name}/{rd}",
                }
                row.update(
                    {
                        f"e2e_{k}": v
                        for k, v in self._fid(g, self.measured[rd], None).as_dict().items()
                    }
                )
                if name == "exact (operating)" and rd in self.exact_eval:
                    split = self._fid(g, self.exact_eval[rd], None).as_dict()
                    row.update({f"split_{k}": v for k, v in split.items()})
                rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "config": self.config,
            "timings": self.timings,
            "fidelity": self.table(),
            "measured_gains": {k: v.tolist() for k, v in self.measured.items()},
            "exact_gains_operating": {k: v.tolist() for k, v in self.exact.items()},
            "exact_gains_eval": {k: v.tolist() for k, v in self.exact_eval.items()},
            "predicted_gains": {
                k: {
                    "per-prompt": s.gains.tolist(),
                    "paper": s.gains_paper.tolist(),
                    "identity_null": None
                    if s.gains_identity is None
                    else s.gains_identity.tolist(),
                    "hankel": None if s.hankel is None else s.hankel.tolist(),
                }
                for k, s in self.surrogates.items()
            },
            "scale": self.directions.scale.tolist(),
        }


def fit_surrogates(
    model,
    prompts,
    directions: ConceptDirections,
    configs: Sequence[tuple[str, int]],
    *,
    readout: str = "concept",
    label_words: Sequence[str] | Sequence[int] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    timer: Timer | None = None,
    say=None,
) -> dict[tuple[str, int], Surrogate]:
    """One Surrogate per (basis, d) in `configs`, all fitted on `prompts` (timed per basis)."""
    timer = timer if timer is not None else Timer()
    out: dict[tuple[str, int], Surrogate] = {}
    by_basis: dict[str, list[int]] = {}
    for basis, d in configs:
        by_basis.setdefault(basis, []).append(int(d))
    for basis, ds in by_basis.items():
        if say is not None:
            say(f"fit: basis {basis}, d = {', '.join(map(str, sorted(set(ds))))}")
        with timer(f"fit/{basis}/{readout}"):
            fits = Surrogate.fit_orders(
                model,
                list(prompts),
                directions,
                orders=ds,
                basis=basis,
                readout=readout,
                label_words=label_words,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
            )
        out.update({(basis, d): s for d, s in fits.items()})
    return out


def scan_eps(
    model,
    prompts,
    directions: ConceptDirections,
    epss: Sequence[float],
    *,
    readout: str = "concept",
    label_words: Sequence[str] | Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    timer: Timer | None = None,
    say=None,
) -> dict[float, torch.Tensor]:
    """Full-model gain scans (cached path) of `prompts`, one per step ε in `epss`."""
    timer = timer if timer is not None else Timer()
    out: dict[float, torch.Tensor] = {}
    for eps in epss:
        if say is not None:
            say(f"scan: ε = {eps:g}")
        with timer(f"scan/{readout}"):
            out[eps] = scan_gains(
                model,
                list(prompts),
                directions,
                eps=eps,
                readout=readout,
                label_words=label_words,
                batch_size=batch_size,
                progress=progress,
            )
    return out


def separation(
    model,
    prompts,
    labels,
    directions: ConceptDirections,
    *,
    readout: str = "concept",
    label_words: Sequence[str] | Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, float]:
    """Class means of the readout on clean prompts, and half their difference (the default
    target): 0.5 * (mean y | label 1 - mean y | label 0)."""
    traj = capture(model, prompts, batch_size=batch_size, progress=progress)
    rd = make_readout(model, readout, directions.unit[-1], label_words=label_words)
    y = rd(model, traj.states[:, -1]).to(torch.float64)
    lab = torch.as_tensor(list(labels))
    m1, m0 = float(y[lab == 1].mean()), float(y[lab == 0].mean())
    return {
        "mean_label1": m1,
        "mean_label0": m0,
        "separation": m1 - m0,
        "half_separation": 0.5 * (m1 - m0),
    }


def run_fidelity(
    model,
    splits,
    *,
    task: str = "task",
    d: int | Sequence[int] = 8,
    bases: Sequence[str] = ("two-sided",),
    readouts: Sequence[str] = ("concept",),
    eps: float = 0.1,
    label_words: Sequence[str] | Sequence[int] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    exact_eval: bool = True,
    progress: bool = True,
    label_names: Sequence[str] | None = None,
) -> TaskRun:
    """Directions on splits.concept; surrogates (every basis and d) and exact gains on
    splits.operating; the ±ε scan (and, with exact_eval, exact gains: the split-noise check)
    on splits.eval. All three splits are disjoint."""
    timer = Timer()
    ds = [int(d)] if isinstance(d, int) else [int(x) for x in d]
    with timer("directions"):
        dirs = ConceptDirections.fit(
            model,
            list(splits.concept.texts),
            list(splits.concept.labels),
            batch_size=batch_size,
            label_names=label_names,
        )
    surrogates, measured, exact_op, exact_ev = {}, {}, {}, {}
    ops = list(splits.operating.texts)
    ev = list(splits.eval.texts)
    for rd in readouts:
        lw = label_words if rd == "logits" else None
        fits = fit_surrogates(
            model,
            ops,
            dirs,
            [(basis, dd) for basis in bases for dd in ds],
            readout=rd,
            label_words=lw,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            timer=timer,
        )
        # keys "basis/readout", with "/d" when several orders are fitted
        surrogates.update(
            {
                f"{basis}/{rd}" + (f"/{dd}" if len(ds) > 1 else ""): s
                for (basis, dd), s in fits.items()
            }
        )
        with timer(f"exact/{rd}"):
            exact_op[rd] = exact_gains(
                model, ops, dirs, readout=rd, label_words=lw, batch_size=batch_size
            )
        measured[rd] = scan_eps(
            model,
            ev,
            dirs,
            [eps],
            readout=rd,
            label_words=lw,
            batch_size=batch_size,
            progress=progress,
            timer=timer,
        )[eps]
        if exact_eval:
            with timer(f"exact_eval/{rd}"):
                exact_ev[rd] = exact_gains(
                    model, ev, dirs, readout=rd, label_words=lw, batch_size=batch_size
                )
    config = {
        "task": task,
        "model": model.cfg.model_name,
        "n_layers": model.cfg.n_layers,
        "d": ds,
        "bases": list(bases),
        "readouts": list(readouts),
        "eps": eps,
        "label_words": list(label_words) if label_words else None,
        "n_concept": len(splits.concept),
        "n_operating": len(splits.operating),
        "n_eval": len(splits.eval),
        "seed": seed,
        "versions": versions(),
    }
    return TaskRun(task, dirs, surrogates, measured, exact_op, exact_ev, timer.seconds, config)


__all__ = [
    "TaskRun",
    "Timer",
    "fit_surrogates",
    "run_fidelity",
    "scan_eps",
    "separation",
    "versions",
]
