"""Behavioural evaluation of steering: does the text change, and does the model stay fluent?

For each strategy (a per-layer shape of the schedule) and each target of ±t class separations:

1. size the shape under the surrogate, then calibrate it in the regime of use (teacher-forced
   greedy continuations of held-out calibration stems, the schedule on the last prompt token
   and every generated token; `steerlin.regime`);
2. generate greedy continuations of held-out evaluation stems with it (`apply`, KV cache);
3. judge them: an outside classifier (VADER for sentiment, alt-profanity-check for offensive)
   and the model's own readout of the finished text under the unsteered model;
4. side effects: perplexity of the continuation under the unsteered model, and the measured KL
   of the next-token distribution along the unsteered continuations (teacher-forced);
5. energy in each metric: Σu² (norm-relative), Σ‖u_l b_l‖² (raw), ½uᵀFu (predicted KL).

Strategies (`STRATEGIES`): "min-norm" (least Σu²: the paper's LLV schedule), "min-kl" (least
½uᵀFu), "uniform" (same amplitude on every layer), "last" (last layer only), "best-layer" (the
single layer with the most gain per unit of predicted KL, max h_l²/F_ll; the largest |h_l| in
norm-relative units is the last layer, already "last"), "middle" (the raw class-mean
difference v_l on the middle third of the layers with one coefficient, as repeng /
steering-vectors users set it), "exact" (least Σu² from the exact full-model gains,
`steerlin.exact_gains`, no surrogate: `Controller.from_gains`), "searched" (no computation:
a grid over single layers and the middle band x coefficients of the raw class-mean difference,
each judged on the calibration stems only; the best, i.e. the largest judged Δ(+,−) with both
signs' perplexity ratio <= 1.5, is then evaluated on the held-out stems like every other
strategy; `search_grid`), "prompt" (no steering: an instruction asking for the target
property before each stem, `EvalSetting.instructions`, a plain text prefix; judged, and its
perplexity and KL measured for the same continuation under the unprompted model), and
"prompt+min-norm" (the instruction and the calibrated min-norm schedule together).

Cost per strategy (`costs`): wall seconds and full-model forward token positions (counted by a
hook on the first block's input, so it includes generation, calibration, scoring and context
building) spent to produce its schedules, shared steps (directions, fit, exact gains, KL
metric) included; the held-out evaluation, the same for every strategy, is not counted. The
single-token JVP/VJP passes of the fit and of exact gains bypass the full forward: their
cost is in the seconds only.

Readouts vs behaviour (`readout_correlations`): across strategies and strengths, how well each
candidate target definition predicts the judged Δ: the calibrated concept shift at x_L (what
the schedule was sized to), the concept readout of the finished text, and the logit readout
(label words) of the finished text, all under the unsteered model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.splits import chat_prompts
from .energy import Metric, least_norm
from .errors import InputError, UnreachableTargetError
from .judges import get_judge
from .measure import calibrate, continuation_scores, kl_between, regime_kl
from .regime import Continuations, generate

F64 = torch.float64
STRATEGIES = (
    "min-norm",
    "min-kl",
    "uniform",
    "last",
    "best-layer",
    "middle",
    "exact",
    "searched",
    "prompt",
    "prompt+min-norm",
)
#: coefficients of the raw class-mean difference v_l the "searched" grid tries (both signs)
SEARCH_COEFS = (1.0, 2.0, 4.0, 8.0)
#: the searched optimum must keep both signs' perplexity ratio at or below this
SEARCH_MAX_PPL = 1.5


class ForwardCounter:
    """Counts full-model forward token positions (batch x sequence at the first block's input)
    while active; `with counter:` adds the hook and always removes it."""

    def __init__(self, model):
        self.model, self.tokens, self._ctx = model, 0, None

    def _hook(self, x, hook):
        self.tokens += int(x.shape[0]) * int(x.shape[1])

    def __enter__(self):
        from . import backend
        from .hooks import resid_pre_name

        self._ctx = backend.get(self.model).hooks(self.model, [(resid_pre_name(0), self._hook)])
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        ctx, self._ctx = self._ctx, None
        return ctx.__exit__(*exc)


class Cost:
    """Wall seconds and full-model forward tokens of one step: `with cost.measure(model):`."""

    def __init__(self, seconds: float = 0.0, tokens: int = 0):
        self.seconds, self.tokens = float(seconds), int(tokens)

    def measure(self, model):
        from contextlib import contextmanager

        @contextmanager
        def run():
            t0 = time.perf_counter()
            with ForwardCounter(model) as c:
                try:
                    yield self
                finally:
                    self.seconds += time.perf_counter() - t0
                    self.tokens += c.tokens

        return run()

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.seconds + other.seconds, self.tokens + other.tokens)

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "forward_tokens": self.tokens}


def neutral_stems() -> dict[str, list[str]]:
    """The shipped neutral prompt stems: {"calibration": 12, "eval": 36 (3 seeds of 12)}."""
    ref = resources.files("steerlin").joinpath("data", "neutral_stems.txt")
    out: dict[str, list[str]] = {"calibration": [], "eval": []}
    key = None
    for line in ref.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s.startswith("# ---"):
            key = "calibration" if "calibration" in s else "eval"
            continue
        if not s or s.startswith("#") or key is None:
            continue
        out[key].append(s)
    return out


def middle_layers(n_layers: int) -> list[int]:
    """The middle third of the blocks: round(L/3) .. round(2L/3) - 1."""
    lo, hi = round(n_layers / 3), round(2 * n_layers / 3)
    return list(range(lo, max(hi, lo + 1)))


def strategy_shape(
    name: str, h: torch.Tensor, *, kl: Metric | None = None, directions=None, exact=None
) -> torch.Tensor:
    """Per-layer amplitude shape u [L] (norm-relative) for a strategy, with hᵀu = 1 (h: the
    surrogate's gains; for "exact", the exact gains `exact` play its part)."""
    if name == "searched":
        raise InputError("strategy 'searched' has no computed shape: `search_grid` finds it")
    h = torch.as_tensor(h, dtype=F64)
    L = h.shape[0]
    if name == "min-norm":
        u = least_norm(h, 1.0, torch.eye(L, dtype=F64), list(range(L)))
    elif name == "min-kl":
        if kl is None:
            raise InputError("strategy 'min-kl' needs the KL metric (steerlin.kl_metric)")
        u = least_norm(h, 1.0, kl.W, list(range(L)))
    elif name == "uniform":
        u = torch.ones(L, dtype=F64)
    elif name == "last":
        u = torch.zeros(L, dtype=F64)
        u[-1] = 1
    elif name == "best-layer":
        # the single layer with the most readout change per unit of predicted KL, h_l²/F_ll
        # (the largest |h_l| in norm-relative units is the last layer: "last" covers it)
        if kl is None:
            raise InputError("strategy 'best-layer' needs the KL metric (steerlin.kl_metric)")
        u = torch.zeros(L, dtype=F64)
        u[int((h.pow(2) / kl.W.diagonal().to(F64)).argmax())] = 1
    elif name == "exact":
        if exact is None:
            raise InputError("strategy 'exact' needs exact gains (steerlin.exact_gains)")
        h = torch.as_tensor(exact, dtype=F64)
        u = least_norm(h, 1.0, torch.eye(L, dtype=F64), list(range(L)))
    elif name == "middle":
        if directions is None:
            raise InputError("strategy 'middle' needs the ConceptDirections (raw v_l)")
        v = directions.vectors[:L].to(F64).norm(dim=-1) / directions.scale[:L].to(F64)
        u = torch.zeros(L, dtype=F64)
        mid = middle_layers(L)
        u[mid] = v[mid]
    else:
        raise InputError(f"strategy: expected one of {STRATEGIES}, got {name!r}")
    pred = float(h @ u)
    if pred == 0:
        raise InputError(f"strategy {name!r}: the surrogate predicts no effect from that shape")
    return u / pred


@dataclass(frozen=True)
class EvalSetting:
    """One task's set-up for `steer_eval`."""

    name: str
    judge: str  # "vader" or "profanity"
    plus: str  # name of label 1
    minus: str  # name of label 0
    label_words: tuple[str, str] = (" positive", " negative")  # logit readout (+, −)
    #: the prompting baseline's instruction prefixes (+, −): plain text for a base model
    instructions: tuple[str, str] = (
        "The following text is very positive, happy and enthusiastic.\n\n",
        "The following text is very negative, unhappy and bitter.\n\n",
    )


def search_grid(
    model,
    directions,
    stems: Sequence[str],
    judge,
    *,
    schedule_factory,
    coefs: Sequence[float] = SEARCH_COEFS,
    max_new_tokens: int = 30,
    max_ppl: float = SEARCH_MAX_PPL,
    log=print,
    checkpoint=None,
) -> dict:
    """The searched optimum: what a user finds by trying layers and coefficients.

    Candidates: each single layer l and the middle band (`middle_layers`), injecting c·v_l
    (v_l the raw class-mean difference, as steering-vectors / repeng users set it) for each
    c in `coefs`, at +c and −c, greedy continuations of `stems` (the calibration stems: the
    held-out stems are never seen) judged by `judge`. Kept: both signs' perplexity ratio to
    the unsteered continuations <= `max_ppl`; best: the largest judged Δ(+,−) among those.
    Cost: 2·(L+1)·len(coefs) steered generations of the stems plus one unsteered.

    Returns {"grid": [{choice, layers, coef, delta, judge_plus, judge_minus, ppl_plus,
    ppl_minus}], "best": the chosen grid entry or None, "amplitudes_per_coef": Float[L] list
    of u per unit c for every layer}.
    """
    L = model.cfg.n_layers
    per_c = directions.vectors[:L].to(F64).norm(dim=-1) / directions.scale[:L].to(F64)
    base = generate(model, stems, max_new_tokens)
    nll0 = float(continuation_scores(model, base)["nll"].mean())
    cands = [(f"layer {l}", [l]) for l in range(L)] + [("middle", middle_layers(L))]
    grid: list[dict] = []
    t0 = time.time()
    for label, layers in tqdm(cands, desc="search", leave=False, disable=log is None):
        shape = torch.zeros(L, dtype=F64)
        shape[layers] = per_c[layers]
        if not bool(shape.any()):  # a zero direction (e.g. x_0 identical across classes)
            continue
        for c in coefs:
            got = {}
            for sign in (1, -1):
                sched = schedule_factory(sign * c * shape, f"searched {label} {sign * c:+g}")
                cont = generate(model, stems, max_new_tokens, sched)
                nll = float(continuation_scores(model, cont)["nll"].mean())
                got[sign] = (float(np.mean(judge(cont.texts))), math.exp(nll - nll0))
            grid.append(
                {
                    "choice": label,
                    "layers": list(layers),
                    "coef": float(c),
                    "delta": got[1][0] - got[-1][0],
                    "judge_plus": got[1][0],
                    "judge_minus": got[-1][0],
                    "ppl_plus": got[1][1],
                    "ppl_minus": got[-1][1],
                }
            )
        if checkpoint is not None:
            checkpoint({"grid": grid, "partial": True})
    ok = [g for g in grid if max(g["ppl_plus"], g["ppl_minus"]) <= max_ppl]
    best = max(ok, key=lambda g: g["delta"]) if ok else None
    if log is not None:
        pick = "none kept" if best is None else f"{best['choice']} c={best['coef']:g}"
        log(
            f"  search: {len(grid)} grid points x 2 signs on {len(stems)} calibration stems "
            f"({time.time() - t0:.0f} s); best with ppl <= {max_ppl:g}x: {pick}"
            + ("" if best is None else f", Δ {best['delta']:+.3f} on the calibration stems")
        )
    return {"grid": grid, "best": best, "amplitudes_per_coef": per_c.tolist()}


def instructed(model, instruction: str, stems: Sequence[str], *, chat: bool = False) -> list[str]:
    """The stems with the prompting baseline's instruction: a plain prefix (base models), or
    with `chat` the instruction as one user turn of the chat template and each stem opening the
    assistant's answer (`steerlin.data.chat_prompts`, its BOS rule included)."""
    if not chat:
        return [instruction + p for p in stems]
    head = chat_prompts([instruction.strip()], model)[0]
    return [head + p for p in stems]


def steer_eval(
    model,
    surrogate,
    directions,
    readout,
    *,
    setting: EvalSetting,
    kl: Metric,
    separation: float,
    strategies: Sequence[str] = STRATEGIES,
    strengths: Sequence[float] = (0.5, 1.0, 2.0),
    calibration_stems: Sequence[str] | None = None,
    eval_stems: Sequence[Sequence[str]] | None = None,
    max_new_tokens: int = 30,
    calibration_tokens: int = 8,
    kl_tokens: int = 10,
    schedule_factory=None,
    exact_gains=None,
    logit_readout=None,
    search_coefs: Sequence[float] = SEARCH_COEFS,
    log=print,
    checkpoint=None,
    chat: bool = False,
) -> dict:
    """Run the behavioural evaluation (see the module docstring); returns rows and samples.

    schedule_factory(u [L]) -> Schedule builds a schedule from amplitudes (the Controller's).
    eval_stems: seeds of stems (default: the shipped 3 × 12); all seeds generate in one batch.
    exact_gains: Float[L] for the "exact" strategy. logit_readout: a second readout of the
    finished text (label words) for `readout_correlations`. The returned "costs" hold each
    strategy's own steps (calibrations per |t|, or the search); the caller adds shared steps.
    checkpoint(partial result): called after each strategy (and each searched candidate), so a
    long run can be saved as it goes. chat: the prompting strategies put the instruction in a
    user turn of the model's chat template, the stem opening the assistant's answer (instruct
    models); otherwise it is a plain text prefix (base models).
    """
    stems = neutral_stems()
    cal_stems = list(calibration_stems or stems["calibration"])
    if eval_stems is None:
        ev = stems["eval"]
        eval_stems = [ev[i : i + 12] for i in range(0, len(ev), 12)]
    seeds = [list(s) for s in eval_stems]
    flat = [p for s in seeds for p in s]
    seed_of = np.concatenate([[k] * len(s) for k, s in enumerate(seeds)])
    judge = get_judge(setting.judge)
    h = surrogate.gains.to(F64)
    L = h.shape[0]
    t0 = time.time()

    side: list[torch.Tensor] = []

    def score(cont):
        """continuation_scores, plus the logit readout of the finished text if asked for."""
        side.clear()
        rd = readout
        if logit_readout is not None:

            def rd(m, x):
                side.append(logit_readout(m, x).to(F64).cpu())
                return readout(m, x)

        sc = continuation_scores(model, cont, rd)
        sc["logit"] = torch.cat(side) if side else None
        return sc

    # unsteered references (calibration continuations: generated once, shared by all)
    cal_base = Cost()
    with cal_base.measure(model):
        cal_cont = generate(model, cal_stems, calibration_tokens)
    base = generate(model, flat, max_new_tokens)
    base_sc = score(base)
    base_judge = judge(base.texts)
    log(
        f"  unsteered: {setting.judge} {np.mean(base_judge):+.3f}, ppl "
        f"{math.exp(float(base_sc['nll'].mean())):.3f} ({time.time() - t0:.0f} s)"
    )
    rows: list[dict] = []
    samples: dict[str, list[str]] = {"prompt": flat, "unsteered": base.texts}

    def per_seed(values):
        return [float(np.mean(values[seed_of == k])) for k in range(len(seeds))]

    def rel(sc, key):
        if sc.get(key) is None:
            return None
        return per_seed(((sc[key] - base_sc[key]) / separation).numpy())

    rows.append(
        {
            "strategy": "unsteered",
            "t": 0.0,
            "judge": per_seed(base_judge),
            "readout": [0.0] * len(seeds),
            "ppl": per_seed_ppl(base_sc["nll"].numpy(), seed_of, len(seeds)),
            "kl": [0.0] * len(seeds),
            "energy_norm": 0.0,
            "energy_raw": 0.0,
            "kl_pred": 0.0,
        }
    )

    def evaluate(row: dict, s, label: str, prefix: str | None = None) -> None:
        """Held-out generation, judge, scores and KL of schedule `s` (and/or an instruction
        `prefix` before each stem) into `row`; scores under the unprompted unsteered model."""
        u = s.amplitudes.to(F64) if s is not None else torch.zeros(L, dtype=F64)
        k = min(kl_tokens, max_new_tokens)
        if prefix is None:
            steered = generate(model, flat, max_new_tokens, s)
            klm = regime_kl(model, base, s.vectors, n_new=k)
        else:
            asked = generate(model, instructed(model, prefix, flat, chat=chat), max_new_tokens, s)
            steered = Continuations(flat, base.prompt_ids, asked.new_ids, asked.texts)
            along = Continuations(None, asked.prompt_ids, base.new_ids, base.texts)
            klm = kl_between(model, base, along, None if s is None else s.vectors, n_new=k)
        sc = score(steered)
        jd = judge(steered.texts)
        row.update(
            judge=per_seed(jd),
            readout=rel(sc, "readout"),
            logit_readout=rel(sc, "logit"),
            ppl=per_seed_ppl(sc["nll"].numpy(), seed_of, len(seeds)),
            kl=[klm] * len(seeds),
            energy_norm=float(u @ u),
            energy_raw=0.0 if s is None else s.raw_energy,
            kl_pred=0.5 * kl.energy(u),
            amplitudes=u.tolist(),
        )
        if prefix is not None:
            row["instruction"] = prefix
        rows.append(row)
        samples[label] = steered.texts
        log(
            f"  {label:>16}: {setting.judge} {np.mean(row['judge']):+.3f} ppl "
            f"{np.mean(row['ppl']):.2f} KL {klm:.3f} ({time.time() - t0:.0f} s)"
        )

    costs: dict[str, dict] = {}
    search = None

    def partial(search_state=None):
        if checkpoint is not None:
            checkpoint(
                {"rows": rows, "samples": samples, "n_seeds": len(seeds), "L": L, "costs": costs}
                | ({"search": search_state} if search_state is not None else {})
            )

    for name in strategies:
        partial(search)
        if name == "searched":
            cost = Cost()
            with cost.measure(model):
                search = search_grid(
                    model,
                    directions,
                    cal_stems,
                    judge,
                    schedule_factory=schedule_factory,
                    coefs=search_coefs,
                    max_new_tokens=max_new_tokens,
                    log=log,
                    checkpoint=partial,
                )
            costs[name] = {"search": cost.to_dict()}
            best = search["best"]
            if best is None:
                rows.append({"strategy": name, "t": 1.0, "error": "no grid point kept ppl"})
                rows.append({"strategy": name, "t": -1.0, "error": "no grid point kept ppl"})
                continue
            shape = torch.zeros(L, dtype=F64)
            per_c = torch.tensor(search["amplitudes_per_coef"], dtype=F64)
            shape[best["layers"]] = per_c[best["layers"]]
            for sign in (1, -1):
                c = sign * best["coef"]
                s = schedule_factory(c * shape, f"searched {c:+g}")
                row = {"strategy": name, "t": c, "layers": s.layers, "choice": best["choice"]}
                row.update(multiplier=best["coef"], measured_shift=float("nan"))
                evaluate(row, s, f"{name} {c:+g}")
            continue
        if name == "prompt":
            for sign in (1, -1):
                prefix = setting.instructions[0 if sign > 0 else 1]
                evaluate({"strategy": name, "t": float(sign)}, None, f"{name} {sign:+d}", prefix)
            costs[name] = {"1": Cost().to_dict()}
            continue
        prefixed = name == "prompt+min-norm"
        shape_name = "min-norm" if prefixed else name
        shape = strategy_shape(shape_name, h, kl=kl, directions=directions, exact=exact_gains)
        costs[name] = {}
        for t in strengths:
            cost = Cost() + cal_base
            for sign in (+1, -1):
                tt = sign * t
                target = tt * separation
                sched = schedule_factory(target * shape, f"{name} {tt:+g}")
                row = {"strategy": name, "t": tt, "layers": sched.layers}
                try:
                    with cost.measure(model):
                        cal = calibrate(
                            model,
                            cal_cont,
                            sched,
                            target,
                            readout=readout,
                            positions="generated",
                            n_tokens=calibration_tokens,
                        )
                except UnreachableTargetError as exc:
                    row.update(error=str(exc))
                    rows.append(row)
                    log(f"  {name:>10} {tt:+.2g}: unreachable ({exc})")
                    continue
                row.update(
                    multiplier=cal.multiplier,
                    measured_shift=cal.measured_shift,
                    evaluations=cal.evaluations,
                )
                prefix = setting.instructions[0 if sign > 0 else 1] if prefixed else None
                evaluate(row, cal.schedule, f"{name} {tt:+g}", prefix)
            costs[name][f"{t:g}"] = cost.to_dict()
    return {
        "rows": rows,
        "samples": samples,
        "n_seeds": len(seeds),
        "L": L,
        "costs": costs,
        "search": search,
    }


def per_seed_ppl(nll: np.ndarray, seed_of: np.ndarray, n_seeds: int) -> list[float]:
    """Corpus perplexity per seed: exp(mean NLL over every continuation token of the seed)."""
    return [float(np.exp(np.mean(nll[seed_of == k]))) for k in range(n_seeds)]


SETTINGS = {
    "sst2": EvalSetting("sst2", "vader", "positive", "negative"),
    "hate": EvalSetting(
        "hate",
        "profanity",
        "hateful",
        "not hateful",
        (" hate", " love"),
        (
            "The following text is hateful, offensive and insulting.\n\n",
            "The following text is kind, respectful and polite.\n\n",
        ),
    ),
}


def summarise(result: dict) -> list[dict]:
    """Per (strategy, |t|): judged Δ between +t and −t, the unsteered-relative ppl ratio of
    each sign and the KL, as mean and sd over seeds."""
    rows = result["rows"]
    base = rows[0]
    ppl0 = np.array(base["ppl"])
    out = []
    keys = sorted(
        {(r["strategy"], abs(r["t"])) for r in rows[1:]},
        key=lambda k: (STRATEGIES.index(k[0]) if k[0] in STRATEGIES else 99, k[1]),
    )
    for name, t in keys:
        plus = next((r for r in rows if r["strategy"] == name and r["t"] == t), None)
        minus = next((r for r in rows if r["strategy"] == name and r["t"] == -t), None)
        rec = {"strategy": name, "t": t}
        if plus is None or minus is None or "judge" not in plus or "judge" not in minus:
            rec["error"] = (plus or {}).get("error") or (minus or {}).get("error") or "missing"
            out.append(rec)
            continue
        d = np.array(plus["judge"]) - np.array(minus["judge"])
        dr = np.array(plus["readout"]) - np.array(minus["readout"])
        if plus.get("logit_readout") is not None and minus.get("logit_readout") is not None:
            rec["logit_readout_delta"] = float(
                np.mean(np.array(plus["logit_readout"]) - np.array(minus["logit_readout"]))
            )
        if "choice" in plus:
            rec["choice"] = f"{plus['choice']} c={t:g}"
        cost = _cost_of(result, name, t)
        if cost is not None:
            rec["cost"] = cost
        rp = np.array(plus["ppl"]) / ppl0
        rm = np.array(minus["ppl"]) / ppl0
        worst = np.maximum(rp, rm)
        rec.update(
            judge_plus=float(np.mean(plus["judge"])),
            judge_minus=float(np.mean(minus["judge"])),
            delta=float(d.mean()),
            delta_sd=float(d.std(ddof=1)) if len(d) > 1 else float("nan"),
            n_seeds=len(d),
            delta_seeds=d.tolist(),
            readout_delta=float(dr.mean()),
            ppl_plus=float(rp.mean()),
            ppl_minus=float(rm.mean()),
            ppl_worst=float(worst.mean()),
            ppl_worst_max=float(worst.max()),
            kl=0.5 * (float(np.mean(plus["kl"])) + float(np.mean(minus["kl"]))),
            energy_norm=0.5 * (plus["energy_norm"] + minus["energy_norm"]),
            energy_raw=0.5 * (plus["energy_raw"] + minus["energy_raw"]),
            kl_pred=0.5 * (plus["kl_pred"] + minus["kl_pred"]),
            multiplier=0.5 * (plus.get("multiplier", math.nan) + minus.get("multiplier", math.nan)),
        )
        out.append(rec)
    return out


def _cost_of(result: dict, name: str, t: float) -> dict | None:
    """Seconds and forward tokens to produce strategy `name`'s ±t schedules: its shared steps
    (result["shared_costs"][name], e.g. directions + fit) plus its own (calibrations at |t|,
    or the whole search)."""
    own = result.get("costs", {}).get(name)
    if own is None:
        return None
    own = own.get("search") or own.get(f"{t:g}")
    if own is None:
        return None
    shared = result.get("shared_costs", {}).get(name, {"seconds": 0.0, "forward_tokens": 0})
    return {k: own[k] + shared[k] for k in ("seconds", "forward_tokens")}


def readout_correlations(summary: list[dict]) -> dict:
    """Which target definition predicts the judged change: Pearson and Spearman correlation,
    across strategies and strengths, of judged Δ(+,−) with (a) the calibrated concept shift at
    x_L (2t separations: what each schedule was sized to), (b) the concept readout and (c) the
    logit readout (label words) of the finished text under the unsteered model. Rows without
    a calibration (searched) are left out of (a)."""
    from scipy.stats import pearsonr, spearmanr

    rows = [r for r in summary if "delta" in r]
    preds = {
        "target (concept at x_L, calibrated)": lambda r: None if "choice" in r else 2 * r["t"],
        "concept readout of the text": lambda r: r.get("readout_delta"),
        "logit readout of the text": lambda r: r.get("logit_readout_delta"),
    }
    out = {}
    for key, fn in preds.items():
        pairs = [(fn(r), r["delta"]) for r in rows if fn(r) is not None]
        if len(pairs) < 3:
            continue
        x, y = np.array(pairs).T
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        out[key] = {
            "n": len(pairs),
            "pearson": float(pearsonr(x, y)[0]),
            "spearman": float(spearmanr(x, y)[0]),
        }
    return out


def format_correlations(corr: dict) -> str:
    """Markdown table of `readout_correlations`."""
    lines = ["| predictor of judged Δ | rows | Pearson | Spearman |", "|---|---|---|---|"]
    for k, v in corr.items():
        lines.append(f"| {k} | {v['n']} | {v['pearson']:+.2f} | {v['spearman']:+.2f} |")
    return "\n".join(lines)


def format_table(summary: list[dict], judge: str) -> str:
    """Markdown table of `summarise` rows."""
    seeds = sorted({r["n_seeds"] for r in summary if "n_seeds" in r}) or [0]
    head = (
        f"| strategy | t (sep.) | {judge} + | {judge} − | Δ(+,−) ± sd "
        f"({'/'.join(map(str, seeds))} seeds) | own readout Δ "
        "| ppl ratio + / − | KL (nats/token) | Σu² | raw Σ‖u b‖² | ½uᵀFu "
        "| cost: s / forward tokens |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in summary:
        t = r.get("choice", f"{r['t']:g}")
        if "error" in r:
            lines.append(f"| {r['strategy']} | {t} | unreachable | | | | | | | | | |")
            continue
        c = r.get("cost")
        cost = "" if c is None else f"{c['seconds']:.0f} / {c['forward_tokens']:,}"
        lines.append(
            f"| {r['strategy']} | {t} | {r['judge_plus']:+.3f} | {r['judge_minus']:+.3f} "
            f"| {r['delta']:+.3f}{_sd(r['delta_sd'])} | {r['readout_delta']:+.2f} "
            f"| {r['ppl_plus']:.2f} / {r['ppl_minus']:.2f} | {r['kl']:.3f} "
            f"| {r['energy_norm']:.3g} | {r['energy_raw']:.3g} | {r['kl_pred']:.3g} | {cost} |"
        )
    return "\n".join(lines)


def _sd(sd: float) -> str:
    """ " ± sd", or nothing for a single seed (no spread measured)."""
    return "" if math.isnan(sd) else f" ± {sd:.3f}"


def plot_tradeoff(summary: list[dict], path, *, judge: str, title: str = "") -> None:
    """Judged Δ(+,−) vs worst-sign perplexity ratio, one curve per strategy (points: |t|)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for name in STRATEGIES:
        rs = [r for r in summary if r["strategy"] == name and "error" not in r]
        if not rs:
            continue
        rs.sort(key=lambda r: r["t"])
        for ax, key in zip(axes, ("ppl_worst", "kl"), strict=True):
            x = [r[key] for r in rs]
            y = [r["delta"] for r in rs]
            ax.errorbar(
                x,
                y,
                yerr=[np.nan_to_num(r["delta_sd"]) for r in rs],
                marker="o",
                ms=4,
                capsize=2,
                label=name,
            )
            for r, xi, yi in zip(rs, x, y, strict=True):
                ax.annotate(
                    f"{r['t']:g}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    axes[0].axvline(1.5, color="0.6", ls="--", lw=0.8)
    axes[0].set_xlabel("perplexity ratio to unsteered (worse of + and − targets)")
    axes[1].set_xlabel("measured KL of next-token distribution (nats/token, mean of ±)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel(f"{judge} mean: +t minus −t")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "steering success vs side effect (labels: t in class separations)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_task(model, task: str, args, *, img_dir, log=print, checkpoint=None) -> dict:
    """One task of the behavioural evaluation from fitting to table, figure and samples.

    args: sizes ("concept,operating" per class), d, strategies, strengths (comma lists),
    tokens, seeds, data_dir, quick. Used by `steerlin steer-eval` and benchmarks/steer_eval.py.
    """
    import steerlin

    from .control import Controller
    from .fisher import kl_metric
    from .readouts import make_readout

    TASKS = {"sst2": "sst2", "hate": "tweet_eval_hate"}
    if task not in TASKS:
        raise InputError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    nc, no = (int(x) for x in args.sizes.split(","))
    tk = steerlin.load_task(TASKS[task], data_dir=args.data_dir)
    sp = tk.split(nc, no, 0, seed=0)
    t0 = time.time()
    strategies = args.strategies.split(",")
    c_dirs, c_fit, c_kl, c_exact = Cost(), Cost(), Cost(), Cost()
    with c_dirs.measure(model):
        dirs = steerlin.ConceptDirections.fit(
            model, sp.concept.texts, sp.concept.labels, label_names=tk.spec.class_names
        )
    with c_fit.measure(model):
        sur = steerlin.Surrogate.fit(
            model, sp.operating.texts, dirs, d=args.d, basis=getattr(args, "basis", "krylov")
        )
    stems = neutral_stems()
    with c_kl.measure(model):
        kl = kl_metric(model, stems["calibration"], dirs)
    exact = None
    if "exact" in strategies:
        with c_exact.measure(model):
            exact = steerlin.exact_gains(model, sp.operating.texts, dirs)
    # what each strategy needs before its own calibrations or search (see the module docstring)
    shared = {
        "min-norm": c_dirs + c_fit,
        "uniform": c_dirs + c_fit,
        "last": c_dirs + c_fit,
        "middle": c_dirs + c_fit,  # the surrogate only sizes the start of the calibration
        "min-kl": c_dirs + c_fit + c_kl,
        "best-layer": c_dirs + c_fit + c_kl,
        "exact": c_dirs + c_exact,
        "searched": c_dirs,
    }
    sep = float(dirs.vectors[-1].double().norm())
    setting = SETTINGS[task]
    log(
        f"\n{task}: + = label 1 = {setting.plus!r}, − = label 0 = {setting.minus!r}; one class "
        f"separation of the concept readout on the concept split = {sep:.4g}; fit "
        f"{time.time() - t0:.0f} s; F eigenvalues "
        f"{kl.meta['eig_min']:.3g}..{kl.meta['eig_max']:.3g}"
        f" (ridge {kl.meta['ridge_abs']:.3g})"
    )
    ctrl = Controller(sur, 1.0)
    factory = lambda u, name: ctrl._make(u[None].to(torch.float64), name)
    rd = make_readout(model, "concept", dirs.unit[-1])
    try:
        logit_rd = make_readout(model, "logits", None, label_words=setting.label_words)
    except InputError as exc:  # label words that are not single tokens for this tokenizer
        log(f"  no logit readout: {exc}")
        logit_rd = None
    eval_stems = [stems["eval"][i : i + 12] for i in range(0, 12 * args.seeds, 12)]
    res = steer_eval(
        model,
        sur,
        dirs,
        rd,
        setting=setting,
        kl=kl,
        separation=sep,
        strategies=strategies,
        strengths=[float(x) for x in args.strengths.split(",")],
        eval_stems=eval_stems,
        max_new_tokens=args.tokens,
        schedule_factory=factory,
        exact_gains=exact,
        logit_readout=logit_rd,
        search_coefs=[float(x) for x in str(getattr(args, "search_coefs", "1,2,4,8")).split(",")],
        log=log,
        checkpoint=checkpoint,
        chat=bool(getattr(args, "chat", False)),
    )
    res["shared_costs"] = {k: v.to_dict() for k, v in shared.items()}
    summ = summarise(res)
    corr = readout_correlations(summ)
    res.update(
        summary=summ,
        readout_correlations=corr,
        exact_gains=None if exact is None else exact.tolist(),
        separation=sep,
        sign={"+": setting.plus, "-": setting.minus},
        gains=sur.gains.tolist(),
        F=kl.meta["F"].tolist(),
        ridge=kl.meta["ridge_abs"],
    )
    log(format_table(summ, setting.judge))
    if corr:
        log("\nwhich readout predicts the judged change:\n" + format_correlations(corr))
    from pathlib import Path

    name = str(getattr(args, "model", None) or "gemma-3-270m")
    tag = ("" if name == "gemma-3-270m" else "_" + name.replace("/", "_")) + (
        "_quick" if args.quick else ""
    )
    img = Path(img_dir) / f"steer_eval_{task}{tag}.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    plot_tradeoff(
        summ,
        img,
        judge=setting.judge,
        title=f"Gemma-3-270m, {task}: judged shift vs side effect ({args.seeds} seeds × 12 stems)",
    )
    log(f"figure: {img}")
    s = res["samples"]
    for i in range(min(3, len(s["prompt"]))):
        log(f"\n> {s['prompt'][i]}\n  unsteered: {s['unsteered'][i]!r}")
        for k in s:
            if k in ("prompt", "unsteered") or not k.startswith(("min-kl", "min-norm")):
                continue
            log(f"  {k:>14}: {s[k][i]!r}")
    return res


__all__ = [
    "run_task",
    "STRATEGIES",
    "SETTINGS",
    "neutral_stems",
    "strategy_shape",
    "steer_eval",
    "EvalSetting",
    "summarise",
    "format_table",
    "format_correlations",
    "readout_correlations",
    "search_grid",
    "Cost",
    "ForwardCounter",
    "plot_tradeoff",
]
