"""The searched optimum: what a user finds by trying layers and coefficients (`search_grid`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..measure import continuation_scores
from ..regime import generate
from .strategies import F64, middle_layers

#: coefficients of the raw class-mean difference v_l the "searched" grid tries (both signs)
SEARCH_COEFS = (1.0, 2.0, 4.0, 8.0)
#: the searched optimum must keep both signs' perplexity ratio at or below this
SEARCH_MAX_PPL = 1.5


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
