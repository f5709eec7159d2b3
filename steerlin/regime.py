"""A schedule on the full model in the regime it is used in: generation, teacher-forced.

`apply` during `model.generate` steers the last prompt token and every generated token, and the
steered keys/values of earlier steps feed later ones. A last-token calibration on a frozen
clean context measures a different, weaker regime. Here the schedule is measured the way it is
used: each prompt is extended by its unsteered greedy continuation (n tokens), and one forward
over prompt + continuation runs with the schedule added under a position policy:

    "last"       the last prompt token only (measured there),
    "generated"  the last prompt token and every continuation token (what `apply` does during
                 generation; measured at those n positions, the ones predicting the tokens),
    "all"        every position, prompt included (measured at the same n positions).

Teacher forcing on the unsteered tokens keeps the measured shift a smooth function of the
schedule's multiplier, so bisection is well posed (a free-running steered generation changes
tokens discontinuously). Each measurement is one forward per prompt batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float

from . import backend
from .backend import check_model
from .errors import InputError, NonFiniteError, UnreachableTargetError
from .fisher import full_logits
from .hooks import resid_post_name, resid_pre_name
from .validate import check_int, check_number, check_text_prompts

POLICIES = ("last", "generated", "all")
F64 = torch.float64


@dataclass(frozen=True)
class Continuations:
    """Prompts and their greedy continuations, as token ids (no padding).

    Attributes:
        prompts: the prompt strings (or None for token-id prompts).
        prompt_ids: per prompt, its token ids (BOS included).
        new_ids: Int[b, n] the n generated tokens per prompt.
        texts: decoded continuations (prompt removed).
    """

    prompts: list[str] | None
    prompt_ids: list[list[int]]
    new_ids: torch.Tensor
    texts: list[str]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def n_new(self) -> int:
        return self.new_ids.shape[1]

    def subset(self, idx: Sequence[int]) -> Continuations:
        idx = list(idx)
        return Continuations(
            None if self.prompts is None else [self.prompts[i] for i in idx],
            [self.prompt_ids[i] for i in idx],
            self.new_ids[idx],
            [self.texts[i] for i in idx],
        )


def generate(
    model,
    prompts: Sequence[str],
    max_new_tokens: int,
    schedule=None,
    *,
    positions: str = "generated",
) -> Continuations:
    """Greedy continuations of `max_new_tokens` tokens (no early stop), steered by `schedule`.

    One left-padded batch (TransformerLens's generate; identical tokens to one prompt at a
    time). `schedule` is anything with `.apply(model, positions=...)` (Schedule, Controller).
    """
    from contextlib import nullcontext

    check_model(model)
    if model.tokenizer is None:
        raise InputError("generate: the model has no tokenizer")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, min=1)
    prompts = check_text_prompts("prompts", prompts, model, extra_tokens=max_new_tokens)
    ctx = schedule.apply(model, positions=positions) if schedule is not None else nullcontext()
    with ctx, torch.no_grad():
        out = backend.get(model).generate_tokens(model, prompts, max_new_tokens=int(max_new_tokens))
    new = out[:, -int(max_new_tokens) :].cpu()
    pids = [model.to_tokens(p)[0].tolist() for p in prompts]
    texts = [model.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in new]
    return Continuations(prompts, pids, new, texts)


def _policy(positions: str) -> str:
    if positions not in POLICIES:
        raise InputError(f"positions: expected one of {POLICIES}, got {positions!r}")
    return positions


def _batch(model, cont: Continuations, n_new: int | None = None):
    """Right-padded prompt + continuation tokens, prompt lengths, total lengths."""
    n_new = cont.n_new if n_new is None else n_new
    seqs = [p + cont.new_ids[i, :n_new].tolist() for i, p in enumerate(cont.prompt_ids)]
    T = max(len(s) for s in seqs)
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None else 0
    pad = 0 if pad is None else pad
    tokens = torch.full((len(seqs), T), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    plen = torch.tensor([len(p) for p in cont.prompt_ids])
    tlen = torch.tensor([len(s) for s in seqs])
    return tokens.to(model.cfg.device), plen, tlen


def _masks(positions: str, plen, tlen, T: int, n_meas: int):
    """Steering mask [b, T] for the policy, and the measured positions [b, n_meas]."""
    pos = torch.arange(T)[None]
    last = (plen - 1)[:, None]
    if positions == "last":
        steer = pos == last
        meas = last
    elif positions == "generated":
        steer = (pos >= last) & (pos < tlen[:, None])
        meas = last + torch.arange(n_meas)[None]
    else:
        steer = pos < tlen[:, None]
        meas = last + torch.arange(n_meas)[None]
    return steer, meas


def final_states(
    model,
    cont: Continuations,
    vectors: Float[torch.Tensor, "L H"] | None,
    *,
    positions: str = "generated",
    alpha: float = 1.0,
    n_new: int | None = None,
    batch_size: int = 16,
) -> Float[torch.Tensor, "b n H"]:
    """x_L at the measured positions, with α·vectors added under the position policy.

    Measured positions: the last prompt token for "last", else the last prompt token and the
    first n_new - 1 continuation tokens (the n_new positions that predict the continuation).
    """
    check_model(model)
    positions = _policy(positions)
    batch_size = check_int("batch_size", batch_size, min=1)
    alpha = check_number("alpha", alpha)
    n_new = cont.n_new if n_new is None else check_int("n_new", n_new, min=1)
    n_meas = 1 if positions == "last" else n_new
    L = model.cfg.n_layers
    out = []
    for s in range(0, len(cont), batch_size):
        sub = cont.subset(range(s, min(s + batch_size, len(cont))))
        tokens, plen, tlen = _batch(model, sub, max(n_new - 1, 0))
        steer, meas = _masks(positions, plen, tlen, tokens.shape[1], n_meas)
        steer = steer.to(device=tokens.device, dtype=model.cfg.dtype)[:, :, None]
        got = {}

        def grab(resid, hook, meas=meas):
            rows = torch.arange(resid.shape[0], device=resid.device)[:, None]
            got["x"] = resid[rows, meas.to(resid.device)].detach()

        hooks = [(resid_post_name(L - 1), grab)]
        if vectors is not None:
            vec = vectors.to(device=tokens.device, dtype=model.cfg.dtype)
            for layer in (vec != 0).any(-1).nonzero().flatten().tolist():
                add = alpha * vec[layer]
                hooks.append((resid_pre_name(layer), lambda r, hook, a=add, m=steer: r + m * a))
        with torch.no_grad():
            backend.get(model).run_with_hooks(model, tokens, hooks, return_type=None)
        out.append(got["x"])
    x = torch.cat(out)
    if not torch.isfinite(x).all():
        raise NonFiniteError("final_states: non-finite residual states")
    return x


def measure_regime_shift(
    model,
    cont: Continuations,
    vectors,
    readout: Callable,
    *,
    positions: str = "generated",
    alpha: float = 1.0,
    n_new: int | None = None,
    clean: torch.Tensor | None = None,
    batch_size: int = 16,
) -> float:
    """Mean readout shift (steered − clean) over the measured positions and prompts."""
    batch_size = check_int("batch_size", batch_size, min=1)
    kw = dict(positions=positions, n_new=n_new, batch_size=batch_size)
    if clean is None:
        clean = readout(model, final_states(model, cont, None, **kw)).to(F64)
    y = readout(model, final_states(model, cont, vectors, alpha=alpha, **kw)).to(F64)
    return float((y - clean).mean())


def regime_kl(
    model,
    cont: Continuations,
    vectors,
    *,
    positions: str = "generated",
    n_new: int | None = None,
    batch_size: int = 8,
) -> float:
    """Mean KL(clean ‖ steered) of the next-token distribution over the measured positions."""
    batch_size = check_int("batch_size", batch_size, min=1)
    kw = dict(positions=positions, n_new=n_new, batch_size=batch_size)
    x0 = final_states(model, cont, None, **kw)
    x1 = final_states(model, cont, vectors, **kw)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(x0.shape[0]):
            lp0 = torch.log_softmax(full_logits(model, x0[i]).to(F64), -1)
            lp1 = torch.log_softmax(full_logits(model, x1[i]).to(F64), -1)
            total += float((lp0.exp() * (lp0 - lp1)).sum())
            count += x0.shape[1]
    return total / count


def continuation_scores(
    model, cont: Continuations, readout: Callable | None = None, *, batch_size: int = 8
) -> dict:
    """Under the UNSTEERED model: per-prompt mean NLL of the continuation tokens, and the
    readout at the last continuation token (the model's own reading of the finished text).

    Returns {"nll": Float[b], "n_tokens": int, "readout": Float[b] or None}.
    """
    check_model(model)
    batch_size = check_int("batch_size", batch_size, min=1)
    nll, ys = [], []
    L = model.cfg.n_layers
    for s in range(0, len(cont), batch_size):
        sub = cont.subset(range(s, min(s + batch_size, len(cont))))
        tokens, plen, tlen = _batch(model, sub)
        got = {}
        hooks = [(resid_post_name(L - 1), lambda r, hook: got.__setitem__("x", r))]
        with torch.no_grad():
            backend.get(model).run_with_hooks(model, tokens, hooks, return_type=None)
            for i in range(len(sub)):
                p, t = int(plen[i]), int(tlen[i])
                lp = torch.log_softmax(full_logits(model, got["x"][i, p - 1 : t - 1]).to(F64), -1)
                tgt = tokens[i, p:t]
                nll.append(float(-lp.gather(-1, tgt[:, None]).mean()))
        if readout is not None:
            rows = torch.arange(len(sub), device=tokens.device)
            x = got["x"][rows, (tlen - 1).to(tokens.device)]
            ys.append(readout(model, x).to(F64).cpu())
    return {
        "nll": torch.tensor(nll, dtype=F64),
        "n_tokens": cont.n_new,
        "readout": torch.cat(ys) if ys else None,
    }


# ------------------------------------------------------------------------------ calibration


@dataclass(frozen=True)
class RegimeCalibration:
    """A schedule rescaled on the full model in the regime of use.

    Attributes:
        schedule: the calibrated schedule (multiplier applied).
        multiplier: the factor found.
        measured_shift: the readout shift it gives (mean over measured positions).
        target: the raw readout shift asked for.
        positions: the position policy it was calibrated (and is to be applied) under.
        n_new: continuation tokens measured (1 for "last").
        n_prompts: calibration prompts.
        evaluations: full-model evaluations used.
    """

    schedule: object
    multiplier: float
    measured_shift: float
    target: float
    positions: str
    n_new: int
    n_prompts: int
    evaluations: int
    meta: dict = field(default_factory=dict)

    def to_meta(self) -> dict:
        return {
            "multiplier": self.multiplier,
            "measured_shift": self.measured_shift,
            "target": self.target,
            "positions": self.positions,
            "n_new": self.n_new,
            "n_prompts": self.n_prompts,
            "evaluations": self.evaluations,
        }


def bisect_multiplier(
    f: Callable[[float], float],
    target: float,
    *,
    tol: float = 1e-2,
    max_multiplier: float = 1024.0,
    max_evaluations: int = 40,
    secant: bool = True,
) -> tuple[float, float, int]:
    """α with f(α) = target (relative `tol`), f(0) = 0: bracket [0, 1] doubling, then bisect
    (with `secant`, a secant step where it falls well inside the bracket; without, plain
    bisection: dyadic multipliers, identical across backends whose f agree to round-off).
    The one root finder of `steerlin.calibrate` (plain) and `Controller.calibrate`.

    Returns (α, f(α), evaluations); UnreachableTargetError if no bracket is found.
    """
    target = check_number("target", target)
    tol = check_number("tol", tol, positive=True)
    max_evaluations = check_int("max_evaluations", max_evaluations, min=1)
    evals = 0
    lo, f_lo = 0.0, 0.0
    hi = 1.0
    f_hi = f(hi)
    evals += 1
    best = (abs(f_hi - target), hi, f_hi)
    while (f_hi - target) * (f_lo - target) > 0:
        if abs(f_hi - target) <= tol * abs(target):
            return hi, f_hi, evals
        if hi >= max_multiplier or evals >= max_evaluations:
            raise UnreachableTargetError(
                f"calibrate: no multiplier in [0, {hi:g}] reaches the target shift {target:g}; "
                f"the closest was {best[2]:.4g} at multiplier {best[1]:.4g} after {evals} "
                "full-model evaluations (the model saturates or reverses along this schedule)"
            )
        lo, f_lo = hi, f_hi
        hi *= 2
        f_hi = f(hi)
        evals += 1
        best = min(best, (abs(f_hi - target), hi, f_hi))
    a, fa = hi, f_hi
    while abs(fa - target) > tol * abs(target) and evals < max_evaluations:
        # secant step inside the bracket when it is well inside, else bisection
        mid = (lo + hi) / 2
        if secant and f_hi != f_lo:
            sec = lo + (target - f_lo) * (hi - lo) / (f_hi - f_lo)
            if lo + 0.05 * (hi - lo) < sec < hi - 0.05 * (hi - lo):
                mid = sec
        fm = f(mid)
        evals += 1
        if (fm - target) * (f_lo - target) > 0:
            lo, f_lo = mid, fm
        else:
            hi, f_hi = mid, fm
        a, fa = mid, fm
    if abs(fa - target) > tol * abs(target):
        raise UnreachableTargetError(
            f"calibrate: bisection stopped after {evals} evaluations at shift {fa:.6g} "
            f"(target {target:g}, tol {tol:g})"
        )
    return a, fa, evals


def calibrate_regime(
    model,
    prompts,
    schedule,
    target: float,
    readout: Callable,
    *,
    positions: str = "generated",
    n_new: int = 8,
    tol: float = 1e-2,
    max_multiplier: float = 1024.0,
    batch_size: int = 16,
) -> RegimeCalibration:
    """Rescale `schedule` so its mean readout shift, measured in the regime of use, is `target`.

    prompts: strings (their unsteered greedy continuations of n_new tokens are generated once)
    or a `Continuations`. The readout is measured at the last prompt token ("last") or at the
    n_new positions that predict the continuation ("generated", "all"); see the module
    docstring.
    """
    check_model(model)
    positions = _policy(positions)
    target = check_number("target", target)
    if target == 0:
        raise InputError(f"target: expected a finite non-zero shift, got {target}")
    n_new = check_int("n_tokens", n_new, min=1)
    tol = check_number("tol", tol, positive=True)
    max_multiplier = check_number("max_multiplier", max_multiplier, min=1.0)
    batch_size = check_int("batch_size", batch_size, min=1)
    if not callable(readout):
        raise InputError(f"readout: expected a Readout (callable), got {readout!r}")
    if not schedule.layers:
        raise InputError("schedule: all amplitudes are zero; nothing to calibrate")
    schedule.check_for(model)
    if isinstance(prompts, Continuations):
        cont = prompts
        n_new = min(n_new, cont.n_new)
    else:
        n_gen = 1 if positions == "last" else n_new
        prompts = check_text_prompts("prompts", prompts, model, extra_tokens=n_gen)
        cont = generate(model, prompts, n_gen)
    n_used = 1 if positions == "last" else n_new
    kw = dict(positions=positions, n_new=n_used, batch_size=batch_size)
    clean = readout(model, final_states(model, cont, None, **kw)).to(F64)
    vec = schedule.vectors
    f = lambda a: measure_regime_shift(model, cont, vec, readout, alpha=a, clean=clean, **kw)
    a, fa, evals = bisect_multiplier(f, target, tol=tol, max_multiplier=max_multiplier)
    cal = schedule.scaled(
        a, calibrated=True, measured_shift=fa, multiplier=a, positions=positions, n_new=n_used
    )
    return RegimeCalibration(cal, a, fa, target, positions, n_used, len(cont), evals)


__all__ = [
    "POLICIES",
    "Continuations",
    "generate",
    "final_states",
    "measure_regime_shift",
    "regime_kl",
    "continuation_scores",
    "RegimeCalibration",
    "bisect_multiplier",
    "calibrate_regime",
]
