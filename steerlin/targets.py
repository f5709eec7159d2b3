"""Steering targets in units users understand: class separations and label names.

One class separation = the difference of the readout's class means on the concept split
(label 1 minus label 0). A target of +1 moves a prompt from the mean of class 0 to the mean of
class 1 along the readout; + is always label 1. Raw projection units stay available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Target:
    """A resolved steering target: the raw readout shift and what it means."""

    raw: float
    separations: float | None
    separation: float | None
    label_plus: str
    label_minus: str

    def describe(self) -> str:
        if self.separations is None:
            return f"readout shift {self.raw:+.4g} (raw projection units)"
        toward = self.label_plus if self.separations > 0 else self.label_minus
        return (
            f"{self.separations:+g} class separations toward {toward!r} = readout shift "
            f"{self.raw:+.4g} (one separation = {self.separation:.4g}; + is {self.label_plus!r},"
            f" − is {self.label_minus!r})"
        )

    def to_meta(self) -> dict:
        return {
            "raw": self.raw,
            "separations": self.separations,
            "separation": self.separation,
            "plus": self.label_plus,
            "minus": self.label_minus,
        }


def separation_info(meta: dict) -> tuple[float | None, str, str]:
    """(separation, name of label 1 (+), name of label 0 (−)) from a surrogate's metadata."""
    sep = meta.get("separation")
    names = meta.get("label_names") or ["label 0", "label 1"]
    value = None if sep is None else float(sep["value"] if isinstance(sep, dict) else sep)
    return value, str(names[1]), str(names[0])


def resolve_target(target, meta: dict, *, units: str = "separations") -> Target:
    """Turn a user target into a raw readout shift.

    target: a number (class separations by default; raw projection units with units="raw"),
    or "positive"/"negative"/the concept's label names (±1 separation).
    """
    if units not in ("separations", "raw"):
        raise InputError(f"units: expected 'separations' or 'raw', got {units!r}")
    sep, plus, minus = separation_info(meta)
    if isinstance(target, str):
        key = target.strip().lower()
        if key in ("positive", "+", plus.lower()):
            t = 1.0
        elif key in ("negative", "-", "−", minus.lower()):
            t = -1.0
        else:
            raise InputError(
                f"target: expected a number, 'positive', 'negative', {plus!r} or {minus!r}, got "
                f"{target!r}"
            )
        units = "separations"
    else:
        if isinstance(target, bool):
            raise InputError("target: expected a number or a label name, got a bool")
        t = float(target)
    if not math.isfinite(t):
        raise InputError(f"target: expected a finite value, got {target!r}")
    if t == 0:
        raise InputError("target: 0 asks for no shift (the schedule would be all zeros)")
    if units == "raw":
        return Target(t, None if sep is None else t / sep, sep, plus, minus)
    if sep is None or not sep != 0:
        raise InputError(
            "target: this surrogate stores no class separation (fitted by an older steerlin, "
            "or its directions lack class means for this readout); pass units='raw' for a raw "
            "readout shift, or refit the directions and surrogate"
        )
    return Target(t * sep, t, sep, plus, minus)


__all__ = ["Target", "resolve_target", "separation_info"]
