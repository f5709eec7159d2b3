"""The paper's experiments as functions: one task -> directions, surrogate, scans, fidelity.

Used by the CLI, the examples and the benchmarks, so every table is produced the same way.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .directions import ConceptDirections
from .evaluate import exact_gains, fidelity, scan_gains
from .surrogate import Surrogate


@dataclass
class Timer:
    """Wall-clock seconds per named step."""

    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


def versions() -> dict[str, str]:
    """Versions of what produced a result."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        tl_version = version("transformer-lens")
    except PackageNotFoundError:  # pragma: no cover
        tl_version = "?"

    return {
        "steerlin": __version__,
        "torch": torch.__version__,
        "transformer_lens": tl_version,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
    }


@dataclass
class TaskRun:
    """Everything one fidelity run measured."""

    task: str
    directions: ConceptDirections
    surrogates: dict[str, Surrogate]
    measured: dict[str, torch.Tensor]
    exact: dict[str, torch.Tensor]
    timings: dict[str, float]
    config: dict[str, Any]

    def table(self) -> list[dict[str, Any]]:
        """Rows: readout, variant, basis, Spearman/Pearson vs the scan; plus exact gains rows.

        `spearman`/`pearson` compare gains per unit of norm-relative amplitude (steerlin's
        units); `spearman_raw`/`pearson_raw` compare gains per unit-norm raw vector (divided by
        scale_l), which removes the common growth of ‖x_l‖ with depth and is a harder test.
        """
        scale = self.directions.scale[:-1].to(torch.float64)

        def both(pred, meas) -> dict[str, float]:
            f, fr = fidelity(pred, meas), fidelity(pred / scale, meas / scale)
            return {
                "spearman": f.spearman,
                "pearson": f.pearson,
                "spearman_raw": fr.spearman,
                "pearson_raw": fr.pearson,
            }

        rows = []
        for key, s in self.surrogates.items():
            rd = s.meta["readout"]["kind"]
            for variant, g in (("per-prompt", s.gains), ("paper", s.gains_paper)):
                if s.variant != variant and s.meta.get("report_both") is False:
                    continue
                rows.append(
                    {
                        "task": self.task,
                        "readout": rd,
                        "basis": s.meta["basis"],
                        "d": s.d,
                        "variant": variant,
                        **both(g, self.measured[rd]),
                        "key": key,
                    }
                )
        for rd, g in self.exact.items():
            rows.append(
                {
                    "task": self.task,
                    "readout": rd,
                    "basis": "-",
                    "d": None,
                    "variant": "exact_gains",
                    **both(g, self.measured[rd]),
                    "key": f"exact/{rd}",
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "config": self.config,
            "timings": self.timings,
            "fidelity": self.table(),
            "measured_gains": {k: v.tolist() for k, v in self.measured.items()},
            "exact_gains": {k: v.tolist() for k, v in self.exact.items()},
            "predicted_gains": {
                k: {"per-prompt": s.gains.tolist(), "paper": s.gains_paper.tolist()}
                for k, s in self.surrogates.items()
            },
            "scale": self.directions.scale.tolist(),
        }


def run_fidelity(
    model,
    splits,
    *,
    task: str = "task",
    d: int = 32,
    bases: Sequence[str] = ("krylov",),
    readouts: Sequence[str] = ("concept",),
    eps: float = 0.1,
    label_words: Sequence[str] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    exact: bool = True,
    progress: bool = True,
) -> TaskRun:
    """Directions on splits.concept, surrogates on splits.operating, full-model scans and exact
    gains on splits.eval (all disjoint), for each basis and readout."""
    timer = Timer()
    with timer("directions"):
        dirs = ConceptDirections.fit(
            model, list(splits.concept.texts), list(splits.concept.labels), batch_size=batch_size
        )
    surrogates, measured, exact_g = {}, {}, {}
    ops = list(splits.operating.texts)
    ev = list(splits.eval.texts)
    for rd in readouts:
        lw = label_words if rd == "logits" else None
        for basis in bases:
            with timer(f"fit/{basis}/{rd}"):
                surrogates[f"{basis}/{rd}"] = Surrogate.fit(
                    model,
                    ops,
                    dirs,
                    d=d,
                    basis=basis,
                    readout=rd,
                    label_words=lw,
                    batch_size=batch_size,
                    seed=seed,
                    progress=progress,
                )
        with timer(f"scan/{rd}"):
            measured[rd] = scan_gains(
                model,
                ev,
                dirs,
                eps=eps,
                readout=rd,
                label_words=lw,
                batch_size=batch_size,
                progress=progress,
            )
        if exact:
            with timer(f"exact/{rd}"):
                exact_g[rd] = exact_gains(
                    model, ev, dirs, readout=rd, label_words=lw, batch_size=batch_size
                )
    config = {
        "task": task,
        "model": model.cfg.model_name,
        "d": d,
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
    return TaskRun(task, dirs, surrogates, measured, exact_g, timer.seconds, config)


__all__ = ["run_fidelity", "TaskRun", "Timer", "versions"]
