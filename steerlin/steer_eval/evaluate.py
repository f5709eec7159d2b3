"""The held-out evaluation every strategy goes through: greedy continuations of the evaluation
stems under its schedule (and/or instruction), judged by an outside classifier and scored under
the unsteered model (perplexity, the readouts of the finished text, the KL along the unsteered
continuations), per seed, into one row each (`Evaluation`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..energy import Metric
from ..measure import continuation_scores, kl_between, regime_kl
from ..regime import Continuations, generate
from .setting import EvalSetting, instructed
from .strategies import F64


def per_seed_ppl(nll: np.ndarray, seed_of: np.ndarray, n_seeds: int) -> list[float]:
    """Corpus perplexity per seed: exp(mean NLL over every continuation token of the seed)."""
    return [float(np.exp(np.mean(nll[seed_of == k]))) for k in range(n_seeds)]


class Evaluation:
    """The rows and samples of one `steer_eval` run: `unsteered()` first (the references every
    row is relative to), then `evaluate(row, schedule, label, prefix)` per strategy and sign."""

    def __init__(
        self,
        model,
        setting: EvalSetting,
        judge,
        readout,
        logit_readout,
        kl: Metric,
        seeds: Sequence[Sequence[str]],
        *,
        n_layers: int,
        separation: float,
        max_new_tokens: int,
        kl_tokens: int,
        chat: bool,
        log,
    ):
        self.model, self.setting, self.judge, self.kl = model, setting, judge, kl
        self.readout, self.logit_readout = readout, logit_readout
        self.seeds = [list(s) for s in seeds]
        self.flat = [p for s in self.seeds for p in s]
        self.seed_of = np.concatenate([[k] * len(s) for k, s in enumerate(self.seeds)])
        self.L, self.separation, self.chat, self.log = n_layers, separation, chat, log
        self.max_new_tokens, self.kl_tokens = max_new_tokens, kl_tokens
        self.t0 = time.time()
        self.rows: list[dict] = []
        self.samples: dict[str, list[str]] = {}

    def score(self, cont) -> dict:
        """continuation_scores, plus the logit readout of the finished text if asked for."""
        side: list[torch.Tensor] = []
        rd = self.readout
        if self.logit_readout is not None:

            def rd(m, x):
                side.append(self.logit_readout(m, x).to(F64).cpu())
                return self.readout(m, x)

        sc = continuation_scores(self.model, cont, rd)
        sc["logit"] = torch.cat(side) if side else None
        return sc

    def per_seed(self, values) -> list[float]:
        return [float(np.mean(values[self.seed_of == k])) for k in range(len(self.seeds))]

    def rel(self, sc: dict, key: str) -> list[float] | None:
        if sc.get(key) is None:
            return None
        return self.per_seed(((sc[key] - self.base_sc[key]) / self.separation).numpy())

    def unsteered(self) -> None:
        """The unsteered continuations, their scores and judgement: the first row."""
        n = len(self.seeds)
        self.base = generate(self.model, self.flat, self.max_new_tokens)
        self.base_sc = self.score(self.base)
        base_judge = self.judge(self.base.texts)
        self.log(
            f"  unsteered: {self.setting.judge} {np.mean(base_judge):+.3f}, ppl "
            f"{math.exp(float(self.base_sc['nll'].mean())):.3f} ({time.time() - self.t0:.0f} s)"
        )
        self.samples.update(prompt=self.flat, unsteered=self.base.texts)
        self.rows.append(
            {
                "strategy": "unsteered",
                "t": 0.0,
                "judge": self.per_seed(base_judge),
                "readout": [0.0] * n,
                "ppl": per_seed_ppl(self.base_sc["nll"].numpy(), self.seed_of, n),
                "kl": [0.0] * n,
                "energy_norm": 0.0,
                "energy_raw": 0.0,
                "kl_pred": 0.0,
            }
        )

    def evaluate(self, row: dict, s, label: str, prefix: str | None = None) -> None:
        """Held-out generation, judge, scores and KL of schedule `s` (and/or an instruction
        `prefix` before each stem) into `row`; scores under the unprompted unsteered model."""
        model, base, flat, n = self.model, self.base, self.flat, len(self.seeds)
        u = s.amplitudes.to(F64) if s is not None else torch.zeros(self.L, dtype=F64)
        k = min(self.kl_tokens, self.max_new_tokens)
        if prefix is None:
            steered = generate(model, flat, self.max_new_tokens, s)
            klm = regime_kl(model, base, s.vectors, n_new=k)
        else:
            asked = generate(
                model, instructed(model, prefix, flat, chat=self.chat), self.max_new_tokens, s
            )
            steered = Continuations(flat, base.prompt_ids, asked.new_ids, asked.texts)
            along = Continuations(None, asked.prompt_ids, base.new_ids, base.texts)
            klm = kl_between(model, base, along, None if s is None else s.vectors, n_new=k)
        sc = self.score(steered)
        jd = self.judge(steered.texts)
        row.update(
            judge=self.per_seed(jd),
            readout=self.rel(sc, "readout"),
            logit_readout=self.rel(sc, "logit"),
            ppl=per_seed_ppl(sc["nll"].numpy(), self.seed_of, n),
            kl=[klm] * n,
            energy_norm=float(u @ u),
            energy_raw=0.0 if s is None else s.raw_energy,
            kl_pred=0.5 * self.kl.energy(u),
            amplitudes=u.tolist(),
        )
        if prefix is not None:
            row["instruction"] = prefix
        self.rows.append(row)
        self.samples[label] = steered.texts
        self.log(
            f"  {label:>16}: {self.setting.judge} {np.mean(row['judge']):+.3f} ppl "
            f"{np.mean(row['ppl']):.2f} KL {klm:.3f} ({time.time() - self.t0:.0f} s)"
        )
