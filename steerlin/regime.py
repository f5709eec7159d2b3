"""Text in the regime a schedule is used in: greedy continuations and the position policies.

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
tokens discontinuously). The measurements themselves (one forward per prompt batch) and the
calibration are `steerlin.measure`'s; this module holds the continuations and the policies.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import backend
from .backend import check_model
from .errors import InputError
from .validate import check_int, check_text_prompts

POLICIES = ("last", "generated", "all")


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


class LearnedPositionsWarning(UserWarning):
    """steerlin generated through TransformerLens 3's cached `generate` on a model with learned
    absolute positions (GPT-2 class), whose new tokens get the wrong position there."""


def warn_if_tl3_learned_positions(model, what: str = "generate") -> bool:
    """Warn (once per call site) when `what` generates text through TransformerLens 3's KV-cached
    `generate` on a learned-position model: TL 3.x embeds each new token at position 2(T-1)
    instead of T-1 (tests/test_regime.py::test_tl3_cached_generate_position_bug), so the
    continuations, and a calibration measured along them, are not the model's own. Rotary
    models and TransformerLens 4 are unaffected. Returns whether it warned."""
    if backend.get(model).name != "hooked":
        return False
    if getattr(model.cfg, "positional_embedding_type", None) != "standard":
        return False
    warnings.warn(
        f"{what}: {model.cfg.model_name!r} has learned absolute positions, and TransformerLens "
        "3's cached generate embeds each new token at the wrong position (2(T-1) instead of "
        "T-1), so these greedy continuations (and a generation-regime calibration along them) "
        "are not the model's own. Use TransformerLens 4 (steerlin[tl4]), a rotary model, or "
        "calibrate with positions='last' (full forwards, unaffected)",
        LearnedPositionsWarning,
        stacklevel=3,
    )
    return True


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
    warn_if_tl3_learned_positions(model, "steerlin.regime.generate")
    ctx = schedule.apply(model, positions=positions) if schedule is not None else nullcontext()
    with ctx, torch.no_grad():
        out = backend.get(model).generate_tokens(model, prompts, max_new_tokens=int(max_new_tokens))
    new = out[:, -int(max_new_tokens) :].cpu()
    pids = [model.to_tokens(p)[0].tolist() for p in prompts]
    texts = [model.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in new]
    return Continuations(prompts, pids, new, texts)


def check_policy(positions: str) -> str:
    if positions not in POLICIES:
        raise InputError(f"positions: expected one of {POLICIES}, got {positions!r}")
    return positions


def batch_tokens(model, cont: Continuations, n_new: int | None = None):
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


def position_masks(positions: str, plen, tlen, T: int, n_meas: int):
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


__all__ = [
    "POLICIES",
    "LearnedPositionsWarning",
    "warn_if_tl3_learned_positions",
    "Continuations",
    "generate",
    "check_policy",
    "batch_tokens",
    "position_masks",
]
