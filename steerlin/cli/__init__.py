"""The `steerlin` command: demo, fit, scan, control, generate, reproduce, scaling, ablate,
steer-eval.

One module per subcommand (`steerlin.cli.fit` ...: `cmd_<name>` and its `register(add)`, which
adds the subcommand's parser with `add(name, func, help, description)`), shared pieces in
`steerlin.cli.common`, `options` (option groups) and `steps` (steps several subcommands share).

Every subcommand writes `results.json` (every number, the configuration, versions and
timings) and `results.md` (the same as markdown tables) into its output folder, plus its
files and figures. An existing non-empty output folder is never overwritten silently: the
run goes to `DIR-1`, `DIR-2`, ... instead (and says so), unless `--overwrite` is given.

Models are resolved by `resolve_model`, tasks by `resolve_task` and text prompts turned into
model inputs by `encode_prompts`: three seams, attributes of this package, that tests replace
(a tiny random model with token-id prompts) without any special model names in the command
line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from ..errors import SteerlinError
from ..loading import DEFAULT_MODEL
from ..report import jsonable, md_table
from . import ablate, control, demo, fit, generate, reproduce, scaling, scan, steer_eval
from .common import (
    CliError,
    Run,
    encode_prompts,
    parse_layers,
    prepare_out,
    resolve_model,
    resolve_task,
)
from .options import _common

SUBCOMMANDS = (demo, fit, scan, control, generate, reproduce, scaling, ablate, steer_eval)


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="steerlin",
        description="Predict per-layer steering gains with a low-order linear (LLV) surrogate "
        "of a transformer's depth dynamics and compute minimum-energy steering schedules "
        "(arXiv 2603.12541).",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_, description=None):
        p = sub.add_parser(name, parents=[common], help=help_, description=description or help_)
        p.set_defaults(func=func)
        return p

    for module in SUBCOMMANDS:
        module.register(add)
    return parser


def _version() -> str:
    try:
        from .. import __version__

        return f"steerlin {__version__}"
    except ImportError:  # pragma: no cover
        return "steerlin"


def _resolve_progress(args) -> None:
    """Neither --progress nor --no-progress: bars only where someone watches them (stderr is a
    terminal), so a log file redirected from a run holds no bar redraws."""
    if getattr(args, "progress", False) is None:
        args.progress = sys.stderr.isatty()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `steerlin` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _resolve_progress(args)
    try:
        return int(args.func(args) or 0)
    except SteerlinError as exc:
        print(f"steerlin {args.command}: error: {exc}", file=sys.stderr)
        return 2


__all__ = [
    "DEFAULT_MODEL",
    "CliError",
    "Run",
    "build_parser",
    "encode_prompts",
    "jsonable",
    "main",
    "md_table",
    "parse_layers",
    "prepare_out",
    "resolve_model",
    "resolve_task",
]
