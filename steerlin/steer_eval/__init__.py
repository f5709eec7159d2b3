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

Strategies (`STRATEGIES`; `REGISTRY`, one `Strategy` entry each): "min-norm" (least Σu²: the
paper's LLV schedule), "min-kl" (least ½uᵀFu), "uniform" (same amplitude on every layer),
"last" (last layer only), "best-layer" (the single layer with the most gain per unit of
predicted KL, max h_l²/F_ll; the largest |h_l| in norm-relative units is the last layer,
already "last"), "middle" (the raw class-mean difference v_l on the middle third of the layers
with one coefficient, as repeng / steering-vectors users set it), "exact" (least Σu² from the
exact full-model gains, `steerlin.exact_gains`, no surrogate: `Controller.from_gains`),
"searched" (no computation: a grid over single layers and the middle band x coefficients of the
raw class-mean difference, each judged on the calibration stems only; the best, i.e. the
largest judged Δ(+,−) with both signs' perplexity ratio <= 1.5, is then evaluated on the
held-out stems like every other strategy; `search_grid`), "prompt" (no steering: an instruction
asking for the target property before each stem, `EvalSetting.instructions`, a plain text
prefix; judged, and its perplexity and KL measured for the same continuation under the
unprompted model), and "prompt+min-norm" (the instruction and the calibrated min-norm schedule
together).

The steps, one module each: `setting` (the task's judge, labels, instructions; the neutral
stems), `strategies` (what each strategy is: the registry), `prepare` (how each kind is
prepared: calibration, search, instruction), `search` (`search_grid`), `evaluate` (the
held-out evaluation into rows), `cost` (what producing each strategy's schedules costs),
`tables` (summaries, tables, figure) and `task` (`run_task`: one task from fitting to figure).

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

from collections.abc import Sequence

from ..energy import Metric
from ..judges import get_judge
from ..measure import kl_between as kl_between  # reached here by tests
from ..regime import generate
from .cost import Cost, ForwardCounter, cost_of
from .evaluate import Evaluation, per_seed_ppl
from .prepare import PREPARE, Inputs
from .search import SEARCH_COEFS, SEARCH_MAX_PPL, search_grid
from .setting import SETTINGS, TASKS, EvalSetting, instructed, neutral_stems
from .strategies import F64, REGISTRY, STRATEGIES, Strategy, middle_layers, strategy_shape
from .strategies import get_strategy as _get_strategy
from .tables import (
    format_correlations,
    format_table,
    plot_tradeoff,
    readout_correlations,
    summarise,
)
from .task import run_task


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
    # 1. the stems: calibration, and the held-out evaluation's seeds
    stems = neutral_stems()
    cal_stems = list(calibration_stems or stems["calibration"])
    if eval_stems is None:
        ev = stems["eval"]
        eval_stems = [ev[i : i + 12] for i in range(0, len(ev), 12)]
    h = surrogate.gains.to(F64)
    L = h.shape[0]
    ev = Evaluation(
        model,
        setting,
        get_judge(setting.judge),
        readout,
        logit_readout,
        kl,
        eval_stems,
        n_layers=L,
        separation=separation,
        max_new_tokens=max_new_tokens,
        kl_tokens=kl_tokens,
        chat=chat,
        log=log,
    )
    # 2. the unsteered references: calibration continuations (shared by every calibration,
    # their cost part of each) and the held-out continuations every row is relative to
    cal_base = Cost()
    with cal_base.measure(model):
        cal_cont = generate(model, cal_stems, calibration_tokens)
    ev.unsteered()
    costs: dict[str, dict] = {}
    search = None

    def partial(search_state=None):
        if checkpoint is not None:
            checkpoint(
                {"rows": ev.rows, "samples": ev.samples, "n_seeds": len(ev.seeds), "L": L}
                | {"costs": costs}
                | ({"search": search_state} if search_state is not None else {})
            )

    inputs = Inputs(
        model=model,
        directions=directions,
        readout=readout,
        h=h,
        kl=kl,
        exact_gains=exact_gains,
        separation=separation,
        strengths=strengths,
        schedule_factory=schedule_factory,
        cal_stems=cal_stems,
        cal_cont=cal_cont,
        cal_base=cal_base,
        calibration_tokens=calibration_tokens,
        max_new_tokens=max_new_tokens,
        search_coefs=search_coefs,
        log=log,
        partial=partial,
    )
    # 3. each strategy prepared as its kind says (calibrated, searched, prompted), then
    # evaluated on the held-out stems; its own cost kept
    for name in strategies:
        partial(search)
        strategy = _get_strategy(name)
        costs[name], found = PREPARE[strategy.kind](ev, strategy, inputs)
        if found is not None:
            search = found
    return {
        "rows": ev.rows,
        "samples": ev.samples,
        "n_seeds": len(ev.seeds),
        "L": L,
        "costs": costs,
        "search": search,
    }


_cost_of = cost_of  # the old private name

__all__ = [
    "run_task",
    "STRATEGIES",
    "REGISTRY",
    "Strategy",
    "SETTINGS",
    "TASKS",
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
    "per_seed_ppl",
    "instructed",
    "middle_layers",
    "SEARCH_COEFS",
    "SEARCH_MAX_PPL",
]
