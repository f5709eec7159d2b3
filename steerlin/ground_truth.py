"""The per-layer ground truth that where-to-steer predictors are scored against, and how far
it can be trusted.

`layer_effects`: for each layer l alone, the concept direction unit_l is injected (last prompt
token and every generated token, as `Schedule.apply` steers generation) with the amplitude a_l
at which the measured next-token KL along the unsteered continuations of the calibration stems
equals a KL level (bisection on the full model, or amplitudes reused from an earlier sweep);
greedy continuations of the held-out stems at +a_l and −a_l are judged, and the per-layer
effect is the judged Δ(+,−) = mean over stems of judge(+) − judge(−). Every stem's judged score
is kept ([L][n_stems] per sign), so the curve's reliability can be measured.

`split_half_reliability`: random equal halves of the stems; the Spearman correlation across
layers between the two halves' Δ curves, stepped up to the full stem count (Spearman-Brown,
`predictors.split_half_reliability`); its mean and 5-95% spread over the splits, and the
ceiling sqrt(reliability): the highest Spearman a noiseless predictor can reach with the
measured curve. `score_with_ceiling` sets each predictor's ρ beside that ceiling.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from .errors import InputError
from .validate import check_int

F64 = torch.float64


def _judge_fn(judge) -> Callable:
    if isinstance(judge, str):
        from .judges import get_judge

        return get_judge(judge)
    if not callable(judge):
        raise InputError(
            f"judge: expected a judge name or a callable texts -> scores, got {judge!r}"
        )
    return judge


def _levels(levels) -> list[float]:
    try:
        out = [float(k) for k in levels]
    except (TypeError, ValueError):
        raise InputError(f"levels: expected KL levels (positive numbers), got {levels!r}") from None
    if not out or not all(math.isfinite(k) and k > 0 for k in out):
        raise InputError(f"levels: expected positive finite KL levels, got {levels!r}")
    return out


def _stems(stems) -> list[str]:
    if stems is None:
        from .steer_eval.setting import neutral_stems

        s = neutral_stems()
        return s["eval"] + s["extra"]
    if isinstance(stems, str) or not all(isinstance(p, str) and p for p in stems):
        raise InputError("stems: expected a sequence of non-empty strings")
    stems = list(stems)
    if len(stems) < 2:
        raise InputError(f"stems: expected at least 2 held-out stems, got {len(stems)}")
    return stems


def _amplitudes(amplitudes, levels: list[float], L: int) -> dict[float, np.ndarray] | None:
    """{level: [L] amplitudes} from a mapping keyed by level (str or number)."""
    if amplitudes is None:
        return None
    if not isinstance(amplitudes, Mapping):
        raise InputError("amplitudes: expected a mapping {KL level: [L] amplitudes}")
    keyed = {}
    for k, v in amplitudes.items():
        try:
            keyed[float(k)] = np.asarray(v, dtype=float)
        except (TypeError, ValueError):
            raise InputError(f"amplitudes: level {k!r}: expected numbers") from None
    out = {}
    for k in levels:
        a = next((v for kk, v in keyed.items() if math.isclose(kk, k)), None)
        if a is None:
            raise InputError(f"amplitudes: no amplitudes for KL level {k:g}")
        if a.shape != (L,):
            raise InputError(f"amplitudes: level {k:g}: expected {L} amplitudes, got {a.shape}")
        out[k] = a
    return out


def layer_effects(
    model,
    dirs,
    judge,
    levels: Sequence[float],
    *,
    stems: Sequence[str] | None = None,
    tokens: int = 20,
    amplitudes: Mapping | None = None,
    amplitude_source: str | None = None,
    calibration: Sequence[str] | None = None,
    calibration_tokens: int = 8,
    batch_size: int = 36,
    log: Callable[[str], None] | None = None,
    on_layer: Callable[[dict], None] | None = None,
) -> dict[str, dict]:
    """Judged Δ(+,−) per layer at each KL level, with every stem's judged score.

    judge: a judge name (`steerlin.judges.get_judge`) or a callable texts -> scores. stems: the
    held-out stems (default: the shipped "eval" + "extra" stems, 180). The amplitude of layer l
    at a level is defined on the calibration stems only (default: the shipped 12; their
    unsteered `calibration_tokens`-token greedy continuations): the amplitude at which the
    measured mean next-token KL there equals the level (bisection, 5% tolerance). It does not
    depend on which held-out stems are judged, so `amplitudes` ({level: [L]}, e.g. a saved
    sweep's "amp") may be reused: no bisection then, the KL at the given amplitude is measured
    once and recorded, and `amplitude_source` names where the amplitudes came from. Held-out
    stems generate `batch_size` at a time (left-padded, greedy, `tokens` new tokens).
    Layers whose direction is zero have nothing to inject: NaN everywhere.

    Returns {str(level): {"amp", "kl", "delta", "plus", "minus": [L], "plus_stems",
    "minus_stems": [L][n_stems], "n_stems", "amplitude_source"}}; `on_layer(out)` is called
    after each layer (a caller saves partial results with it)."""
    import steerlin

    from .measure import bisect_multiplier, final_states, measured_token_kl
    from .regime import generate

    judge = _judge_fn(judge)
    levels = _levels(levels)
    stems = _stems(stems)
    tokens = check_int("tokens", tokens, min=1)
    batch_size = check_int("batch_size", batch_size, min=1)
    L = model.cfg.n_layers
    amps = _amplitudes(amplitudes, levels, L)
    if calibration is None:
        from .steer_eval.setting import neutral_stems

        calibration = neutral_stems()["calibration"]
    cal = generate(
        model, list(calibration), check_int("calibration_tokens", calibration_tokens, min=1)
    )
    clean = final_states(model, cal, None, batch_size=8)  # as regime_kl measures them
    log = log or (lambda m: None)
    source = "bisected on the calibration stems" if amps is None else (amplitude_source or "given")
    b = dirs.b[:L].to(F64)
    keys = ("amp", "kl", "delta", "plus", "minus", "plus_stems", "minus_stems")
    out = {str(k): {key: [] for key in keys} for k in levels}
    for rec in out.values():
        rec |= {"n_stems": len(stems), "amplitude_source": source}
    nan_row = [float("nan")] * len(stems)
    t0 = time.time()
    for layer in range(L):
        vec = torch.zeros(L, b.shape[1], dtype=F64)
        vec[layer] = b[layer]
        for k in levels:
            rec = out[str(k)]
            if not bool(vec.any()):
                for key in keys:
                    rec[key].append(list(nan_row) if key.endswith("_stems") else float("nan"))
                continue
            # the mean KL along the calibration continuations (`regime_kl`), their clean
            # states computed once, not again in every bisection step and layer
            f = lambda a, v=vec: float(
                measured_token_kl(model, cal, a * v, batch_size=8, clean=clean).mean()
            )
            if amps is None:
                a, kl, _ = bisect_multiplier(f, k, tol=0.05, max_evaluations=30)
            else:
                a = float(amps[k][layer])
                if not (math.isfinite(a) and a > 0):
                    raise InputError(f"amplitudes: level {k:g}, layer {layer}: got {a}")
                kl = f(a)
            per_sign = []
            for sign in (1, -1):
                s = steerlin.Schedule(
                    torch.zeros(L, dtype=F64).index_fill(0, torch.tensor([layer]), sign * a),
                    dirs.unit[:L].to(F64),
                    dirs.scale[:L].to(F64),
                    {"strategy": f"layer {layer}"},
                )
                scores = []
                for i in range(0, len(stems), batch_size):
                    texts = generate(model, stems[i : i + batch_size], tokens, s).texts
                    scores += [float(x) for x in judge(texts)]
                per_sign.append(scores)
            plus, minus = (float(np.mean(x)) for x in per_sign)
            rec["amp"].append(float(a))
            rec["kl"].append(float(kl))
            rec["plus"].append(plus)
            rec["minus"].append(minus)
            rec["delta"].append(plus - minus)
            rec["plus_stems"].append(per_sign[0])
            rec["minus_stems"].append(per_sign[1])
            log(
                f"  layer {layer:2d}/{L} KL {kl:.3f}: amplitude {a:.3g}, judged Δ "
                f"{plus - minus:+.3f} over {len(stems)} stems ({time.time() - t0:.0f} s)"
            )
        if on_layer is not None:
            on_layer(out)
    return out


def merge_stems(base: Mapping, more: Mapping) -> dict[str, dict]:
    """Two `layer_effects` results at the same amplitudes on disjoint stems as one: per-stem
    scores concatenated (base's stems first), the per-layer means recomputed over all stems.
    The amplitudes must agree (they are defined on the calibration stems, not the judged ones).
    """
    out = {}
    for k, a in base.items():
        b = more.get(k)
        if b is None:
            raise InputError(f"more: no KL level {k}")
        aa, ab = np.asarray(a["amp"], dtype=float), np.asarray(b["amp"], dtype=float)
        if aa.shape != ab.shape or not np.allclose(aa, ab, rtol=1e-12, equal_nan=True):
            raise InputError(f"more: level {k}: amplitudes differ from base's")
        rec = {key: list(a[key]) for key in ("amp", "kl")}
        for key in ("plus_stems", "minus_stems"):
            rec[key] = [list(x) + list(y) for x, y in zip(a[key], b[key], strict=True)]
        plus = np.asarray(rec["plus_stems"], dtype=float).mean(1)
        minus = np.asarray(rec["minus_stems"], dtype=float).mean(1)
        rec |= {"plus": plus.tolist(), "minus": minus.tolist(), "delta": (plus - minus).tolist()}
        rec["n_stems"] = len(rec["plus_stems"][0])
        rec["amplitude_source"] = a.get("amplitude_source", "given")
        out[k] = rec
    return out


def stem_deltas(rec: Mapping) -> np.ndarray:
    """Per-stem judged Δ [L, n_stems] (judge(+) − judge(−)) of one level's record; its mean
    over stems is the record's "delta"."""
    for key in ("plus_stems", "minus_stems"):
        if key not in rec:
            raise InputError(f"rec: no {key!r}: not a per-stem record (`layer_effects`)")
    d = np.asarray(rec["plus_stems"], dtype=float) - np.asarray(rec["minus_stems"], dtype=float)
    if d.ndim != 2 or d.shape[1] < 2:
        raise InputError(f"rec: expected per-stem scores [L][n_stems ≥ 2], got shape {d.shape}")
    return d


def split_half_reliability(
    per_stem, *, n_splits: int = 200, seed: int = 0, n_stems: int | None = None
) -> dict:
    """Split-half reliability of the per-layer curve (mean over stems of `per_stem` [L, n]).

    Each of `n_splits` random splits (seeded) halves the n stems (n//2 and the rest); r is the
    Spearman correlation across layers of the two halves' mean curves (layers that are NaN in
    every stem, e.g. a zero direction, are left out) and the reliability of the mean over all
    n stems follows by Spearman-Brown (`predictors.split_half_reliability`; equal halves:
    2r/(1+r)). `n_stems` (≤ n) subsamples that many stems per split first (the reliability a
    smaller set would have). Returns the mean reliability, its 5% and 95% quantiles over the
    splits, the mean r, and the ceiling sqrt(mean reliability)."""
    from .predictors import split_half_reliability as sb_pair

    x = np.asarray(per_stem, dtype=float)
    if x.ndim != 2:
        raise InputError(f"per_stem: expected a [L, n_stems] array, got shape {x.shape}")
    keep = ~np.isnan(x).all(axis=1)
    x = x[keep]
    if x.shape[0] < 3 or np.isnan(x).any():
        raise InputError(
            "per_stem: expected ≥ 3 layers with a score for every stem "
            f"(got {x.shape[0]} layers, NaN inside: {bool(np.isnan(x).any())})"
        )
    n_splits = check_int("n_splits", n_splits, min=1)
    n = x.shape[1]
    k = n if n_stems is None else check_int("n_stems", n_stems, min=2, max=n)
    if k < 2:
        raise InputError(f"per_stem: expected at least 2 stems, got {n}")
    rng = np.random.default_rng(seed)
    rel, rs = [], []
    for _ in range(n_splits):
        idx = rng.permutation(n)[:k]
        a, b = idx[: k // 2], idx[k // 2 :]
        r = sb_pair(x[:, a].mean(1), x[:, b].mean(1), len(a), len(b))
        rel.append(r["reliability"])
        rs.append(r["r_halves"])
    rel = np.array(rel)
    mean = float(rel.mean())
    return {
        "reliability": mean,
        "reliability_q05": float(np.quantile(rel, 0.05)),
        "reliability_q95": float(np.quantile(rel, 0.95)),
        "r_halves": float(np.mean(rs)),
        "ceiling": mean**0.5,
        "n_stems": int(k),
        "n_layers": int(x.shape[0]),
        "n_splits": int(n_splits),
        "seed": int(seed),
    }


def score_with_ceiling(scores: Mapping[str, Mapping], ceiling: float) -> dict[str, dict]:
    """Each predictor's Spearman ρ (`predictors.score_predictors`' output) beside the ceiling:
    {name: {"spearman": ρ, "fraction_of_ceiling": ρ / ceiling (None if the ceiling is 0)}}."""
    return {
        n: {
            "spearman": v["spearman"],
            "fraction_of_ceiling": v["spearman"] / ceiling if ceiling > 0 else None,
        }
        for n, v in scores.items()
    }


__all__ = [
    "layer_effects",
    "merge_stems",
    "score_with_ceiling",
    "split_half_reliability",
    "stem_deltas",
]
