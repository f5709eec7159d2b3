"""Command-line options several subcommands share (argparse helpers)."""

from __future__ import annotations

import argparse

from ..loading import DEFAULT_MODEL
from ..surrogate import BASES, DEFAULT_BASIS, DEFAULT_D
from .common import DATA_ENV, DTYPES


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options")
    g.add_argument(
        "--model",
        default=None,
        help=f"model name (default: {DEFAULT_MODEL}, offline; for scan/control/"
        "generate: the model recorded by the earlier step)",
    )
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default: 1; measured fastest on 2-core machines)",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="where converted models are cached (default: $STEERLIN_CACHE or ~/.cache/steerlin)",
    )
    g.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="model dtype (default: float32, or the one recorded by fit)",
    )
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument("--seed", type=int, default=0, help="seed for splits and bases (default: 0)")
    g.add_argument(
        "--batch-size", type=_positive_int, default=16, help="prompts per batch (default: 16)"
    )
    g.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder (default per command; an existing non-empty folder is "
        "never overwritten: DIR-1, DIR-2, ... are used instead)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="write into --out even if it is not empty"
    )
    g.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="progress bars even when stderr is not a terminal (default: only on a terminal)",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def _sizes(p, n_concept=400, n_operating=200, n_eval=200) -> None:
    p.add_argument(
        "--n-concept",
        type=_positive_int,
        default=n_concept,
        help=f"concept-split prompts per class (default: {n_concept})",
    )
    p.add_argument(
        "--n-operating",
        type=_positive_int,
        default=n_operating,
        help=f"operating-split prompts per class (default: {n_operating})",
    )
    p.add_argument(
        "--n-eval",
        type=_positive_int,
        default=n_eval,
        help=f"eval-split prompts per class (default: {n_eval})",
    )


def _data(p, template=True) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        help=f"local task data folder (default: ${DATA_ENV}, else Hugging Face online)",
    )
    if template:
        p.add_argument(
            "--template", default="{text}", help="prompt template with {text} (default: '{text}')"
        )


def _energy_opts(p) -> None:
    p.add_argument(
        "--baselines",
        default="uniform,last,random",
        help="heuristic schedules to compare: uniform, last, random, single:<l> "
        "(default: uniform,last,random; '' for none)",
    )
    p.add_argument(
        "--n-random", type=_positive_int, default=5, help="random single-layer draws (default: 5)"
    )


def _basis(p) -> None:
    p.add_argument(
        "--basis",
        choices=BASES,
        default=DEFAULT_BASIS,
        help=f"reduction basis (default: {DEFAULT_BASIS})",
    )


def _order(p) -> None:
    """--d (one order) and --basis: the surrogate's reduction."""
    p.add_argument(
        "--d",
        type=_positive_int,
        default=DEFAULT_D,
        help=f"surrogate order (default: {DEFAULT_D}; d >= L+1 is no reduction)",
    )
    _basis(p)
