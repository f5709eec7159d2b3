"""The SST-2 sample shipped inside the package (`sst2_demo.tsv`, see README.md beside it):
`load_demo_task`, and the tooling that selected and wrote it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import InputError
from .readers import _clean, read_sst2_tsv
from .registry import TASKS
from .splits import Task, _check_template, dedupe

# --------------------------------------------------------------------------------------------
# Shipped demo data
# --------------------------------------------------------------------------------------------

DEMO_FILE = "sst2_demo.tsv"


def load_demo_task(template: str = "{text}") -> Task:
    """The shipped SST-2 sample (300 short sentences per class), readable without any download.

    See `steerlin/data/README.md` for how it was drawn and its source and licence.
    """
    ref = resources.files("steerlin").joinpath("data", DEMO_FILE)
    with resources.as_file(ref) as path:
        texts, raw = read_sst2_tsv(path)
    spec = dataclasses.replace(
        TASKS["sst2"],
        name="sst2-demo",
        description="300 short (6-20 word) SST-2 training sentences per class shipped with "
        "steerlin: 1 positive, 0 negative",
        splits=(("train", "train"),),
        local_format=None,
    )
    prompts = _clean(texts, spec.map_labels(raw))
    return Task(
        "sst2-demo", spec, prompts, _check_template(template), "train", f"steerlin/data/{DEMO_FILE}"
    )


def select_demo_rows(
    train_tsv: str | Path,
    n_per_class: int = 300,
    *,
    min_words: int = 6,
    max_words: int = 20,
    seed: int = 0,
) -> list[tuple[int, str]]:
    """How `steerlin/data/sst2_demo.tsv` was drawn from the GLUE SST-2 train.tsv.

    Strip, deduplicate (texts with both labels dropped), keep texts of min_words..max_words
    whitespace-separated words, then per class a seeded random sample of n_per_class, listed
    class 0 first, each class in file order.
    """
    texts, raw = read_sst2_tsv(train_tsv)
    unique, _ = dedupe(_clean(texts, raw))
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, str]] = []
    for c in (0, 1):
        pool = [t for t, y in unique if y == c and min_words <= len(t.split()) <= max_words]
        if len(pool) < n_per_class:
            raise InputError(f"class {c}: only {len(pool)} texts qualify, need {n_per_class}")
        pick = np.sort(rng.choice(len(pool), size=n_per_class, replace=False))
        rows += [(c, pool[i]) for i in pick]
    return rows


def write_demo_rows(rows: Sequence[tuple[int, str]], path: str | Path) -> None:
    """Write (label, text) rows as a `label<TAB>content` TSV with '\\n' line ends."""
    with Path(path).open("w", encoding="utf-8", newline="") as f:
        f.write("label\tcontent\n")
        for y, t in rows:
            if "\t" in t or "\n" in t or "\r" in t:
                raise InputError(f"text {t!r} contains a tab or newline")
            f.write(f"{y}\t{t}\n")


__all__ = ["DEMO_FILE", "load_demo_task", "select_demo_rows", "write_demo_rows"]
