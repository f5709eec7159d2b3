"""Fidelity of a predicted per-layer gain curve, always beside its null models.

Norm-relative gains g_l = scale_l · (raw gain) carry scale_l on both the predicted and the
measured side; on models whose residual norm grows with depth the null g_l ∝ scale_l then
correlates highly with anything. So every score here comes in raw units too (both curves /
scale_l), with per-layer relative errors, and with two null models scored on the same curves:
scale-only and identity-Jacobian (docs/method.md, "Reading the numbers honestly").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.stats
import torch

from .errors import InputError, NonFiniteError


@dataclass(frozen=True)
class Score:
    """How well one per-layer gain curve matches the measured one.

    spearman, pearson: correlation across layers in the units given (norm-relative gains carry
    the shared factor scale_l on both sides). raw_spearman, raw_pearson: the same after
    dividing both curves by scale_l (raw units: gain per unit-norm vector), NaN without a
    scale or for a curve that is constant there. rel_err_median, rel_err_max: over layers of
    |predicted_l − measured_l| / |measured_l| (unit-free: the same in either unit).
    """

    spearman: float
    pearson: float
    raw_spearman: float = math.nan
    raw_pearson: float = math.nan
    rel_err_median: float = math.nan
    rel_err_max: float = math.nan

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Fidelity:
    """Agreement of predicted and measured gains across layers, beside two null models.

    The headline is the raw-unit score (`raw_spearman`, `raw_pearson`): in norm-relative units
    the null `scale` (g_l ∝ scale_l, knows nothing about Jacobians) already correlates highly
    on models whose residual norm grows with depth. `nulls` maps "scale" (g_l = α scale_l, α the
    least-squares fit to the measured curve: the null at its best) and, when given,
    "identity" (g_l = scale_l ⟨∇y, unit_l⟩: the injection reaches x_L unchanged) to their
    Scores on the same curves.
    """

    spearman: float
    pearson: float
    raw_spearman: float = math.nan
    raw_pearson: float = math.nan
    rel_err_median: float = math.nan
    rel_err_max: float = math.nan
    nulls: dict[str, Score] = field(default_factory=dict)

    @property
    def score(self) -> Score:
        return Score(
            self.spearman,
            self.pearson,
            self.raw_spearman,
            self.raw_pearson,
            self.rel_err_median,
            self.rel_err_max,
        )

    def as_dict(self) -> dict:
        """Flat dict: the scores, then null_<name>_<score> for each null model."""
        out = self.score.as_dict()
        for name, sc in self.nulls.items():
            out.update({f"null_{name}_{k}": v for k, v in sc.as_dict().items()})
        return out

    def __str__(self) -> str:
        if math.isnan(self.raw_spearman) and not self.nulls:
            return f"Spearman {self.spearman:.3f}, Pearson {self.pearson:.3f}"
        head = (
            f"raw Spearman {self.raw_spearman:.3f}, Pearson {self.raw_pearson:.3f}; "
            f"norm-relative {self.spearman:.3f}/{self.pearson:.3f}; "
            f"median rel. error {self.rel_err_median:.3f}"
        )
        nulls = "; ".join(
            f"null {k}: raw {v.raw_spearman:.3f}, norm-relative {v.spearman:.3f}"
            for k, v in self.nulls.items()
        )
        return head + (f" ({nulls})" if nulls else "")


def _curve(x, what: str) -> np.ndarray:
    a = np.asarray(torch.as_tensor(x, dtype=torch.float64).cpu())
    if a.ndim != 1:
        raise InputError(f"fidelity: {what} must be a 1-D per-layer curve, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise NonFiniteError(f"fidelity: non-finite values in {what}")
    return a


def _corr(p: np.ndarray, m: np.ndarray) -> tuple[float, float]:
    """(Spearman, Pearson), NaN where either curve is constant (no correlation defined)."""
    flat = lambda a: np.ptp(a) <= 1e-12 * np.abs(a).max()
    if flat(p) or flat(m):
        return math.nan, math.nan
    return (
        float(scipy.stats.spearmanr(p, m).statistic),
        float(scipy.stats.pearsonr(p, m).statistic),
    )


def _score(p: np.ndarray, m: np.ndarray, scale: np.ndarray | None) -> Score:
    rho, r = _corr(p, m)
    raw = _corr(p / scale, m / scale) if scale is not None else (math.nan, math.nan)
    # relative error per layer, with a floor at 1e-9 of the curve's largest magnitude so an
    # exactly-zero measured gain does not divide by zero
    den = np.maximum(np.abs(m), 1e-9 * np.abs(m).max())
    rel = np.abs(p - m) / den
    return Score(rho, r, raw[0], raw[1], float(np.median(rel)), float(rel.max()))


def fidelity(predicted, measured, scale=None, *, identity=None) -> Fidelity:
    """Score a predicted per-layer gain curve against a measured one, beside null models.

    Args:
        predicted, measured: Float[L] gains in the same units (norm-relative in steerlin).
        scale: Float[L] (or [L+1], the last entry ignored) the residual scale_l the gains
            carry (`ConceptDirections.scale`); enables the raw-unit scores (both curves /
            scale_l) and the scale-only null.
        identity: Float[L] the identity-Jacobian null's gains in the same units
            (`Surrogate.gains_identity`: scale_l ⟨∇y, unit_l⟩).

    Without `scale` only the correlations in the given units and the relative errors are
    filled; a bare number is no evidence on its own, so pass `scale` whenever you have it.
    """
    p = np.asarray(torch.as_tensor(predicted, dtype=torch.float64).cpu())
    m = np.asarray(torch.as_tensor(measured, dtype=torch.float64).cpu())
    if p.shape != m.shape or p.ndim != 1:
        raise InputError(f"fidelity: expected two equal-length curves, got {p.shape}, {m.shape}")
    if p.shape[0] < 3:
        raise InputError(f"fidelity: need at least 3 layers to correlate, got {p.shape[0]}")
    if not (np.isfinite(p).all() and np.isfinite(m).all()):
        raise NonFiniteError("fidelity: non-finite gains")
    if np.ptp(p) == 0 or np.ptp(m) == 0:
        raise InputError("fidelity: a constant gain curve has no correlation with anything")
    s = None
    if scale is not None:
        s = _curve(scale, "scale")
        if s.shape[0] == p.shape[0] + 1:
            s = s[:-1]
        if s.shape != p.shape:
            raise InputError(
                f"scale: expected {p.shape[0]} (or {p.shape[0] + 1}) entries, got {s.shape[0]}"
            )
        if (s <= 0).any():
            raise InputError("scale: residual scales must be positive")
    main = _score(p, m, s)
    nulls: dict[str, Score] = {}
    if s is not None:
        alpha = float(s @ m / (s @ s))
        nulls["scale"] = _score(alpha * s, m, s)
    if identity is not None:
        q = _curve(identity, "identity")
        if q.shape != p.shape:
            raise InputError(f"identity: expected {p.shape[0]} entries, got {q.shape[0]}")
        nulls["identity"] = _score(q, m, s)
    return Fidelity(**main.as_dict(), nulls=nulls)


__all__ = ["Fidelity", "Score", "fidelity"]
