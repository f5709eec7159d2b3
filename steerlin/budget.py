"""A KL budget as a target: a schedule's amplitude from the Fisher of its injection, in the
regime it is used in, instead of a bisection.

A schedule injects α·u_l·b_l into x_l (b_l = scale_l unit_l) at the last prompt token and at
every generated token ("generated", what `apply` does under `model.generate`), and the steered
keys/values of earlier positions feed later ones (attention not frozen). Along the prompts'
unsteered greedy continuations, teacher-forced, the next-token logits at measured position i
move by δz_i ≈ α Σ_l u_l r_il, r_il = ∂z_i/∂(injection amplitude at l), and

    KL_i(α) = KL(π_i ‖ π_i') ≈ ½ α² uᵀ F_i u,    F_i[l, m] = ⟨r_il, r_im⟩_G,
    G = diag(π_i) − π_i π_iᵀ

(first order in the logits, exact as α → 0). `regime_fisher` computes every F_i from forward-mode
JVPs of full teacher-forced forwards, one tangent per injection layer (the layers folded into
the batch), no frozen context: the tangent crosses attention to later positions as the
injection does. The budget's statistic of the per-token KL, mean (default) or the 95th
percentile along the rollout ("p95"), is then a²·stat_i(½uᵀF_i u) for the schedule times a, so

    a = sqrt(budget / stat_i(½ uᵀ F_i u))

is solved, not searched. `size_to_kl` does that and, optionally, one measured correction: one
steered run at a, then a ← a·sqrt(budget / measured) (KL ∝ a² to first order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.autograd.forward_ad as fwAD
from jaxtyping import Float

from . import backend
from .backend import check_model
from .errors import InputError
from .hooks import resid_post_name, resid_pre_name
from .measure import measured_token_kl
from .readouts import full_logits
from .regime import Continuations, batch_tokens, check_policy, generate, position_masks
from .validate import check_int, check_number, check_schedule, check_text_prompts

F64 = torch.float64
STATS = ("mean", "p95")


class _Stop(Exception):
    """Raised by the read hook after the last block: the unembedding is not needed."""


def check_budget(name: str, value) -> float:
    """A KL budget: a positive finite number of nats per token."""
    return check_number(name, value, positive=True)


def check_stat(name: str, value) -> str:
    if value not in STATS:
        raise InputError(f"{name}: expected one of {STATS}, got {value!r}")
    return value


def kl_stat(kl: torch.Tensor, stat: str) -> float:
    """The budget's statistic of per-token KLs: "mean" or "p95" (95th percentile)."""
    kl = kl.reshape(-1).to(F64)
    return float(kl.mean() if stat == "mean" else torch.quantile(kl, 0.95))


def _logit_jvps(model, x: torch.Tensor, t: torch.Tensor, chunk: int = 8):
    """Per chunk of `chunk` positions: (start, z [c, V], π [c, V], R [c, L, V]), float64 on the
    model's device: the clean logits, their softmax and the logit tangents R_l = ∂z/∂(amplitude at
    l) from x [N, H] clean final states and t [N, L, H] their tangents per injection layer
    (through the final norm, unembedding and soft-cap), one vectorised JVP per chunk."""
    N = t.shape[0]
    f = lambda y: full_logits(model, y)
    per_layer = lambda y, ts: torch.func.vmap(lambda v: torch.func.jvp(f, (y,), (v,)))(ts)
    for s in range(0, N, chunk):
        z, R = torch.func.vmap(per_layer)(x[s : s + chunk], t[s : s + chunk])
        z = z[:, 0]  # the same clean logits for every tangent
        z = z.to(F64)
        yield s, z, torch.softmax(z, -1), R.to(F64)


def _fisher_chunk(pi: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """RᵀGR per position [c, L, L] of one `_logit_jvps` chunk, G = diag(π) − ππᵀ."""
    m = torch.einsum("clv,cv->cl", R, pi)
    return torch.einsum("clv,cv,cmv->clm", R, pi, R) - m[:, :, None] * m[:, None, :]


def _fisher_tokens(model, x: torch.Tensor, t: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Per-position F_i = RᵢᵀGᵢRᵢ [N, L, L]: x [N, H] clean final states, t [N, L, H] the
    tangents of x per injection layer (through the final norm, unembedding and soft-cap),
    `chunk` positions per vectorised JVP."""
    N, L = t.shape[:2]
    out = torch.zeros(N, L, L, dtype=F64)
    for s, _, pi, R in _logit_jvps(model, x, t, chunk):
        out[s : s + pi.shape[0]] = _fisher_chunk(pi, R).cpu()
    return 0.5 * (out + out.transpose(1, 2))


def _tangent_forward(model, tokens, steer, meas, b: torch.Tensor):
    """Clean final states [B, n, H] and their tangents [B, L, n, H] for one unit injection
    b_l at every steered position, one tangent per layer l (the L tangents folded into the
    batch: row block l carries layer l's tangent)."""
    B, T = tokens.shape
    L, H = b.shape
    dt = model.cfg.dtype
    rep = tokens.repeat(L, 1)  # [L*B, T], block l = layer l's tangent
    mask = steer.to(tokens.device, dt).repeat(L, 1)[:, :, None]
    rows = torch.arange(L * B, device=tokens.device)[:, None]
    at = meas.to(tokens.device).repeat(L, 1)
    got = {}

    def inject(layer: int):
        tan = torch.zeros(L * B, 1, H, dtype=dt, device=tokens.device)
        tan[layer * B : (layer + 1) * B] = b[layer].to(tan)

        def hook(resid, hook):
            zero = fwAD.make_dual(torch.zeros_like(tan), tan)
            return resid + mask * zero

        return hook

    def read(resid, hook):
        p, tg = fwAD.unpack_dual(resid[rows, at])
        got["x"] = p.detach()
        got["t"] = None if tg is None else tg.detach()
        raise _Stop

    hooks = [(resid_pre_name(layer), inject(layer)) for layer in range(L)]
    hooks.append((resid_post_name(L - 1), read))
    with torch.no_grad(), fwAD.dual_level():
        try:
            backend.get(model).run_with_hooks(model, rep, hooks, return_type=None)
        except _Stop:
            pass
    if got.get("t") is None:
        raise InputError("regime_fisher: the forward carried no tangent (forward-mode AD)")
    n = at.shape[1]
    x = got["x"].reshape(L, B, n, H)[0]
    t = got["t"].reshape(L, B, n, H).permute(1, 0, 2, 3)
    return x, t


def _tangent_batches(model, cont: Continuations, bm, positions, n_new, n_meas, batch_size):
    """Per batch of `batch_size` prompts of `cont` (teacher-forced, `n_new` new tokens): the
    clean final states [B, n, H] at the measured positions and, flattened per position, the
    states [B·n, H] and their tangents [B·n, L, H] for unit injections bm [L, H]."""
    L = bm.shape[0]
    for s in range(0, len(cont), batch_size):
        sub = cont.subset(range(s, min(s + batch_size, len(cont))))
        tokens, plen, tlen = batch_tokens(model, sub, max(n_new - 1, 0))
        steer, meas = position_masks(positions, plen, tlen, tokens.shape[1], n_meas)
        x, t = _tangent_forward(model, tokens, steer, meas, bm)  # [B, n, H], [B, L, n, H]
        flat_t = t.permute(0, 2, 1, 3).reshape(-1, L, t.shape[-1])
        yield x, x.reshape(-1, x.shape[-1]), flat_t


@dataclass(frozen=True)
class RegimeFisher:
    """Per-token Fisher of unit injections b_l along teacher-forced continuations.

    Attributes:
        F: Float[N, L, L], one matrix per measured position (prompt-major, N = prompts · n_new).
        b: Float[L, H] the injection vectors F is per unit of (b_l = scale_l unit_l).
        positions: the position policy ("generated" by default).
        n_new: measured positions per prompt.
        n_prompts: prompts.
        clean: Float[n_prompts, n_new, H] the unsteered final states at the measured positions
            (the forwards' primal, what `final_states` returns; the baseline of a measured KL).
    """

    F: torch.Tensor
    b: torch.Tensor
    positions: str
    n_new: int
    n_prompts: int
    clean: torch.Tensor | None = None

    def token_kl(self, u) -> Float[torch.Tensor, " N"]:
        """Predicted per-token KL ½uᵀF_i u of amplitudes u [L] (first order)."""
        u = torch.as_tensor(u, dtype=F64)
        return 0.5 * torch.einsum("l,nlm,m->n", u, self.F, u)

    def predict(self, u, stat: str = "mean") -> float:
        return kl_stat(self.token_kl(u), check_stat("stat", stat))

    @property
    def mean(self) -> Float[torch.Tensor, "L L"]:
        """The mean F over positions and prompts (the metric of the mean KL)."""
        return self.F.mean(0)


def regime_fisher(
    model,
    cont: Continuations,
    b: Float[torch.Tensor, "L H"],
    *,
    positions: str = "generated",
    n_new: int | None = None,
    batch_size: int = 2,
) -> RegimeFisher:
    """The per-token Fisher of injections b_l in the regime `positions` along `cont`.

    Forward-mode JVPs through full teacher-forced forwards (attention not frozen): per batch of
    prompts one forward of L·batch rows, row block l carrying the tangent of a unit injection
    at layer l at every steered position. Measured at the positions `final_states` measures.
    """
    check_model(model)
    positions = check_policy(positions)
    batch_size = check_int("batch_size", batch_size, min=1)
    L = model.cfg.n_layers
    b = torch.as_tensor(b).detach()
    if b.shape != (L, model.cfg.d_model):
        raise InputError(f"b: expected [{L}, {model.cfg.d_model}], got {tuple(b.shape)}")
    if len(cont) == 0:
        raise InputError("prompts: expected at least one prompt, got none")
    n_new = cont.n_new if n_new is None else check_int("n_new", n_new, min=1)
    n_meas = 1 if positions == "last" else n_new
    bm = b.to(model.cfg.device, model.cfg.dtype)
    Fs, xs = [], []
    for xb, x, t in _tangent_batches(model, cont, bm, positions, n_new, n_meas, batch_size):
        xs.append(xb)
        Fs.append(_fisher_tokens(model, x, t))
    F = torch.cat(Fs)
    if not torch.isfinite(F).all():
        raise InputError("regime_fisher: non-finite Fisher (the model's logits overflow?)")
    return RegimeFisher(F, b.to("cpu", F64), positions, n_meas, len(cont), torch.cat(xs))


@dataclass(frozen=True)
class KLCalibration:
    """A schedule sized to a KL budget (`size_to_kl`).

    Attributes:
        schedule: the sized schedule (its meta records the budget and the predictions).
        multiplier: the factor applied to the given schedule's amplitudes.
        budget: the KL asked for (nats per token).
        stat: "mean" or "p95" of the per-token KL along the rollouts.
        predicted_kl: first-order {"mean", "p95"} at the first-order multiplier (the budget's
            own statistic equals the budget there).
        measured_kl: {"mean", "p95"} measured in one steered run at the first-order multiplier
            (only with `correct`; else None).
        correction: the factor sqrt(budget / measured) applied after that run (None without).
        evaluations: steered full-model runs used (0, or 1 with `correct`).
        positions, n_new, n_prompts: the regime and the calibration prompts.
    """

    schedule: object
    multiplier: float
    budget: float
    stat: str
    predicted_kl: dict
    measured_kl: dict | None
    correction: float | None
    evaluations: int
    positions: str = "generated"
    n_new: int = 1
    n_prompts: int = 0

    def to_meta(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "schedule"}


def continuations(model, prompts, n_tokens: int) -> Continuations:
    """`prompts` as unsteered greedy continuations (texts are generated once)."""
    if isinstance(prompts, Continuations):
        return prompts
    n_tokens = check_int("n_tokens", n_tokens, min=1)
    prompts = check_text_prompts("prompts", prompts, model, extra_tokens=n_tokens)
    return generate(model, prompts, n_tokens)


def schedule_fisher(
    model, prompts, schedule, *, positions="generated", n_tokens=8, batch_size=2
) -> RegimeFisher:
    """`regime_fisher` for the injection vectors b_l = scale_l unit_l of a one-concept schedule
    (reuse it for every schedule along the same directions: `size_to_kl(..., fisher=)`)."""
    check_schedule("schedule", schedule)
    if schedule.n_concepts != 1:
        raise InputError("schedule: a KL budget sizes one concept's schedule at a time")
    b = schedule.unit.to(F64) * schedule.scale.to(F64)[:, None]
    cont = continuations(model, prompts, n_tokens)
    n_new = min(int(n_tokens), cont.n_new)
    return regime_fisher(model, cont, b, positions=positions, n_new=n_new, batch_size=batch_size)


def _same_directions(b1: torch.Tensor, b2: torch.Tensor) -> bool:
    """The same injection vectors per layer, to 1e-5 of each layer's largest entry."""
    if b1.shape != b2.shape:
        return False
    return bool(((b1 - b2).abs().amax(-1) <= 1e-5 * b2.abs().amax(-1)).all())


def size_to_kl(
    model,
    prompts,
    schedule,
    kl: float,
    *,
    stat: str = "mean",
    positions: str = "generated",
    n_tokens: int = 8,
    correct: bool = False,
    fisher: RegimeFisher | None = None,
    batch_size: int = 2,
) -> KLCalibration:
    """Scale `schedule` (its direction kept) so that its predicted per-token KL statistic in
    the regime of use equals `kl` (module docstring); `correct`: then one steered run on the
    same prompts and one rescale by sqrt(kl / measured). `fisher`: a `RegimeFisher` already
    computed on these prompts along the schedule's directions (skips the JVP forwards)."""
    check_model(model)
    check_schedule("schedule", schedule)
    schedule.check_for(model)
    kl = check_budget("kl", kl)
    stat = check_stat("kl_stat", stat)
    positions = check_policy(positions)
    if schedule.n_concepts != 1:
        raise InputError("schedule: a KL budget sizes one concept's schedule at a time")
    if not schedule.layers:
        raise InputError("schedule: all amplitudes are zero; nothing to size")
    cont = continuations(model, prompts, n_tokens)
    n_new = min(int(n_tokens), cont.n_new)
    if fisher is None:
        fisher = schedule_fisher(
            model, cont, schedule, positions=positions, n_tokens=n_new, batch_size=batch_size
        )
    else:
        b = schedule.unit.to(F64) * schedule.scale.to(F64)[:, None]
        if not _same_directions(fisher.b, b):
            raise InputError("fisher: computed along other directions than this schedule's")
        same = fisher.n_new == (1 if positions == "last" else n_new)
        if fisher.positions != positions or fisher.n_prompts != len(cont) or not same:
            raise InputError("fisher: computed in another regime or on other prompts")
    u = schedule.amplitudes.to(F64)
    q = fisher.token_kl(u)
    base = kl_stat(q, stat)
    if not base > 0 or not math.isfinite(base):
        raise InputError("schedule: its injection has no first-order effect on the logits here")
    a = math.sqrt(kl / base)
    predicted = {s: a * a * kl_stat(q, s) for s in STATS}
    measured, corr, evals = None, None, 0
    if correct:
        kw = dict(positions=positions, n_new=n_new, clean=fisher.clean)
        tk = measured_token_kl(model, cont, a * schedule.vectors, **kw)
        measured = {s: kl_stat(tk, s) for s in STATS}
        evals = 1
        if measured[stat] > 0:
            corr = math.sqrt(kl / measured[stat])
            a *= corr
    sized = schedule.scaled(
        a,
        calibrated=True,
        multiplier=a,
        kl_budget=kl,
        kl_stat=stat,
        predicted_kl=predicted,
        measured_kl=measured,
        kl_correction=corr,
        positions=positions,
        n_new=n_new,
    )
    return KLCalibration(
        sized, a, kl, stat, predicted, measured, corr, evals, positions, n_new, len(cont)
    )


__all__ = [
    "STATS",
    "RegimeFisher",
    "KLCalibration",
    "regime_fisher",
    "schedule_fisher",
    "measured_token_kl",
    "size_to_kl",
    "kl_stat",
    "check_budget",
]
