"""What `Surrogate.fit` is given, sorted into concept (labelled) and operating prompts.

A `LabelledPrompts`, `Splits`, `Task` or `(prompts, labels)` tuple is split without leakage:
the concept split gives the directions, the operating split the dynamics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass(frozen=True)
class FitInputs:
    """What `Surrogate.fit` made of its `prompts` argument."""

    operating: list
    concept: list | None
    concept_labels: list[int] | None
    how: str
    label_names: tuple[str, str] | None = None  # (label 0, label 1), from a Task


def _is_prompt_list(x) -> bool:
    """A list of prompts: strings, or token-id sequences (not a flat list of ints)."""
    if isinstance(x, torch.Tensor):
        return x.ndim == 2
    if isinstance(x, str) or not isinstance(x, Sequence) or len(x) == 0:
        return False
    first = x[0]
    return isinstance(first, str) or (
        isinstance(first, Sequence | torch.Tensor) and not isinstance(first, str)
    )


def _is_label_list(y, n: int) -> bool:
    if isinstance(y, torch.Tensor):
        return y.ndim == 1 and y.shape[0] == n
    if hasattr(y, "tolist") and hasattr(y, "ndim"):  # numpy
        return y.ndim == 1 and len(y) == n
    if isinstance(y, str) or not isinstance(y, Sequence) or len(y) != n:
        return False
    return all(hasattr(v, "__index__") or isinstance(v, float) for v in y)


def split_labelled(
    prompts: Sequence, labels, *, concept_fraction: float = 0.5, seed: int = 0
) -> tuple[list, list[int], list]:
    """Per class, a seeded disjoint split into concept prompts (with labels) and operating ones.

    Each class's prompts are permuted with `numpy.random.default_rng(seed)`; the first
    round(concept_fraction * n_class) (at least 1, at most n_class - 1) go to the concept set.
    Both sets keep the caller's order.
    """
    import numpy as np

    from .directions import check_labels

    if not 0 < float(concept_fraction) < 1:
        raise InputError(f"concept_fraction: expected a number in (0, 1), got {concept_fraction}")
    prompts = prompts.tolist() if isinstance(prompts, torch.Tensor) else list(prompts)
    y = check_labels(labels, len(prompts)).tolist()
    rng = np.random.default_rng(int(seed))
    concept_idx: list[int] = []
    for c in (0, 1):
        idx = [i for i, v in enumerate(y) if v == c]
        if len(idx) < 2:
            raise InputError(
                f"labels: class {c} has {len(idx)} prompt(s); splitting into concept and "
                "operating prompts needs at least 2 per class (or pass directions=, or Splits)"
            )
        k = min(max(1, round(concept_fraction * len(idx))), len(idx) - 1)
        concept_idx += [idx[j] for j in rng.permutation(len(idx))[:k]]
    keep = set(concept_idx)
    concept = sorted(keep)
    operating = [i for i in range(len(prompts)) if i not in keep]
    return [prompts[i] for i in concept], [y[i] for i in concept], [prompts[i] for i in operating]


def resolve_inputs(
    prompts, *, labels_needed: bool, seed: int = 0, concept_fraction: float = 0.5
) -> FitInputs:
    """Sort `Surrogate.fit`'s `prompts` into concept (labelled) and operating prompts."""
    from .data import LabelledPrompts, Splits, Task
    from .data.splits import PAPER_COUNTS

    if isinstance(prompts, Task):
        names = tuple(prompts.spec.class_names)
        counts = prompts.default_counts()
        task_name = prompts.name
        prompts = prompts.split(*counts, seed=seed)
        how = f"Task {task_name!r} split{counts} per class (concept, operating, eval; seed={seed})"
        if counts != PAPER_COUNTS:
            how += (
                f": its smaller class has fewer than {sum(PAPER_COUNTS)} examples, so the "
                f"paper's {PAPER_COUNTS} scaled 2:1:1 to it"
            )
        return FitInputs(
            list(prompts.operating.texts),
            list(prompts.concept.texts),
            list(prompts.concept.labels),
            how,
            names,
        )
    if isinstance(prompts, Splits):
        return FitInputs(
            list(prompts.operating.texts),
            list(prompts.concept.texts),
            list(prompts.concept.labels),
            "Splits (concept -> directions, operating -> identification)",
        )
    labelled = None
    if isinstance(prompts, LabelledPrompts):
        labelled = (list(prompts.texts), list(prompts.labels), "LabelledPrompts")
    elif (
        isinstance(prompts, tuple)
        and len(prompts) == 2
        and _is_prompt_list(prompts[0])
        and _is_label_list(prompts[1], len(prompts[0]))
    ):
        labelled = (prompts[0], prompts[1], "(prompts, labels)")
    if labelled is not None:
        p, y, what = labelled
        if not labels_needed:
            p = p.tolist() if isinstance(p, torch.Tensor) else list(p)
            return FitInputs(p, None, None, f"{what}, all operating (directions given)")
        concept, labels, operating = split_labelled(
            p, y, concept_fraction=concept_fraction, seed=seed
        )
        how = f"{what} split per class (concept_fraction={concept_fraction}, seed={seed})"
        return FitInputs(operating, concept, labels, how)
    if labels_needed:
        raise InputError(
            "prompts: these prompts carry no labels and no directions= was given; pass a "
            "LabelledPrompts, Splits, Task or (prompts, labels) to fit directions from class "
            "means, or directions= (ConceptDirections, a tensor, a dict layer -> vector, a "
            "SteeringVector, a ControlVector or a .gguf file)"
        )
    return FitInputs(prompts, None, None, "prompts (directions given)")


#: fits over more prompts than this show progress bars by default (where stderr is a terminal)
PROGRESS_MIN_PROMPTS = 48


def count_prompts(prompts) -> int | None:
    """How many prompts a fit will forward (concept + operating), without splitting anything;
    None when it cannot tell."""
    from .data import LabelledPrompts, Splits, Task

    try:
        if isinstance(prompts, Task):
            n_c, n_o, _ = prompts.default_counts()
            return 2 * (n_c + n_o)
        if isinstance(prompts, Splits):
            return len(prompts.concept) + len(prompts.operating)
        if isinstance(prompts, LabelledPrompts):
            return len(prompts)
        if isinstance(prompts, tuple) and len(prompts) == 2 and _is_prompt_list(prompts[0]):
            return len(prompts[0])
        return len(prompts)
    except (TypeError, InputError):
        return None


def auto_progress(progress, prompts) -> bool:
    """`progress=None` (the default of the fits): progress bars when stderr is a terminal and
    the fit forwards more than `PROGRESS_MIN_PROMPTS` prompts; True/False as given."""
    import sys

    if progress is not None:
        return progress
    n = count_prompts(prompts)
    return bool(n is not None and n > PROGRESS_MIN_PROMPTS and sys.stderr.isatty())


__all__ = [
    "FitInputs",
    "PROGRESS_MIN_PROMPTS",
    "auto_progress",
    "count_prompts",
    "resolve_inputs",
    "split_labelled",
]
