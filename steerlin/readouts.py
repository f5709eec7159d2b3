"""Readouts: the scalar y read from the final residual x_L (concept or logit difference)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float

from . import backend
from .backend import Model
from .errors import InputError, ShapeError

ReadoutKind = Literal["concept", "logits"]


@dataclass(frozen=True)
class Readout:
    """The scalar y read from x_L.

    "concept": y = <direction, x_L> with direction = unit_L (ConceptDirections).
    "logits": y = logit(pos_token) - logit(neg_token) through ln_final and the unembedding
    (with the model's logit soft-cap, if any).
    """

    kind: ReadoutKind
    direction: Float[torch.Tensor, " H"] | None = None
    pos_token: int | None = None
    neg_token: int | None = None

    def __call__(self, model: Model, x: Float[torch.Tensor, "... H"]) -> torch.Tensor:
        if self.kind == "concept":
            return x @ self.direction.to(x)
        logits = backend.get(model).logits(model, x, [self.pos_token, self.neg_token])
        return logits[..., 0] - logits[..., 1]

    def gradient(self, model: Model, x: Float[torch.Tensor, "b H"]) -> torch.Tensor:
        """∂y/∂x_L at each row of x: the readout's linearisation (constant for "concept")."""
        if self.kind == "concept":
            return self.direction.to(x).expand_as(x).clone()
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self(model, xg).sum(), xg)
        return g

    def to_meta(self) -> dict:
        return {"kind": self.kind, "pos_token": self.pos_token, "neg_token": self.neg_token}


def make_readout(
    model: Model,
    kind: str | Readout,
    unit_final: torch.Tensor | None,
    *,
    label_words: Sequence[str] | Sequence[int] | None = None,
) -> Readout:
    """Build a Readout: "concept" from unit_L, "logits" from two label words or token ids."""
    if isinstance(kind, Readout):
        return kind
    if kind == "concept":
        return Readout("concept", direction=unit_final)
    if kind != "logits":
        raise InputError(f"readout: expected 'concept' or 'logits', got {kind!r}")
    words = tuple(label_words) if label_words is not None else (" positive", " negative")
    if len(words) != 2:
        raise InputError(f"label_words: expected (positive, negative), got {words!r}")
    ids = []
    for w in words:
        if hasattr(w, "__index__") and not isinstance(w, bool | str):
            ids.append(int(w.__index__()))
            continue
        if model.tokenizer is None:
            raise InputError("label_words: the model has no tokenizer; pass two token ids")
        toks = model.to_tokens(w, prepend_bos=False)[0].tolist()
        if len(toks) != 1:
            raise InputError(
                f"label_words: {w!r} is {len(toks)} tokens for this tokenizer; the logit "
                "readout needs single-token words"
            )
        ids.append(toks[0])
    for t in ids:
        if not 0 <= t < model.cfg.d_vocab:
            raise InputError(f"label_words: token id {t} outside 0..{model.cfg.d_vocab - 1}")
    return Readout("logits", pos_token=ids[0], neg_token=ids[1])


def schedule_readouts(model, schedule, readout, label_words) -> list[Readout]:
    """Readout(s) a schedule's target refers to: explicit (a Readout, ConceptDirections or a
    direction tensor [H] / [k, H]), or the schedule's own (its stored concept readout
    direction, or the label tokens of a logit readout)."""
    from .validate import check_distinct_tokens

    if isinstance(readout, Readout):
        return [readout]
    if hasattr(readout, "unit") and hasattr(readout, "scale"):  # ConceptDirections
        return [make_readout(model, "concept", readout.unit[-1])]
    if isinstance(readout, torch.Tensor):
        H = model.cfg.d_model
        if readout.ndim not in (1, 2) or readout.shape[-1] != H:
            raise ShapeError(
                f"readout: expected a direction of shape [{H}] (or [k, {H}]), got "
                f"{tuple(readout.shape)}"
            )
        rows = readout if readout.ndim == 2 else readout[None]
        return [make_readout(model, "concept", r) for r in rows]
    kinds = schedule.meta.get("readout", {"kind": "concept"})
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if readout in (None, "concept") and schedule.readout is not None:
        rows = schedule.readout if schedule.readout.ndim == 2 else schedule.readout[None]
        return [make_readout(model, "concept", r) for r in rows]
    if readout in (None, "logits") and kinds[0].get("kind") == "logits":
        return [
            make_readout(model, "logits", None, label_words=[k["pos_token"], k["neg_token"]])
            for k in kinds
        ]
    if readout == "logits":
        rd = make_readout(model, "logits", None, label_words=label_words)
        check_distinct_tokens("label_words", rd.pos_token, rd.neg_token, label_words)
        return [rd]
    raise InputError(
        "readout: the schedule carries no readout direction; pass readout=ConceptDirections, "
        "a direction tensor or a Readout"
    )


def full_logits(model, x: Float[torch.Tensor, "... H"]) -> Float[torch.Tensor, "... V"]:
    """Next-token logits from final residual states (final norm, unembedding, soft-cap)."""
    return backend.get(model).logits(model, x, None)


def logit_kl(
    model, x0: Float[torch.Tensor, "... H"], x1: Float[torch.Tensor, "... H"]
) -> Float[torch.Tensor, "..."]:
    """KL(p(x0) ‖ p(x1)) of the next-token distributions from final residual states, float64,
    per leading index. Rows go through the unembedding in batches of about 2^23 logits, so
    a vocabulary-sized float64 block stays under ~64 MiB whatever the number of rows."""
    shape = x0.shape[:-1]
    a, b = x0.reshape(-1, x0.shape[-1]), x1.reshape(-1, x1.shape[-1])
    step = max(1, 2**23 // model.cfg.d_vocab)
    out = []
    with torch.no_grad():
        for s in range(0, a.shape[0], step):
            lp0 = torch.log_softmax(full_logits(model, a[s : s + step]).to(torch.float64), -1)
            lp1 = torch.log_softmax(full_logits(model, b[s : s + step]).to(torch.float64), -1)
            out.append((lp0.exp() * (lp0 - lp1)).sum(-1).cpu())
    return torch.cat(out).reshape(shape)


__all__ = [
    "Readout",
    "ReadoutKind",
    "make_readout",
    "schedule_readouts",
    "full_logits",
    "logit_kl",
]
