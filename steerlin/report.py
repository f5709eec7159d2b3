"""Reporting helpers shared by the CLI, the experiments and the benchmarks: tables, JSON,
versions, timers.

One copy of each: `md_table` (markdown) and `text_table` (aligned plain text) render row dicts,
`columns` says how each table column is shown (`HEADERS`, one place for every table),
`jsonable` turns results into plain JSON types, `read_json` reads a JSON object with a clear
error, `versions` records what produced a result and `Timer` accumulates wall-clock seconds per
named step.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import FileFormatError

# ------------------------------------------------------------------------------------ timers


@dataclass
class Timer:
    """Wall-clock seconds per named step: `with timer("fit"): ...` adds to seconds["fit"]."""

    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


# ------------------------------------------------------------------------------------ versions


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover
        return "?"


def versions() -> dict[str, str]:
    """Versions of what produced a result (and the torch thread count it ran with)."""
    from . import __version__

    return {
        "steerlin": __version__,
        "torch": torch.__version__,
        "transformer_lens": _dist_version("transformer-lens"),
        "transformers": _dist_version("transformers"),
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
    }


# ------------------------------------------------------------------------------------ JSON


def jsonable(obj: Any) -> Any:
    """Plain JSON types: tensors/arrays to lists, non-finite floats to "inf"/"-inf"/"nan"."""
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else str(v)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def read_json(path: str | Path, what: str, *, error: type[Exception] = FileFormatError) -> dict:
    """The JSON object in `path`; `error` naming `what` if missing, unreadable or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise error(f"missing {what} {path.name} ({str(path)!r} not found)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"unreadable {what} {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{what} {path.name} is not a JSON object")
    return data


# ------------------------------------------------------------------------------------ tables


def layers_str(layers: Iterable[int]) -> str:
    """[2, 3, 4, 7] -> "2-4,7"."""
    xs = sorted(int(x) for x in layers)
    if not xs:
        return "-"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(out)


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if isinstance(v, (list, tuple)):
        return layers_str(v)
    try:
        return format(v, spec) if spec else str(v)
    except (TypeError, ValueError):
        return str(v)


def md_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join(_fmt(r.get(k), f).replace("|", "\\|") for k, _, f in columns) + " |"
        for r in rows
    ]
    return "\n".join([head, sep, *body])


#: how a column is shown wherever a table has it: key -> (header, format spec); `columns`
#: reads it (a table that shows a key otherwise passes its own (key, header, format))
HEADERS: dict[str, tuple[str, str]] = {
    "task": ("task", ""),
    "readout": ("readout", ""),
    "basis": ("basis", ""),
    "d": ("d", ""),
    "eps": ("ε", "g"),
    "variant": ("gains", ""),
    "model": ("model", ""),
    "params": ("params", ",d"),
    "n_layers": ("L", ""),
    "layer": ("layer", ""),
    "layers": ("layers", ""),
    "strategy": ("strategy", ""),
    "gain": ("gain", ".4g"),
    "energy": ("energy Σu²", ".4g"),
    "ratio_to_llv": ("ratio to LLV", ".3g"),
    "raw_energy": ("raw energy", ".4g"),
    "raw_ratio_to_llv": ("raw ratio", ".3g"),
    "predicted_shift": ("predicted shift", ".4g"),
    "measured_shift": ("measured shift", ".4g"),
    "multiplier": ("multiplier", ".4g"),
    "evaluations": ("evals", ""),
    "spearman_raw": ("Spearman raw", ".3f"),
    "pearson_raw": ("Pearson raw", ".3f"),
    "error": ("error", ""),
    # the fidelity scores of `steerlin.metrics.Fidelity.as_dict` (`fidelity_columns`)
    "raw_spearman": ("Spearman raw", ".3f"),
    "raw_pearson": ("Pearson raw", ".3f"),
    "null_identity_raw_spearman": ("null identity, raw", ".3f"),
    "rel_err_median": ("rel. err. (median)", ".3f"),
    "spearman": ("Spearman norm-rel.", ".3f"),
    "null_scale_spearman": ("null scale, norm-rel.", ".3f"),
}
#: the fidelity score columns in table order: raw units first (the headline), the identity
#: null, the median error, norm-relative units, the scale null
FIDELITY_KEYS = (
    "raw_spearman raw_pearson null_identity_raw_spearman rel_err_median spearman "
    "null_scale_spearman"
).split()


def columns(*spec: str | tuple[str, str, str]) -> list[tuple[str, str, str]]:
    """`md_table` columns (key, header, format): a string names keys (space-separated) shown
    as `HEADERS` says; a (key, header, format) tuple is taken as it is."""
    out = []
    for item in spec:
        if isinstance(item, tuple):
            out.append(item)
        else:
            out += [(k, *HEADERS[k]) for k in item.split()]
    return out


def fidelity_columns(prefix: str = "") -> list[tuple[str, str, str]]:
    """The fidelity score columns (`FIDELITY_KEYS`), keys prefixed (e.g. "e2e_")."""
    return [(prefix + k, *HEADERS[k]) for k in FIDELITY_KEYS]


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of dict rows (floats to 4 significant digits), for terminals."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    columns = list(columns)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                return str(v)
            if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
                return f"{v:.3e}"
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, sep, *body])


__all__ = [
    "HEADERS",
    "Timer",
    "columns",
    "fidelity_columns",
    "jsonable",
    "layers_str",
    "md_table",
    "read_json",
    "text_table",
    "versions",
]
