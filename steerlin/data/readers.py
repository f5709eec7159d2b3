"""Readers: a registered task's split from a local copy in its original format (SST-2 TSV,
TweetEval text files) or from Hugging Face `datasets`; `load_task` picks one."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FileFormatError, InputError
from .registry import SPLIT_ALIASES, TASKS, TaskSpec, get_task_spec
from .splits import LabelledPrompts, Task, _check_count, _check_template

# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _clean(texts: Iterable[Any], labels: Iterable[int | None]) -> LabelledPrompts:
    """Strip texts, drop rows with an empty text or a None (dropped) label."""
    keep_t: list[str] = []
    keep_y: list[int] = []
    for t, y in zip(texts, labels, strict=True):
        if y is None or t is None:
            continue
        t = str(t).strip()
        if t:
            keep_t.append(t)
            keep_y.append(y)
    return LabelledPrompts(tuple(keep_t), tuple(keep_y))


def _subsample(n: int, max_examples: int | None) -> np.ndarray | None:
    """Sorted row indices of a seeded random subset of size max_examples (None: keep all)."""
    if max_examples is None or max_examples >= n:
        return None
    return np.sort(np.random.default_rng(0).choice(n, size=max_examples, replace=False))


_SST2_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
_TWEETEVAL_STEMS = {"train": "train", "validation": "val", "test": "test"}


def _expected_files(spec: TaskSpec, split: str) -> str:
    if spec.local_format == "sst2_tsv":
        f = _SST2_FILES[split]
        return (
            f"'{f}' (TSV with header 'label<TAB>sentence' or 'label<TAB>content') in data_dir, "
            f"data_dir/sst2 or data_dir/SST-2"
        )
    if spec.local_format == "tweeteval_txt":
        s = _TWEETEVAL_STEMS[split]
        sub = spec.local_subset
        return (
            f"'{s}_text.txt' and '{s}_labels.txt' (one tweet / one label a line) in "
            f"data_dir, data_dir/tweeteval/{sub}, data_dir/{sub} or "
            f"data_dir/datasets/{sub}"
        )
    return "(no local format: this task can only be loaded through Hugging Face datasets)"


def read_sst2_tsv(path: str | Path) -> tuple[list[str], list[int]]:
    """Raw texts and int labels of an SST-2 TSV (header with 'label' and 'sentence'/'content').

    Quotes are literal (QUOTE_NONE): SST-2 sentences contain unbalanced quote characters.
    """
    path = Path(path)
    texts: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise FileFormatError(f"{str(path)!r}: empty file, expected a header row")
        cols = [h.strip().lower() for h in header]
        text_col = next((cols.index(c) for c in ("sentence", "content", "text") if c in cols), None)
        if "label" not in cols or text_col is None:
            raise FileFormatError(
                f"{str(path)!r}: expected a header with 'label' and 'sentence'/'content'/'text' "
                f"columns, got {header!r} (the GLUE SST-2 test file has no labels)"
            )
        label_col = cols.index("label")
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(cols):
                raise FileFormatError(
                    f"{str(path)!r} line {reader.line_num}: expected {len(cols)} tab-separated "
                    f"fields, got {len(row)}"
                )
            try:
                labels.append(int(row[label_col].strip()))
            except ValueError:
                raise FileFormatError(
                    f"{str(path)!r} line {reader.line_num}: label {row[label_col]!r} is not an "
                    "integer"
                ) from None
            texts.append(row[text_col])
    return texts, labels


def _read_lines(path: Path) -> list[str]:
    """Lines split on '\\n' only (tweets may hold other Unicode line separators)."""
    with path.open(encoding="utf-8", newline="") as f:
        data = f.read()
    lines = data.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def read_tweeteval(folder: str | Path, split: str) -> tuple[list[str], list[int]]:
    """Raw texts and int labels from `{split}_text.txt` / `{split}_labels.txt` in folder."""
    folder = Path(folder)
    stem = _TWEETEVAL_STEMS.get(SPLIT_ALIASES.get(split, split), split)
    tpath, lpath = folder / f"{stem}_text.txt", folder / f"{stem}_labels.txt"
    texts = _read_lines(tpath)
    raw = _read_lines(lpath)
    labels: list[int] = []
    for i, s in enumerate(raw):
        try:
            labels.append(int(s.strip()))
        except ValueError:
            raise FileFormatError(
                f"{str(lpath)!r} line {i + 1}: label {s!r} is not an integer"
            ) from None
    if len(texts) != len(labels):
        raise FileFormatError(
            f"{str(tpath)!r} has {len(texts)} lines but {str(lpath)!r} has {len(labels)} labels; "
            "they must correspond line by line"
        )
    return texts, labels


def _find_local(spec: TaskSpec, data_dir: Path, split: str) -> Path:
    """The file (sst2) or folder (tweeteval) holding the split, trying both folder layouts."""
    if spec.local_format == "sst2_tsv":
        if data_dir.is_file():
            return data_dir
        fname = _SST2_FILES[split]
        for d in (data_dir, data_dir / "sst2", data_dir / "SST-2"):
            if (d / fname).is_file():
                return d / fname
    else:
        stem = _TWEETEVAL_STEMS[split]
        sub = spec.local_subset or ""
        for d in (
            data_dir,
            data_dir / "tweeteval" / sub,
            data_dir / sub,
            data_dir / "datasets" / sub,
        ):
            if (d / f"{stem}_text.txt").is_file() and (d / f"{stem}_labels.txt").is_file():
                return d
    raise InputError(
        f"data_dir={str(data_dir)!r}: no local {spec.name} data for split {split!r}; expected "
        + _expected_files(spec, split)
    )


def _load_local(
    spec: TaskSpec, data_dir: str | Path, split: str, max_examples: int | None
) -> tuple[LabelledPrompts, str]:
    if spec.local_format is None:
        readable = sorted(k for k, v in TASKS.items() if v.local_format is not None)
        raise InputError(
            f"task {spec.name!r} has no local file format; data_dir= works for {readable} and "
            "'tweet_eval:<subset>'. Load it online (no data_dir), or from a Hugging Face cache "
            "with HF_DATASETS_OFFLINE=1"
        )
    canon = SPLIT_ALIASES.get(split.lower().strip())
    if canon is None or canon not in dict(spec.splits):
        raise InputError(
            f"split: expected one of {sorted(dict(spec.splits))} (or 'val'/'dev'), got {split!r}"
        )
    where = _find_local(spec, Path(data_dir).expanduser(), canon)
    if spec.local_format == "sst2_tsv":
        texts, raw = read_sst2_tsv(where)
    else:
        texts, raw = read_tweeteval(where, canon)
    mapped = spec.map_labels(raw)
    prompts = _clean(texts, mapped)
    idx = _subsample(len(prompts), max_examples)
    if idx is not None:
        prompts = LabelledPrompts(
            tuple(prompts.texts[i] for i in idx), tuple(prompts.labels[i] for i in idx)
        )
    return prompts, str(where)


def _load_hf(spec: TaskSpec, split: str, max_examples: int | None) -> tuple[LabelledPrompts, str]:
    canon = SPLIT_ALIASES.get(split.lower().strip())
    hf_split = spec.hf_split(split) if canon is not None else split
    source = spec.hf_id + (f" ({spec.hf_config})" if spec.hf_config else "")
    try:
        import datasets

        ds = datasets.load_dataset(spec.hf_id, spec.hf_config, split=hf_split)
    except Exception as exc:  # no internet, no cache, hub errors: all get the same advice
        if spec.local_format is not None and canon is not None:
            advice = (
                f"To load it offline pass data_dir= pointing at a local copy: "
                f"{_expected_files(spec, canon)}."
            )
        else:
            advice = (
                "This task has no local file format; make the dataset available in the "
                "Hugging Face cache (then HF_DATASETS_OFFLINE=1 works), or use a task that "
                "can be read with data_dir= (sst2, tweet_eval_*)."
            )
        raise InputError(
            f"could not load task {spec.name!r} from Hugging Face {source}, split "
            f"{hf_split!r} ({type(exc).__name__}: {exc}). {advice}"
        ) from exc
    missing = [c for c in (spec.text_field, spec.label_field) if c not in ds.column_names]
    if missing:
        raise FileFormatError(
            f"{source} split {hf_split!r} has columns {ds.column_names}, missing {missing}"
        )
    mapped = spec.map_labels(list(ds[spec.label_field]))
    rows = [i for i, y in enumerate(mapped) if y is not None]
    idx = _subsample(len(rows), max_examples)
    if idx is not None:
        rows = [rows[i] for i in idx]
    if len(rows) == len(mapped):
        texts = list(ds[spec.text_field])
    else:
        texts = list(ds.select(rows)[spec.text_field])
    return _clean(texts, [mapped[i] for i in rows]), f"hf:{source}"


def load_task(
    name: str,
    *,
    data_dir: str | Path | None = None,
    split: str = "train",
    template: str = "{text}",
    max_examples: int | None = None,
) -> Task:
    """Load one data split of a binary task.

    Args:
        name: a key of TASKS ("sst2", "imdb", "amazon_polarity", "yelp_polarity",
            "civil_comments", "tweet_eval_irony", "tweet_eval_hate", "tweet_eval_offensive",
            "tweet_eval_sentiment"), an alias ("SST-2", "irony", "hate", "offensive"), or
            "tweet_eval:<subset>" for any TweetEval subset with binary labels.
        data_dir: read a local copy instead of Hugging Face. For SST-2 the folder holding
            train.tsv/dev.tsv or its parent holding sst2/; for TweetEval the folder holding
            {split}_text.txt/{split}_labels.txt or a parent holding tweeteval/<subset>/ or
            <subset>/.
        split: "train", "validation" (also "val", "dev") or "test".
        template: prompt template with "{text}", applied by `Task.split`.
        max_examples: keep at most this many examples: a seeded (seed 0) random subset in
            file order, not the head, because some splits are sorted by label (IMDb).

    Texts are stripped and empty texts dropped; rows whose raw label is dropped by the spec
    (TweetEval's neutral) are removed. Duplicates are kept here and removed by `Task.split`.

    Raises:
        InputError: unknown task or split, no local files found, or the online load failed
            (the message says which local files to pass with data_dir=).
        FileFormatError: a local file is malformed.
    """
    spec = get_task_spec(name)
    _check_template(template)
    if not isinstance(split, str):
        raise InputError(f"split: expected a str, got {type(split).__name__}")
    if max_examples is not None:
        max_examples = _check_count("max_examples", max_examples, 1)
    if data_dir is not None:
        prompts, source = _load_local(spec, data_dir, split, max_examples)
    else:
        prompts, source = _load_hf(spec, split, max_examples)
    if len(prompts) == 0:
        raise InputError(f"task {spec.name!r} split {split!r}: no examples left after loading")
    canon = SPLIT_ALIASES.get(split.lower().strip(), split)
    return Task(spec.name, spec, prompts, template, canon, source)
