"""Where to steer, predicted per layer without generating anything.

Each predictor returns one score per injection layer l = 0..L-1 (the state x_l that a steering
vector is added to), higher = steer here:

- `gain_curve`: |h_l|, the readout change per unit (norm-relative) injection: exact full-model
  gains (`steerlin.exact_gains`) or a surrogate's predicted gains.
- `gain_per_kl`: h_l² / F_ll, readout change squared per unit of predicted KL of the next-token
  distribution (F: `steerlin.kl_metric`), i.e. how much the readout moves at a fixed side effect.
- `logit_lens_accuracy` (LAP's A_lin, arXiv 2604.15557): the final norm and unembedding applied
  to x_l; the fraction of labelled prompts whose label word outscores the other label word.
- `probe_accuracy`: held-out accuracy of an L2-regularised logistic probe on x_l (decodability).
- `layer_navigator` (LayerNavigator, NeurIPS 2025): discriminability + consistency of the labelled
  activations along the steering vector at x_l.
- `in_regime_per_kl`: |g_l|/sqrt(F_ll) of an in-regime readout (`steerlin.inregime`).

`score_predictors` scores any of them against a judged per-layer effect: Spearman correlation
across layers, and the judged effect at the predictor's top layer as a fraction of the best
layer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from .errors import InputError, ShapeError
from .readouts import full_logits, make_readout
from .trajectory import capture

F64 = torch.float64


def gain_curve(gains) -> Float[torch.Tensor, " L"]:
    """|h_l|: exact gains (`exact_gains`) or a surrogate's (`Surrogate.gains`) as a score."""
    h = torch.as_tensor(getattr(gains, "gains", gains)).detach().to("cpu", F64)
    if h.ndim != 1:
        raise ShapeError(f"gains: expected a 1-d per-layer tensor, got shape {tuple(h.shape)}")
    return h.abs()


def gain_per_kl(gains, metric) -> Float[torch.Tensor, " L"]:
    """h_l² / F_ll: squared readout change per unit of predicted next-token KL at layer l.

    metric: a `steerlin.energy.Metric` from `steerlin.kl_metric` (its W is F), or F itself."""
    h = gain_curve(gains)
    W = torch.as_tensor(getattr(metric, "W", metric)).detach().to("cpu", F64)
    if W.shape != (h.shape[0], h.shape[0]):
        raise ShapeError(f"metric: expected F of shape [{h.shape[0]}]*2, got {tuple(W.shape)}")
    return h.pow(2) / W.diagonal().clamp_min(torch.finfo(F64).tiny)


def _labels(labels, n: int) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if y.shape != (n,) or not bool(((y == 0) | (y == 1)).all()):
        raise InputError(f"labels: expected {n} labels, each 0 or 1")
    if int(y.sum()) in (0, n):
        raise InputError("labels: both classes are needed")
    return y


@torch.no_grad()
def logit_lens_accuracy(
    model,
    prompts: Sequence[str],
    labels: Sequence[int],
    *,
    label_words: Sequence[str] | Sequence[int] = (" positive", " negative"),
    batch_size: int = 16,
) -> Float[torch.Tensor, " L"]:
    """A_lin per layer: the logit lens on x_l (final norm + unembedding), accuracy of
    "label word 1 outscores label word 0" against the labels (1 = the first word's class).
    Ties count as half right."""
    rd = make_readout(model, "logits", None, label_words=label_words)
    if rd.pos_token == rd.neg_token:
        raise InputError(f"label_words: {label_words!r} map to the same token")
    y = _labels(labels, len(prompts)).to(F64)
    states = capture(model, prompts, batch_size=batch_size).states  # [n, L+1, H]
    L = model.cfg.n_layers
    out = torch.empty(L, dtype=F64)
    for layer in range(L):
        x = states[:, layer].to(device=model.cfg.device, dtype=model.cfg.dtype)
        z = full_logits(model, x).to("cpu", F64)
        margin = torch.sign(z[:, rd.pos_token] - z[:, rd.neg_token])
        right = torch.where(y > 0, margin, -margin)
        out[layer] = float(((right + 1) / 2).mean())
    return out


def _logistic(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """Weights [H+1] of an L2-regularised logistic regression (Newton steps, float64)."""
    X = torch.cat([x, torch.ones(x.shape[0], 1, dtype=F64)], 1)
    w = torch.zeros(X.shape[1], dtype=F64)
    reg = ridge * torch.eye(X.shape[1], dtype=F64)
    reg[-1, -1] = 0
    for _ in range(50):
        p = torch.sigmoid(X @ w)
        g = X.T @ (p - y) + reg @ w
        Hs = (X * (p * (1 - p))[:, None]).T @ X + reg
        step = torch.linalg.solve(Hs + 1e-10 * torch.eye(X.shape[1], dtype=F64), g)
        w = w - step
        if float(step.abs().max()) < 1e-10:
            break
    return w


@torch.no_grad()
def probe_accuracy(
    model,
    prompts: Sequence[str],
    labels: Sequence[int],
    *,
    ridge: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> Float[torch.Tensor, " L"]:
    """Held-out accuracy per layer of a logistic probe on x_l: a stratified half of the prompts
    (drawn with `seed`) trains, the other half tests. States are standardised per feature on
    the training half; `ridge` is the L2 weight on the standardised scale."""
    y = _labels(labels, len(prompts))
    g = torch.Generator().manual_seed(seed)
    train = torch.zeros(len(y), dtype=torch.bool)
    for c in (0, 1):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        train[idx[: (len(idx) + 1) // 2]] = True
    if int((~train).sum()) == 0:
        raise InputError("prompts: need at least 2 per class for a held-out probe")
    states = capture(model, prompts, batch_size=batch_size).states.to(F64)
    L = model.cfg.n_layers
    out = torch.empty(L, dtype=F64)
    yf = y.to(F64)
    for layer in range(L):
        x = states[:, layer]
        mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-12)
        z = (x - mu) / sd
        w = _logistic(z[train], yf[train], ridge)
        pred = (torch.cat([z[~train], torch.ones(int((~train).sum()), 1, dtype=F64)], 1) @ w) > 0
        out[layer] = float((pred.to(F64) == yf[~train]).to(F64).mean())
    return out


@dataclass(frozen=True)
class LayerNavigatorScore:
    """LayerNavigator's per-layer scores: s = d + c (the official code's sum), d the
    discriminability, c the consistency; each Float[L]."""

    s: torch.Tensor
    d: torch.Tensor
    c: torch.Tensor

    def to_dict(self) -> dict[str, list[float]]:
        return {"s": self.s.tolist(), "d": self.d.tolist(), "c": self.c.tolist()}


def layer_navigator_scores(
    states: Float[torch.Tensor, "n L H"], labels, units: Float[torch.Tensor, "L H"]
) -> LayerNavigatorScore:
    """LayerNavigator (NeurIPS 2025) from activations `states` [n, L, H] (x_l at the last
    prompt token), binary `labels` and steering vectors `units` [L, H] (normalised here):

    - consistency c_l = mean over pairs of cos(x_pos − x_neg, v_l): how consistently the
      per-example contrast points along the steering vector. The paper's data are paired
      contrastive examples; ours (e.g. SST-2) are unpaired, so the mean runs over all
      label-1 × label-0 pairs, vectorised through the Gram matrix (no loop over pairs);
      pos = label 1, as `ConceptDirections` points from label 0 to label 1.
    - discriminability d_l = vᵀS_b v / vᵀS_t v: between-class over total scatter along v_l
      (Fisher's ratio in [0, 1]; 0 where the activations do not vary along v_l).

    The issue that asked for it says "discriminability × consistency"; the authors' code
    (github.com/Bryson-Arrot/LayerNavigator, get_score.py) ranks layers by s = d + c, which is
    what `s` is. Float64 throughout."""
    x = torch.as_tensor(states).detach().to("cpu", F64)
    v = torch.as_tensor(units).detach().to("cpu", F64)
    if x.ndim != 3 or v.shape != x.shape[1:]:
        raise ShapeError(
            f"units: expected [L, H] matching states [n, L, H] {tuple(x.shape)}, got "
            f"{tuple(v.shape)}"
        )
    y = _labels(labels, x.shape[0]).bool()
    norm = v.norm(dim=-1, keepdim=True)
    v = torch.where(norm > 0, v / norm.clamp_min(torch.finfo(F64).tiny), 0.0)
    x = x - x.mean(0)  # centred (differences and scatters are unchanged)
    p = torch.einsum("nlh,lh->nl", x, v)  # projections on v_l
    # discriminability: between-class over total scatter along v
    n1, n0 = int(y.sum()), int((~y).sum())
    between = n1 * p[y].mean(0) ** 2 + n0 * p[~y].mean(0) ** 2  # the overall mean is 0
    total = (p * p).sum(0)
    d = torch.where(total > 0, between / total.clamp_min(torch.finfo(F64).tiny), 0.0)
    # consistency: mean over all (label 1, label 0) pairs of cos(x_i − x_j, v)
    x1, x0 = x[y].transpose(0, 1), x[~y].transpose(0, 1)  # [L, n1, H], [L, n0, H]
    sq1, sq0 = (x1 * x1).sum(-1), (x0 * x0).sum(-1)
    dist2 = sq1[:, :, None] + sq0[:, None, :] - 2 * x1 @ x0.transpose(1, 2)  # [L, n1, n0]
    num = p[y].T[:, :, None] - p[~y].T[:, None, :]
    dist = dist2.clamp_min(0).sqrt()
    ok = dist > 1e-12 * (sq1.amax(-1) + sq0.amax(-1)).sqrt()[:, None, None]
    cos = torch.where(ok, num / dist.clamp_min(torch.finfo(F64).tiny), 0.0)
    c = cos.sum((1, 2)) / ok.sum((1, 2)).clamp_min(1)
    return LayerNavigatorScore(d + c, d, c)


@torch.no_grad()
def layer_navigator(
    model, prompts, labels, directions, *, batch_size: int = 16
) -> LayerNavigatorScore:
    """`layer_navigator_scores` on the last-token activations of labelled `prompts` (or an
    already captured `Trajectory`), with v_l = directions.unit[l] (the concept direction at
    x_l, l = 0..L-1: the injection layers)."""
    from .trajectory import Trajectory

    traj = (
        prompts
        if isinstance(prompts, Trajectory)
        else capture(model, prompts, batch_size=batch_size)
    )
    L = model.cfg.n_layers
    unit = getattr(directions, "unit", directions)
    if not isinstance(unit, torch.Tensor) or unit.ndim != 2 or unit.shape[0] < L:
        raise ShapeError("directions: expected ConceptDirections or units [L(+1), H]")
    return layer_navigator_scores(traj.states[:, :L], labels, unit[:L])


def in_regime_per_kl(gains, name: str) -> Float[torch.Tensor, " L"]:
    """|g_l| / sqrt(mean_i F_i[l, l]) of readout `name` of a `steerlin.inregime.RegimeGains`:
    layer l's in-regime readout change at a matched mean KL."""
    return gains.per_kl(name).to("cpu", F64)


def score_predictors(predictors: dict, judged) -> dict[str, dict]:
    """Each predictor against the judged per-layer effect `judged` [L] (larger = better):
    {"spearman": rank correlation across layers, "top_layer": its argmax, "top_fraction":
    judged[top] / max(judged)} (layers where a predictor is NaN are left out)."""
    from scipy.stats import spearmanr

    j = torch.as_tensor(judged, dtype=F64)
    best = float(j.max())
    out = {}
    for name, p in predictors.items():
        p = torch.as_tensor(p, dtype=F64)
        if p.shape != j.shape:
            raise ShapeError(f"{name}: expected shape {tuple(j.shape)}, got {tuple(p.shape)}")
        ok = ~torch.isnan(p)
        top = int(torch.where(ok, p, torch.tensor(-torch.inf, dtype=F64)).argmax())
        rho = spearmanr(p[ok].numpy(), j[ok].numpy())[0] if int(ok.sum()) > 2 else float("nan")
        out[name] = {
            "spearman": float(rho),
            "top_layer": top,
            "top_fraction": float(j[top]) / best if best > 0 else float("nan"),
        }
    return out


def split_half_reliability(half_a, half_b, n_a: int, n_b: int) -> dict[str, float]:
    """Reliability of a per-layer curve measured as the mean over n_a + n_b stems, from two
    disjoint halves of it (means over n_a and n_b stems) (Spearman-Brown).

    r = Spearman(half_a, half_b) across layers (NaN layers left out). Classical test theory:
    a mean over k stems has reliability ρ_k = kρ/(1 + (k−1)ρ) (ρ: one stem's), and two
    disjoint means correlate at sqrt(ρ_{n_a} ρ_{n_b}); ρ is solved from r, and the full curve's
    reliability is ρ_{n_a+n_b} (equal halves: the usual 2r/(1+r)). The highest correlation a
    noiseless predictor can reach with the measured full curve is sqrt(ρ_{n_a+n_b})
    ("ceiling"). r ≤ 0 gives reliability 0."""
    from scipy.optimize import brentq
    from scipy.stats import spearmanr

    a = torch.as_tensor(half_a, dtype=F64)
    b = torch.as_tensor(half_b, dtype=F64)
    if a.shape != b.shape or a.ndim != 1:
        raise ShapeError(f"half_b: expected shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if min(n_a, n_b) < 1:
        raise InputError(f"n_a, n_b: expected positive stem counts, got {n_a}, {n_b}")
    ok = ~(torch.isnan(a) | torch.isnan(b))
    r = float(spearmanr(a[ok].numpy(), b[ok].numpy())[0])
    sb = lambda rho, k: k * rho / (1 + (k - 1) * rho)
    if not r > 0:
        rho = 0.0
    elif r >= 1:
        rho = 1.0
    else:
        rho = brentq(lambda x: (sb(x, n_a) * sb(x, n_b)) ** 0.5 - r, 1e-12, 1 - 1e-12)
    full = sb(rho, n_a + n_b)
    return {
        "r_halves": r,
        "n_a": int(n_a),
        "n_b": int(n_b),
        "reliability": float(full),
        "ceiling": float(full**0.5),
        "per_stem": float(rho),
        "n_layers": int(ok.sum()),
    }


__all__ = [
    "split_half_reliability",
    "gain_curve",
    "gain_per_kl",
    "logit_lens_accuracy",
    "probe_accuracy",
    "LayerNavigatorScore",
    "layer_navigator",
    "layer_navigator_scores",
    "in_regime_per_kl",
    "score_predictors",
]
