"""Metrics for the least-norm steering solve: what "minimum energy" is minimum in.

A schedule u (one amplitude per layer, norm-relative units: u_l = 0.1 adds 10% of a typical
‖x_l‖ along unit_l) that reaches a predicted shift hᵀu = Δy with the least uᵀWu is

    u* = Δy · W⁻¹h / (hᵀW⁻¹h)

(restricted to the allowed layers S: W_SS and h_S, zero elsewhere). The metric W says what
"least" means, and the answer depends on it:

    "norm"   W = I                     Σu², the paper's energy in norm-relative units
    "raw"    W = diag(scale²)          Σ‖u_l scale_l unit_l‖², raw residual units
    weights  W = diag(w)               a user-given per-layer weight
    "kl"     W = F                     ½uᵀFu ≈ expected KL(clean ‖ steered) of the next-token
                                       distribution (`steerlin.fisher.kl_metric`)

No model is needed here; `kl_metric` builds F on the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float

from .errors import InputError, ShapeError

F64 = torch.float64


@dataclass(frozen=True)
class Metric:
    """A symmetric positive-definite per-layer metric W [L, L] (float64) and what it is.

    Attributes:
        name: "norm", "raw", "weights", "kl" or "matrix".
        W: Float[L, L] the metric (regularised for "kl", see `meta["ridge"]`).
        meta: provenance (for "kl": prompts, ridge, condition number).
    """

    name: str
    W: Float[torch.Tensor, "L L"]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        W = self.W
        if W.ndim != 2 or W.shape[0] != W.shape[1]:
            raise ShapeError(f"metric: expected a square [L, L] matrix, got {tuple(W.shape)}")
        if not torch.isfinite(W).all():
            raise InputError("metric: non-finite entries")

    @property
    def n_layers(self) -> int:
        return self.W.shape[0]

    def energy(self, u) -> float:
        """uᵀWu for a schedule's amplitudes u [L] (for "kl": twice the predicted KL)."""
        u = torch.as_tensor(u, dtype=F64)
        return float(u @ self.W.to(F64) @ u)

    def to_meta(self) -> dict:
        return {"name": self.name, **{k: v for k, v in self.meta.items() if k != "F"}}

    def __repr__(self) -> str:
        return f"Metric({self.name!r}, L={self.n_layers})"


def make_metric(metric, scale: Float[torch.Tensor, " L"]) -> Metric:
    """A Metric from "norm", "raw", a per-layer weight vector [L], a matrix [L, L] or a Metric.

    `scale` (the surrogate's scale_l) turns "raw" into diag(scale²). "kl" needs the model:
    build it with `steerlin.kl_metric(model, prompts, surrogate)` and pass the Metric.
    """
    L = scale.shape[0]
    if isinstance(metric, Metric):
        if metric.n_layers != L:
            raise ShapeError(f"metric: made for L={metric.n_layers}, the surrogate has L={L}")
        return metric
    if isinstance(metric, str):
        if metric == "norm":
            return Metric("norm", torch.eye(L, dtype=F64))
        if metric == "raw":
            return Metric("raw", torch.diag(scale.to(F64).pow(2)))
        if metric == "kl":
            raise InputError(
                'metric="kl" needs the model: pass metric=steerlin.kl_metric(model, prompts, '
                "surrogate) (prompts: neutral text, or the operating prompts), or "
                'Controller(..., metric="kl", model=model, metric_prompts=prompts)'
            )
        raise InputError(
            f"metric: expected 'norm', 'raw', 'kl', a per-layer weight vector or a Metric, got "
            f"{metric!r}"
        )
    w = torch.as_tensor(metric, dtype=F64)
    if w.ndim == 1:
        if w.shape[0] != L:
            raise ShapeError(f"metric: expected {L} per-layer weights, got {w.shape[0]}")
        if not (torch.isfinite(w).all() and (w > 0).all()):
            raise InputError("metric: per-layer weights must be finite and positive")
        return Metric("weights", torch.diag(w))
    if w.shape != (L, L):
        raise ShapeError(f"metric: expected [{L}] weights or an [{L}, {L}] matrix, got {w.shape}")
    return Metric("matrix", 0.5 * (w + w.T))


def least_norm(
    h: Float[torch.Tensor, " L"], dy: float, W: Float[torch.Tensor, "L L"], layers: list[int]
) -> Float[torch.Tensor, " L"]:
    """u* = Δy W_SS⁻¹h_S / (h_SᵀW_SS⁻¹h_S) on the allowed layers S, zero elsewhere."""
    h = torch.as_tensor(h, dtype=F64)
    S = torch.as_tensor(layers, dtype=torch.long)
    Ws = W.to(F64)[S][:, S]
    hs = h[S]
    try:
        x = torch.linalg.solve(Ws, hs)
    except torch.linalg.LinAlgError as exc:
        raise InputError(f"metric: singular on the allowed layers {layers}") from exc
    den = float(hs @ x)
    if not den > 0 or not math.isfinite(den):
        raise InputError(
            "surrogate gains are zero on every allowed layer (or the metric is not positive "
            "definite there): no schedule"
        )
    u = torch.zeros_like(h)
    u[S] = dy * x / den
    return u


__all__ = ["Metric", "make_metric", "least_norm"]
