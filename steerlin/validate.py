"""Argument checks at the boundary: one checker per kind of input.

Every public entry point runs its arguments through these before any work (and before any
hook is added), so a bad value fails at once with a `SteerlinError` subclass whose message
names the argument, what was expected and what arrived, instead of being silently coerced
(`d=1.5` -> 1, `tol=nan`) or failing deep inside torch or TransformerLens.

Kinds of input and their checker:

    integers (d, n_tokens, batch_size, seed, ...)      check_int
    real numbers (tol, eps, strength, ...)             check_number
    one of a set of strings (basis, method, ...)       check_choice
    layer lists                                        check_layers
    steering targets (numbers, label names, tensors)   check_targets
    a fitted Surrogate                                 check_surrogate
    text prompts for generation                        check_text_prompts
    a logit readout's two tokens                       check_distinct_tokens
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import InputError, LayerError, ModelTypeError, ShapeError


def _show(value: Any) -> str:
    """A short description of what arrived: its repr, and its type when that says more."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = type(value).__name__
    if isinstance(value, bool | int | float | str) or value is None:
        return text
    return f"{text} ({kind})"


def _scalar(value: Any) -> Any:
    """A 0-d (or one-element numpy) tensor or numpy scalar -> its Python value; else as is."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 else value
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value
    if isinstance(value, np.generic):
        return value.item()
    return value


def check_int(name: str, value: Any, *, min: int | None = None, max: int | None = None) -> int:  # noqa: A002
    """An integer (Python, numpy or a 0-d integer tensor) within [min, max], as a Python int.

    Floats (even 4.0), strings, bools and None are refused: `d=1.5` or `d="4"` is a mistake
    to report, not a value to round.
    """
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise InputError(f"{name}: expected an integer, got {_show(value)}")
    v = int(v)
    if min is not None and v < min:
        raise InputError(f"{name}: expected >= {min}, got {v}")
    if max is not None and v > max:
        raise InputError(f"{name}: expected <= {max}, got {v}")
    return v


def check_number(
    name: str,
    value: Any,
    *,
    positive: bool = False,
    min: float | None = None,  # noqa: A002
    max: float | None = None,  # noqa: A002
    allow_inf: bool = False,
) -> float:
    """A finite real number (Python, numpy, 0-d tensor) as a float; `positive`: > 0."""
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise InputError(f"{name}: expected a real number, got {_show(value)}")
    v = float(v)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise InputError(f"{name}: expected a finite number, got {v}")
    if positive and not v > 0:
        raise InputError(f"{name}: expected a number > 0, got {v:g}")
    if min is not None and v < min:
        raise InputError(f"{name}: expected a number >= {min:g}, got {v:g}")
    if max is not None and v > max:
        raise InputError(f"{name}: expected a number <= {max:g}, got {v:g}")
    return v


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of `choices` (exact string)."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name}: expected one of {tuple(choices)}, got {_show(value)}")
    return value


def check_layers(name: str, layers: Any, n_layers: int, *, allow_empty: bool = False) -> list[int]:
    """Distinct sorted layer indices in 0..n_layers-1 from a list/tuple/range/1-d tensor."""
    if isinstance(layers, torch.Tensor | np.ndarray):
        if layers.ndim != 1:
            raise ShapeError(f"{name}: expected a 1-d list of layer indices, got {layers.shape}")
        layers = layers.tolist()
    if isinstance(layers, str | bytes) or not isinstance(layers, Sequence | range | set):
        raise InputError(f"{name}: expected a list of layer indices, got {_show(layers)}")
    out = set()
    for x in layers:
        v = _scalar(x)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise LayerError(f"{name}: expected an int layer index, got {_show(x)}")
        v = int(v)
        if not 0 <= v < n_layers:
            raise LayerError(f"{name}: expected indices in 0..{n_layers - 1}, got {v}")
        out.add(v)
    if not out and not allow_empty:
        raise InputError(f"{name}: expected at least one allowed layer, got none")
    return sorted(out)


def check_targets(name: str, target: Any, k: int) -> list[float | str]:
    """Per-concept targets: a number or label name for one concept (`k` = 1), a list/tuple/1-d
    tensor/array of them for `k` concepts. Numbers may be Python, numpy or 0-d tensors."""
    if target is None:
        raise InputError(
            f"{name}: expected a number (class separations) or a label name such as "
            "'positive', got None"
        )
    if isinstance(target, torch.Tensor | np.ndarray):
        if target.ndim > 1:
            raise ShapeError(f"{name}: expected a number or a 1-d tensor, got shape {target.shape}")
        if target.ndim == 1 and (
            (
                isinstance(target, torch.Tensor)
                and (target.is_complex() or target.dtype == torch.bool)
            )
            or (isinstance(target, np.ndarray) and target.dtype.kind not in "iuf")
        ):
            raise InputError(f"{name}: expected real numbers, got a tensor of {target.dtype}")
        raw = [target.item()] if target.ndim == 0 else target.tolist()
    elif isinstance(target, list | tuple):
        raw = list(target)
    else:
        raw = [target]
    if len(raw) != k:
        raise ShapeError(f"{name}: expected {k} value(s), one per surrogate, got {len(raw)}")
    out: list[float | str] = []
    for i, t in enumerate(raw):
        where = name if k == 1 else f"{name}[{i}]"
        t = _scalar(t)
        if isinstance(t, str):
            out.append(t)
            continue
        if t is None or isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise InputError(
                f"{where}: expected a number (class separations) or a label name, got {_show(t)}"
            )
        out.append(float(t))
    return out


def check_surrogate(name: str, value: Any):
    """A fitted `Surrogate` (or anything with its gains, P, meta and n_layers, such as the
    measured-gains model of `Controller.from_gains`): not None, a path or directions."""
    if not all(hasattr(value, a) for a in ("gains", "P", "meta", "n_layers")):
        hint = ""
        if isinstance(value, str):
            hint = " (a path? load it with Surrogate.load(path))"
        raise ModelTypeError(f"{name}: expected a fitted Surrogate, got {_show(value)}{hint}")
    return value


def check_directions(name: str, value: Any):
    """A `ConceptDirections` (anything with unit, scale and check_for)."""
    if not all(hasattr(value, a) for a in ("unit", "scale", "check_for")):
        hint = (
            " (a path? load it with ConceptDirections.load(path))" if isinstance(value, str) else ""
        )
        raise ModelTypeError(
            f"{name}: expected steerlin ConceptDirections, got {_show(value)}{hint}"
        )
    return value


def check_path(name: str, value: Any):
    """A file path (str or os.PathLike)."""
    import os

    if not isinstance(value, str | os.PathLike) or (isinstance(value, str) and not value):
        raise InputError(f"{name}: expected a file path (str or Path), got {_show(value)}")
    return value


def check_schedule(name: str, value: Any):
    """A `Schedule` (or a Controller's: anything with additions, vectors, layers, check_for)."""
    if not all(hasattr(value, a) for a in ("additions", "vectors", "layers", "check_for")):
        raise ModelTypeError(f"{name}: expected a steerlin Schedule, got {_show(value)}")
    return value


def check_text_prompts(name: str, prompts: Any, model, *, extra_tokens: int = 0) -> list[str]:
    """Text prompts for generation: a non-empty list of strings whose tokens, plus
    `extra_tokens` to generate, fit the model's context n_ctx."""
    if isinstance(prompts, str):
        raise InputError(f"{name}: expected a list of prompts, got a single string; use [text]")
    if isinstance(prompts, torch.Tensor):
        raise InputError(
            f"{name}: expected text prompts (strings), got a token tensor; generation-regime "
            "calibration needs text (decode the ids with model.to_string)"
        )
    try:
        prompts = list(prompts)
    except TypeError:
        raise InputError(f"{name}: expected a list of text prompts, got {_show(prompts)}") from None
    if not prompts:
        raise InputError(f"{name}: expected at least one prompt, got an empty list")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(
                f"{name}[{i}]: expected a text prompt (str), got {_show(p)}; "
                "generation-regime calibration needs text (token-id prompts: decode them with "
                "model.to_string)"
            )
    if getattr(model, "tokenizer", None) is None:
        raise InputError(f"{name}: the model has no tokenizer, so it cannot take text prompts")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None:
        for i, p in enumerate(prompts):
            n = int(model.to_tokens(p, truncate=False).shape[-1])
            if n + extra_tokens > n_ctx:
                raise InputError(
                    f"{name}[{i}]: {n} tokens"
                    + (f" + {extra_tokens} to generate" if extra_tokens else "")
                    + f" is longer than the model's context n_ctx={n_ctx}; shorten it"
                )
    return prompts


def check_distinct_tokens(name: str, pos: int | None, neg: int | None, words=None) -> None:
    """A logit readout needs two different tokens: the same token reads zero by construction."""
    if pos is not None and pos == neg:
        shown = f" {tuple(words)!r}" if words is not None else ""
        raise InputError(
            f"{name}: the two label words{shown} map to the same token id {pos}; the logit "
            "difference would be zero by construction (pass two words that tokenize differently)"
        )


__all__ = [
    "check_int",
    "check_number",
    "check_choice",
    "check_layers",
    "check_targets",
    "check_surrogate",
    "check_schedule",
    "check_directions",
    "check_path",
    "check_text_prompts",
    "check_distinct_tokens",
]
