"""The full model run with a schedule: one measurement primitive, one calibration.

Every full-model measurement in steerlin is `run_schedule`: one batched forward over
right-padded token sequences with α·v_l added to x_l (the input of block l) at the positions a
mask selects, reading the residual states x_l of chosen layers at chosen positions. Capture (no
schedule, every layer at the last token), the hook scan of the gains (one layer, last token),
`measure_shift(method="hooks")`, the teacher-forced regime measurements (`final_states`), the
KL along continuations and the continuation scores are all this one call.

Position policies (`steerlin.regime`): "last" steers and reads the last prompt token;
"generated" steers the last prompt token and every continuation token of the prompts'
unsteered greedy continuations (what `apply` does under `model.generate`), read at the n
positions that predict the continuation; "all" steers every position, read at the same n.

`calibrate` bisects one multiplier α until the measured mean readout shift equals the target:

    find α with  ȳ(α·u) − ȳ(0) = Δy*,   bracket [0, 1] doubled up to max_multiplier, then
    bisection to |ȳ − Δy*| ≤ tol·|Δy*| (plain bisection: dyadic α, identical on backends
    whose measurements agree to round-off).

positions="last" is the paper's procedure (method="cached": single-token block passes on the
frozen clean context, exact for a causal decoder; "hooks": full forwards); "generated" and
"all" measure in the regime of use. One result type, `Calibration`; one set of defaults
(`TOL`, `MAX_EVALUATIONS`, `MAX_MULTIPLIER`) for `steerlin.calibrate`, `Controller.calibrate`
and every benchmark.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from jaxtyping import Bool, Float, Int

from . import backend
from .backend import Model, check_model
from .errors import InputError, NonFiniteError, UnreachableTargetError
from .frozen import ContextPool, compute_dtype, iter_contexts
from .hooks import resid_pre_name, state_hook_names
from .readouts import full_logits, logit_kl, schedule_readouts
from .regime import Continuations, batch_tokens, check_policy, generate, position_masks
from .tokens import PromptsLike, iter_batches, pad_id, tokenize
from .validate import check_int, check_number, check_schedule, check_text_prompts

METHODS = ("cached", "hooks")
TOL = 1e-3  # relative tolerance on the measured shift
MAX_EVALUATIONS = 60
MAX_MULTIPLIER = 1024.0
F64 = torch.float64


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InputError(f"method: expected one of {METHODS}, got {method!r}")
    return method


# ----------------------------------------------------------------------------- the primitive


def run_schedule(
    model: Model,
    tokens: Int[torch.Tensor, "b T"],
    *,
    read: Sequence[int] = (-1,),
    at: Int[torch.Tensor, "b n"] | None = None,
    vectors: Float[torch.Tensor, "L H"] | None = None,
    alpha: float = 1.0,
    steer: Bool[torch.Tensor, "b T"] | None = None,
) -> Float[torch.Tensor, "b r n H"]:
    """One forward of `tokens` with α·vectors[l] added to x_l where `steer` is true (every
    position if None), returning x_l for l in `read` (state indices 0..L, negative from the
    end) at the positions `at` (every position if None). No gradients; states stay on the
    model's device."""
    L = model.cfg.n_layers
    names = state_hook_names(L)
    read = [int(r) % (L + 1) for r in read]
    got: dict[int, torch.Tensor] = {}
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
    at = None if at is None else at.to(tokens.device)

    def reader(j: int):
        def hook(resid, hook):
            got[j] = (resid if at is None else resid[rows, at]).detach()

        return hook

    hooks = []
    if vectors is not None:
        vec = vectors.to(device=tokens.device, dtype=model.cfg.dtype)
        mask = 1.0 if steer is None else steer.to(tokens.device, model.cfg.dtype)[:, :, None]
        for layer in (vec != 0).any(-1).nonzero().flatten().tolist():
            add = alpha * vec[layer]
            hooks.append((resid_pre_name(layer), lambda r, hook, a=add: r + mask * a))
    hooks += [(names[j], reader(j)) for j in read]  # after the additions: reads see them
    with torch.no_grad():
        backend.get(model).run_with_hooks(model, tokens, hooks, return_type=None)
    return torch.stack([got[j] for j in read], dim=1)


def last_token_states(
    model: Model,
    batch,
    *,
    read: Sequence[int] = (-1,),
    vectors: Float[torch.Tensor, "L H"] | None = None,
    alpha: float = 1.0,
) -> Float[torch.Tensor, "b r H"]:
    """x_l at each prompt's last real token of a right-padded `tokens.Batch`, with the
    schedule (if any) added at that token only (position policy "last")."""
    last = (batch.lengths - 1).to(batch.tokens.device)
    steer = torch.arange(batch.tokens.shape[1], device=batch.tokens.device)[None] == last[:, None]
    x = run_schedule(
        model, batch.tokens, read=read, at=last[:, None], vectors=vectors, alpha=alpha, steer=steer
    )
    return x[:, :, 0]


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
    """x_L at the measured positions of the continuations, α·vectors added under the policy.

    Measured positions: the last prompt token for "last", else the last prompt token and the
    first n_new - 1 continuation tokens (the n_new positions that predict the continuation).
    """
    check_model(model)
    positions = check_policy(positions)
    batch_size = check_int("batch_size", batch_size, min=1)
    alpha = check_number("alpha", alpha)
    n_new = cont.n_new if n_new is None else check_int("n_new", n_new, min=1)
    n_meas = 1 if positions == "last" else n_new
    out = []
    for s in range(0, len(cont), batch_size):
        sub = cont.subset(range(s, min(s + batch_size, len(cont))))
        tokens, plen, tlen = batch_tokens(model, sub, max(n_new - 1, 0))
        steer, meas = position_masks(positions, plen, tlen, tokens.shape[1], n_meas)
        x = run_schedule(model, tokens, at=meas, vectors=vectors, alpha=alpha, steer=steer)
        out.append(x[:, 0])
    x = torch.cat(out)
    if not torch.isfinite(x).all():
        raise NonFiniteError("final_states: non-finite residual states")
    return x


# ----------------------------------------------------------------------------- measurements


def _shift_contexts(model, contexts, vectors, readouts, alphas) -> torch.Tensor:
    """Mean readout shifts [m, r] for schedule multipliers `alphas` (cached single-token path;
    `contexts`: any iterable of frozen contexts, e.g. streamed batch by batch)."""
    dt = compute_dtype(model)  # float32 for a half-precision model (its maps' dtype)
    alphas = torch.as_tensor(alphas, dtype=dt, device=model.cfg.device)
    m = alphas.shape[0]
    total = torch.zeros(m, len(readouts), dtype=F64)
    n = 0
    vec = vectors.to(device=model.cfg.device, dtype=dt)
    active = (vec != 0).any(-1)
    with torch.no_grad():
        for ctx in contexts:
            x0 = ctx.states[:, -1]
            z = ctx.states[:, 0][:, None, :].expand(-1, m, -1)  # [b, m, H]
            for layer in range(ctx.n_layers):
                if active[layer]:
                    z = z + alphas[None, :, None] * vec[layer]
                z = ctx.block_many(layer, z)
            for j, rd in enumerate(readouts):
                dy = rd(model, z) - rd(model, x0)[:, None]  # [b, m]
                total[:, j] += dy.to("cpu", F64).sum(0)
            n += len(ctx)
    out = total / n
    if not torch.isfinite(out).all():
        raise NonFiniteError("schedule shift: non-finite readout")
    return out


def _shift_hooks(model, ids, vectors, readouts, alpha, batch_size) -> torch.Tensor:
    """Mean readout shifts [r] for one multiplier, last-token policy, full forwards."""
    total = torch.zeros(len(readouts), dtype=F64)
    for bt in iter_batches(ids, batch_size, pad=pad_id(model), device=model.cfg.device):
        x0 = last_token_states(model, bt)[:, 0]
        x1 = last_token_states(model, bt, vectors=vectors, alpha=alpha)[:, 0]
        for j, rd in enumerate(readouts):
            total[j] += (rd(model, x1) - rd(model, x0)).to("cpu", F64).sum()
    return total / len(ids)


def measure_shift(
    model: Model,
    prompts: PromptsLike,
    schedule,
    *,
    readout=None,
    label_words: Sequence[str] | Sequence[int] | None = None,
    method: str = "cached",
    batch_size: int = 16,
    engine: str = "auto",
) -> torch.Tensor:
    """Full-model mean readout shift(s) Float[r] that `schedule` causes at the last token.

    method="cached": frozen contexts (engine: see `steerlin.frozen`); "hooks": full forwards."""
    check_model(model)
    check_schedule("schedule", schedule)
    schedule.check_for(model)
    check_method(method)
    batch_size = check_int("batch_size", batch_size, min=1)
    rds = schedule_readouts(model, schedule, readout, label_words)
    if method == "hooks":
        ids = tokenize(model, prompts)
        return _shift_hooks(model, ids, schedule.vectors, rds, 1.0, batch_size)
    contexts = iter_contexts(model, prompts, batch_size=batch_size, engine=engine)  # streamed
    return _shift_contexts(model, contexts, schedule.vectors, rds, [1.0])[0]


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


def kl_between(
    model,
    clean: Continuations,
    other: Continuations,
    vectors=None,
    *,
    positions: str = "generated",
    n_new: int | None = None,
    batch_size: int = 8,
) -> float:
    """Mean KL(clean ‖ other) of the next-token distribution at the measured positions that
    predict the same continuation tokens: `other` holds the same continuations after other
    prompt ids (e.g. with an instruction prefix), steered by `vectors` if given."""
    batch_size = check_int("batch_size", batch_size, min=1)
    kw = dict(positions=positions, n_new=n_new, batch_size=batch_size)
    x0 = final_states(model, clean, None, **kw)
    x1 = final_states(model, other, vectors, **kw)
    return float(logit_kl(model, x0, x1).mean())


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
    kw = dict(positions=positions, n_new=n_new, batch_size=batch_size)
    return float(measured_token_kl(model, cont, vectors, **kw).mean())


def measured_token_kl(
    model,
    cont: Continuations,
    vectors,
    *,
    positions: str = "generated",
    n_new: int | None = None,
    batch_size: int = 8,
    clean: torch.Tensor | None = None,
) -> Float[torch.Tensor, " N"]:
    """Measured per-token KL(clean ‖ steered) at the measured positions (prompt-major);
    `clean`: the unsteered `final_states` already computed (same policy and n_new)."""
    batch_size = check_int("batch_size", batch_size, min=1)
    kw = dict(positions=positions, n_new=n_new, batch_size=batch_size)
    x0 = final_states(model, cont, None, **kw) if clean is None else clean
    x1 = final_states(model, cont, vectors, **kw)
    return logit_kl(model, x0, x1).reshape(-1)


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
    for s in range(0, len(cont), batch_size):
        sub = cont.subset(range(s, min(s + batch_size, len(cont))))
        tokens, plen, tlen = batch_tokens(model, sub)
        x = run_schedule(model, tokens)[:, 0]  # [b, T, H]
        with torch.no_grad():
            for i in range(len(sub)):
                p, t = int(plen[i]), int(tlen[i])
                lp = torch.log_softmax(full_logits(model, x[i, p - 1 : t - 1]).to(F64), -1)
                nll.append(float(-lp.gather(-1, tokens[i, p:t, None]).mean()))
        if readout is not None:
            rows = torch.arange(len(sub), device=tokens.device)
            ys.append(readout(model, x[rows, (tlen - 1).to(tokens.device)]).to(F64).cpu())
    return {
        "nll": torch.tensor(nll, dtype=F64),
        "n_tokens": cont.n_new,
        "readout": torch.cat(ys) if ys else None,
    }


# ----------------------------------------------------------------------------- calibration


def bisect_multiplier(
    f: Callable[[float], float],
    target: float,
    *,
    tol: float = TOL,
    max_multiplier: float = MAX_MULTIPLIER,
    max_evaluations: int = MAX_EVALUATIONS,
) -> tuple[float, float, int]:
    """α with f(α) = target (relative `tol`), f(0) = 0: the bracket [0, 1] doubles until it
    holds the target, then plain bisection (see the module docstring).

    Returns (α, f(α), evaluations); UnreachableTargetError if no bracket is found.
    """
    target = check_number("target", target)
    tol = check_number("tol", tol, positive=True)
    max_evaluations = check_int("max_evaluations", max_evaluations, min=1)
    lo, f_lo, hi = 0.0, 0.0, 1.0
    f_hi = f(hi)
    evals = 1
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
        mid = (lo + hi) / 2
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


@dataclass(frozen=True)
class Calibration:
    """A schedule rescaled on the full model: the result of `calibrate`.

    Attributes:
        schedule: the calibrated schedule (multiplier applied; its meta records the regime).
        multiplier: the factor α found.
        measured_shift: the mean readout shift it gives (over the measured positions).
        evaluations: full-model evaluations used.
        target: the raw readout shift asked for.
        positions: the position policy it was measured (and is to be applied) under.
        n_new: continuation positions measured (1 for "last").
        n_prompts: calibration prompts.
    """

    schedule: object
    multiplier: float
    measured_shift: float
    evaluations: int
    target: float
    positions: str = "last"
    n_new: int = 1
    n_prompts: int = 0

    def to_meta(self) -> dict:
        """Every field but the schedule (JSON-ready numbers and strings)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "schedule"}


def _schedule_separation(schedule) -> float | None:
    """One class separation of the schedule's readout (raw units), where a Controller stored it."""
    tu = (getattr(schedule, "meta", None) or {}).get("target_units")
    sep = tu.get("separation") if isinstance(tu, dict) else None
    return None if sep is None else float(sep)


def raw_target(target: float, units: str | None, separation: float | None, where: str) -> float:
    """A target in `units` ("raw" readout units or "separations", one = `separation` raw) as a
    raw readout shift. units=None is the old default, raw, with a DeprecationWarning where a
    class separation is known (the default becomes "separations" there in the next release)."""
    if units is None:
        if separation is not None:
            warnings.warn(
                f"{where}: target={target:g} is read in raw readout units because units= was not "
                f"given; pass units='raw' to keep that, or units='separations' (one = "
                f"{separation:.4g} raw here). The default becomes 'separations' where a class "
                "separation is known in the next release",
                DeprecationWarning,
                stacklevel=3,
            )
        return target
    if units == "raw":
        return target
    if units != "separations":
        raise InputError(f"units: expected 'raw' or 'separations', got {units!r}")
    if separation is None or separation == 0:
        raise InputError(
            "units='separations': this schedule carries no class separation (not built by a "
            "Controller from class-mean directions); pass units='raw'"
        )
    return target * separation


def calibrate(
    model: Model,
    prompts,
    schedule,
    target: float,
    *,
    units: str | None = None,
    readout=None,
    label_words: Sequence[str] | Sequence[int] | None = None,
    positions: str = "last",
    n_tokens: int = 8,
    method: str | None = None,
    tol: float = TOL,
    max_multiplier: float = MAX_MULTIPLIER,
    max_evaluations: int = MAX_EVALUATIONS,
    batch_size: int = 16,
    engine: str = "auto",
    context_memory: int = 256 * 2**20,
) -> Calibration:
    """Rescale `schedule` by one multiplier until the full model's mean readout shift equals
    `target` (to `tol` relative), measured under the position policy `positions`.

    units: "raw" (readout units) or "separations" (class separations, for a schedule a
    Controller made: its meta records one separation in raw units). Not given: raw, as before,
    with a DeprecationWarning when the schedule knows its separation (the default becomes
    "separations" there in the next release). `Calibration.target` is always raw.

    positions="last" (the paper's procedure): the shift at each prompt's last token;
    method="cached" (default) on frozen contexts (`engine`, see `steerlin.frozen`; batches up to
    `context_memory` bytes are kept across evaluations, and `prompts` may be a `ContextPool`
    already built, to calibrate several schedules on it), "hooks" with full forwards.
    positions="generated"/"all": the regime of use (module docstring): `prompts` are texts
    (their unsteered greedy continuations of `n_tokens` tokens are generated once) or a
    `regime.Continuations`; measured by teacher-forced full forwards (method "hooks").
    The bracket starts at [0, 1] (α = 1: the schedule as given) and doubles up to
    `max_multiplier`; with no sign change there, UnreachableTargetError says how far it got.
    """
    check_model(model)
    check_schedule("schedule", schedule)
    schedule.check_for(model)
    target = check_number("target", target)
    if target == 0:
        raise InputError(f"target: expected a finite non-zero shift, got {target}")
    target = raw_target(target, units, _schedule_separation(schedule), "calibrate")
    positions = check_policy(positions)
    n_tokens = check_int("n_tokens", n_tokens, min=1)
    tol = check_number("tol", tol, positive=True)
    max_multiplier = check_number("max_multiplier", max_multiplier, min=1.0)
    max_evaluations = check_int("max_evaluations", max_evaluations, min=1)
    batch_size = check_int("batch_size", batch_size, min=1)
    context_memory = check_int("context_memory", context_memory, min=0)
    method = check_method("cached" if method is None and positions == "last" else method or "hooks")
    if positions != "last" and method == "cached":
        raise InputError(
            f'method: positions="{positions}" is measured with full forwards; use method="hooks"'
        )
    if not schedule.layers:
        raise InputError("schedule: all amplitudes are zero; nothing to calibrate")
    rd = schedule_readouts(model, schedule, readout, label_words)[0]
    if isinstance(prompts, ContextPool) and method != "cached":
        raise InputError('prompts: a ContextPool is for method="cached"; pass the prompts')
    vec = schedule.vectors
    if positions == "last":
        n_new = 1
        if isinstance(prompts, Continuations):
            prompts = prompts.prompt_ids
        if method == "cached":
            pool = prompts
            if not isinstance(prompts, ContextPool):
                pool = ContextPool(
                    model, prompts, batch_size=batch_size, engine=engine, budget=context_memory
                )
            n = pool.n_prompts
            f = lambda a: float(_shift_contexts(model, pool, vec, [rd], [a])[0, 0])
        else:
            ids = tokenize(model, prompts)
            n = len(ids)
            f = lambda a: float(_shift_hooks(model, ids, vec, [rd], a, batch_size)[0])
    else:
        if isinstance(prompts, Continuations):
            cont = prompts
            n_new = min(n_tokens, cont.n_new)
        else:
            prompts = check_text_prompts("prompts", prompts, model, extra_tokens=n_tokens)
            cont = generate(model, prompts, n_tokens)
            n_new = n_tokens
        n = len(cont)
        kw = dict(positions=positions, n_new=n_new, batch_size=batch_size)
        clean = rd(model, final_states(model, cont, None, **kw)).to(F64)
        f = lambda a: measure_regime_shift(model, cont, vec, rd, alpha=a, clean=clean, **kw)
    a, fa, evals = bisect_multiplier(
        f, target, tol=tol, max_multiplier=max_multiplier, max_evaluations=max_evaluations
    )
    cal = schedule.scaled(
        a, calibrated=True, measured_shift=fa, multiplier=a, positions=positions, n_new=n_new
    )
    return Calibration(cal, a, fa, evals, target, positions, n_new, n)


RegimeCalibration = Calibration  # the name `Controller.calibrate`'s result had before


__all__ = [
    "METHODS",
    "TOL",
    "MAX_EVALUATIONS",
    "MAX_MULTIPLIER",
    "run_schedule",
    "last_token_states",
    "final_states",
    "measure_shift",
    "measure_regime_shift",
    "kl_between",
    "regime_kl",
    "measured_token_kl",
    "continuation_scores",
    "bisect_multiplier",
    "raw_target",
    "Calibration",
    "RegimeCalibration",
    "calibrate",
]
