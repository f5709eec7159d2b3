"""Shared pieces of the `steerlin` subcommands: seams, constants, output folders, the `Run`
record of one command, and value parsers.

Models are resolved by `resolve_model`, tasks by `resolve_task` and text prompts turned into
model inputs by `encode_prompts`: three seams that tests replace (a tiny random model with
token-id prompts) without any special model names in the command line. The seams are
attributes of the `steerlin.cli` package (re-exported from here), looked up there at call
time, so `monkeypatch.setattr(steerlin.cli, "resolve_model", ...)` reaches every subcommand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import SteerlinError
from ..report import Timer, columns, fidelity_columns, jsonable, md_table, versions

DATA_ENV = "STEERLIN_DATA_DIR"
DEMO_TASKS = ("demo", "sst2-demo")
DEMO_PROMPTS = (
    "The movie was",
    "I think this film",
    "Last night we went to see",
    "My review of the new season:",
    "The food at that restaurant",
)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class CliError(SteerlinError):
    """A command-line usage problem (bad option value, missing file from an earlier step)."""


# =============================================================================================
# seams: model, task and prompt resolution (tests replace these)
# =============================================================================================


def resolve_model(
    name: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
):
    """The model for a model name (steerlin.load_model)."""
    from ..loading import load_model

    return load_model(name, device=device, dtype=dtype, cache_dir=cache_dir)


def resolve_task(name: str, *, data_dir: str | None = None, template: str = "{text}"):
    """A Task: "demo" is the SST-2 sample shipped with steerlin, anything else goes to
    steerlin.load_task (local copy in `data_dir`, else Hugging Face)."""
    from ..data import load_demo_task, load_task

    if name.strip().lower() in DEMO_TASKS:
        return load_demo_task(template)
    return load_task(name, data_dir=data_dir, template=template)


def encode_prompts(model, texts: Sequence[str]) -> list:
    """Model inputs for text prompts: the texts themselves (the library tokenizes them)."""
    return list(texts)


def seam(name: str) -> Callable:
    """The current `steerlin.cli.<name>` (resolve_model, resolve_task or encode_prompts)."""
    return getattr(sys.modules[__package__], name)


# =============================================================================================
# output folders, results files, tables
# =============================================================================================


def prepare_out(path: str | Path, *, overwrite: bool = False, say=print) -> Path:
    """The folder to write into: `path`, or `path-1`, `path-2`, ... if it exists non-empty.

    With `overwrite`, `path` is reused as is (files of the same name are replaced).
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise CliError(f"--out: {str(p)!r} exists and is not a folder")

    def free(q: Path) -> bool:
        return not q.exists() or (q.is_dir() and not any(q.iterdir()))

    if overwrite or free(p):
        p.mkdir(parents=True, exist_ok=True)
        return p
    i = 1
    while not free(p.with_name(f"{p.name}-{i}")):
        i += 1
    q = p.with_name(f"{p.name}-{i}")
    q.mkdir(parents=True, exist_ok=True)
    say(f"note: {p} exists and is not empty; writing to {q} instead (--overwrite to reuse it)")
    return q


def parse_layers(text: str | None, n_layers: int | None = None) -> list[int] | None:
    """ "2-17" or "0,3,5" or "2-5,9" -> sorted layer list (None stays None)."""
    if text is None:
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise CliError(f"--layers: expected e.g. '2-17' or '0,3,5', got {text!r}") from None
    if not out:
        raise CliError(f"--layers: no layers in {text!r}")
    if n_layers is not None and max(out) >= n_layers:
        raise CliError(f"--layers: the model has layers 0..{n_layers - 1}, got {max(out)}")
    return sorted(out)


def _csv(text: str, conv: Callable = str, what: str = "list") -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CliError(f"{what}: expected a comma-separated list, got {text!r}")
    try:
        return [conv(t) for t in items]
    except ValueError:
        raise CliError(f"{what}: could not read {text!r}") from None


# Headline first: raw units (both curves / scale_l), then the nulls on the same curves, then
# norm-relative units (which the scale-only null already scores highly), then the reduction
# error against exact gains on the operating split where it was measured.
FIDELITY_COLUMNS = (
    columns("task readout basis d variant")
    + fidelity_columns("e2e_")
    + [
        ("red_raw_spearman", "vs exact (operating): raw Spearman", ".3f"),
        ("red_rel_err_median", "vs exact: rel. err.", ".3f"),
    ]
)
ENERGY_COLUMNS = columns(
    "strategy layers energy ratio_to_llv raw_energy measured_shift multiplier evaluations"
)


class Run:
    """One command's output folder, timings, numbers and markdown; `finish()` writes both
    results files."""

    def __init__(self, args: argparse.Namespace, command: str, default_out: str | Path):
        self.command = command
        self.out = prepare_out(args.out or default_out, overwrite=args.overwrite)
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.results: dict[str, Any] = {}
        self.config = {k: v for k, v in vars(args).items() if k != "func"}
        self.md: list[str] = [f"# steerlin {command}\n"]
        print(f"steerlin {command}: writing to {self.out}/")

    def timed(self, name: str):
        """Context manager adding its wall-clock seconds to timings[name]."""
        return Timer(self.timings)(name)

    def say(self, text: str = "", *, md: bool = True) -> None:
        print(text, flush=True)
        if md:
            self.md.append(text + "\n")

    def table(self, title: str, rows: Sequence[dict], columns) -> str:
        text = md_table(rows, columns)
        print(f"\n## {title}\n\n{text}\n", flush=True)
        self.md.append(f"## {title}\n\n{text}\n")
        return text

    def path(self, name: str) -> Path:
        return self.out / name

    def finish(self, **results) -> int:
        """Add `results`, write results.json and results.md; the command's exit status (0)."""
        self.results.update(results)
        self.timings["total"] = time.perf_counter() - self.t0
        doc = {
            "command": self.command,
            "config": self.config,
            "versions": versions(),
            "timings": self.timings,
            "results": self.results,
        }
        self.path("results.json").write_text(json.dumps(jsonable(doc), indent=2) + "\n")
        times = [{"step": k, "seconds": v} for k, v in self.timings.items()]
        self.md.append(
            "## Timings\n\n"
            + md_table(times, [("step", "step", ""), ("seconds", "seconds", ".1f")])
        )
        self.path("results.md").write_text("\n".join(self.md) + "\n")
        print(
            f"\nwrote {self.path('results.json')} and results.md "
            f"({self.timings['total']:.1f} s in total)"
        )
        return 0
