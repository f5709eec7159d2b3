"""The boundary checks of `Surrogate.fit` / `fit_orders` arguments, before any fitting work:
one `InputError` naming the first bad argument."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from .backend import Model, check_model
from .errors import InputError
from .readouts import make_readout
from .validate import check_distinct_tokens, check_int, check_number


def check_fit_args(
    model: Model,
    prompts: Any,
    orders: Sequence[int],
    *,
    bases: Sequence[str],
    variants: Sequence[str],
    basis,
    readout,
    variant,
    label_words,
    concept_fraction,
    batch_size,
    seed,
    distributed,
    context_memory,
) -> tuple:
    """Check the fit's arguments (`bases`, `variants`: the allowed ones); returns
    (context_memory, orders, batch_size, seed, concept_fraction) as checked."""
    context_memory = check_int("context_memory", context_memory, min=0)
    check_model(model)
    orders = [check_int("d", o) for o in orders]
    for o in orders:
        if not 1 <= o <= model.cfg.d_model:
            raise InputError(f"d: expected 1 <= d <= d_model={model.cfg.d_model}, got {o}")
    batch_size = check_int("batch_size", batch_size, min=1)
    seed = check_int("seed", seed)
    if prompts is None or isinstance(prompts, str | bytes | numbers.Number):
        raise InputError(
            f"prompts: expected prompts (a list, LabelledPrompts, Splits, Task or "
            f"(prompts, labels)), got {prompts!r}"
        )
    if not isinstance(distributed, bool):
        raise InputError(f"distributed: expected True or False, got {distributed!r}")
    if label_words is not None and (
        isinstance(label_words, str)
        or not isinstance(label_words, Sequence)
        or len(label_words) != 2
    ):
        raise InputError(
            f"label_words: expected two words or token ids (positive, negative), got "
            f"{label_words!r}"
        )
    concept_fraction = check_number("concept_fraction", concept_fraction)
    if not 0 < concept_fraction < 1:
        raise InputError(
            f"concept_fraction: expected a share strictly between 0 and 1, got {concept_fraction:g}"
        )
    if basis not in bases:
        raise InputError(f"basis: expected one of {bases}, got {basis!r}")
    if variant not in variants:
        raise InputError(f"variant: expected one of {variants}, got {variant!r}")
    if isinstance(readout, str) and readout == "logits":  # before any fitting work
        early = make_readout(model, readout, None, label_words=label_words)
        check_distinct_tokens("label_words", early.pos_token, early.neg_token, label_words)
    return context_memory, orders, batch_size, seed, concept_fraction
