"""The task registry: what each binary task is (its Hugging Face id, columns, local file
format, label words), looked up by name or alias."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

# --------------------------------------------------------------------------------------------
# Task specifications and registry
# --------------------------------------------------------------------------------------------

LOCAL_FORMATS = ("sst2_tsv", "tweeteval_txt")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
_STD_SPLITS = (("train", "train"), ("validation", "validation"), ("test", "test"))


@dataclass(frozen=True)
class TaskSpec:
    """How to load one binary task and map its raw labels to 0/1.

    Attributes:
        name: registry name.
        hf_id: Hugging Face dataset id, e.g. "cardiffnlp/tweet_eval".
        hf_config: dataset config name, or None.
        text_field: column holding the text.
        label_field: column holding the raw label (int class or float score).
        positive_label_word: label word for class 1 in a next-token logit readout, with a
            leading space (" positive"). Not guaranteed to be a single token for every
            tokenizer; readouts should check.
        negative_label_word: label word for class 0 (" negative").
        description: what labels 0 and 1 mean.
        class_names: (name of class 0, name of class 1), for messages.
        label_map: raw int label -> 0/1, as pairs; empty means the raw labels already are 0/1.
        drop_labels: raw int labels whose rows are dropped (e.g. TweetEval's neutral).
        threshold: for float scores: label 1 iff raw >= threshold (label_map then unused).
        splits: (canonical split, Hugging Face split name) pairs available for this task.
        local_format: "sst2_tsv", "tweeteval_txt" or None (no offline reader).
        local_subset: folder name of the subset in a local TweetEval copy ("irony").
    """

    name: str
    hf_id: str
    hf_config: str | None
    text_field: str
    label_field: str
    positive_label_word: str
    negative_label_word: str
    description: str
    class_names: tuple[str, str] = ("negative", "positive")
    label_map: tuple[tuple[int, int], ...] = ()
    drop_labels: tuple[int, ...] = ()
    threshold: float | None = None
    splits: tuple[tuple[str, str], ...] = _STD_SPLITS
    local_format: str | None = None
    local_subset: str | None = None

    def __post_init__(self) -> None:
        if self.local_format is not None and self.local_format not in LOCAL_FORMATS:
            raise InputError(
                f"local_format: expected one of {LOCAL_FORMATS} or None, got {self.local_format!r}"
            )
        for k, v in self.label_map:
            if v not in (0, 1):
                raise InputError(f"label_map: raw label {k} maps to {v}; targets must be 0 or 1")
        for w in (self.positive_label_word, self.negative_label_word):
            if not isinstance(w, str) or not w.strip():
                raise InputError(f"label words must be non-empty strings, got {w!r}")

    def map_label(self, raw: Any) -> int | None:
        """0/1 for one raw label, None if the row is dropped; InputError if it is not binary."""
        return self.map_labels([raw])[0]

    def map_labels(self, raws: Iterable[Any]) -> list[int | None]:
        """Map raw labels to 0/1 (None = drop the row); InputError listing unmappable labels."""
        out: list[int | None] = []
        bad: set[Any] = set()
        if self.threshold is not None:
            for r in raws:
                try:
                    v = float(r)
                except (TypeError, ValueError):
                    bad.add(r)
                    out.append(None)
                    continue
                if math.isnan(v):
                    bad.add(r)
                    out.append(None)
                else:
                    out.append(int(v >= self.threshold))
            if bad:
                raise InputError(
                    f"task {self.name!r}: {self.label_field!r} scores must be numbers to "
                    f"threshold at {self.threshold}, got {sorted(map(repr, bad))[:5]}"
                )
            return out
        mapping = dict(self.label_map) if self.label_map else {0: 0, 1: 1}
        drop = set(self.drop_labels)
        for r in raws:
            try:
                key = int(r)
                if key != r:
                    raise ValueError
            except (TypeError, ValueError):
                bad.add(repr(r))
                out.append(None)
                continue
            if key in drop:
                out.append(None)
            elif key in mapping:
                out.append(mapping[key])
            else:
                bad.add(key)
                out.append(None)
        if bad:
            hint = (
                " (label -1 marks an unlabelled split, e.g. the hidden GLUE test labels or "
                "IMDb's 'unsupervised' split; load a labelled split instead)"
                if -1 in bad
                else ""
            )
            raise InputError(
                f"task {self.name!r} is binary but raw labels {sorted(bad, key=str)} are "
                f"neither mapped to 0/1 nor dropped (known: {sorted(mapping)}, dropped: "
                f"{sorted(drop)}){hint}"
            )
        return out

    def hf_split(self, split: str) -> str:
        """The Hugging Face split name for a canonical split ("train"/"validation"/"test")."""
        canon = SPLIT_ALIASES.get(split.lower().strip())
        table = dict(self.splits)
        if canon is None or canon not in table:
            raise InputError(f"split: task {self.name!r} has splits {sorted(table)}, got {split!r}")
        return table[canon]


def _tweet_eval(
    subset: str, pos: str, neg: str, description: str, class_names: tuple[str, str], **kw: Any
) -> TaskSpec:
    return TaskSpec(
        name=f"tweet_eval_{subset}",
        hf_id="cardiffnlp/tweet_eval",
        hf_config=subset,
        text_field="text",
        label_field="label",
        positive_label_word=pos,
        negative_label_word=neg,
        description=description,
        class_names=class_names,
        local_format="tweeteval_txt",
        local_subset=subset,
        **kw,
    )


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2",
        hf_id="nyu-mll/glue",  # the GLUE benchmark; "stanfordnlp/sst2" holds the same data
        hf_config="sst2",
        text_field="sentence",
        label_field="label",
        positive_label_word=" positive",
        negative_label_word=" negative",
        description="SST-2 movie-review sentences/phrases: 1 positive, 0 negative sentiment "
        "(the GLUE test split is unlabelled)",
        local_format="sst2_tsv",
    ),
    "imdb": TaskSpec(
        name="imdb",
        hf_id="stanfordnlp/imdb",
        hf_config=None,
        text_field="text",
        label_field="label",
        positive_label_word=" positive",
        negative_label_word=" negative",
        description="IMDb movie reviews: 1 positive, 0 negative (splits are sorted by label)",
        splits=(("train", "train"), ("test", "test")),
    ),
    "amazon_polarity": TaskSpec(
        name="amazon_polarity",
        hf_id="fancyzhx/amazon_polarity",
        hf_config=None,
        text_field="content",
        label_field="label",
        positive_label_word=" positive",
        negative_label_word=" negative",
        description="Amazon review bodies: 1 positive (4-5 stars), 0 negative (1-2 stars)",
        splits=(("train", "train"), ("test", "test")),
    ),
    "yelp_polarity": TaskSpec(
        name="yelp_polarity",
        hf_id="fancyzhx/yelp_polarity",
        hf_config=None,
        text_field="text",
        label_field="label",
        positive_label_word=" positive",
        negative_label_word=" negative",
        description="Yelp reviews: 1 positive (3-4 stars), 0 negative (1-2 stars)",
        splits=(("train", "train"), ("test", "test")),
    ),
    "civil_comments": TaskSpec(
        name="civil_comments",
        hf_id="google/civil_comments",
        hf_config=None,
        text_field="text",
        label_field="toxicity",
        positive_label_word=" toxic",
        negative_label_word=" civil",
        description="Civil Comments: 1 toxic (toxicity score >= 0.5), 0 non-toxic",
        class_names=("non-toxic", "toxic"),
        threshold=0.5,
    ),
    "tweet_eval_irony": _tweet_eval(
        "irony",
        " ironic",
        " sincere",
        "TweetEval irony: 1 ironic, 0 not ironic",
        ("not ironic", "ironic"),
    ),
    "tweet_eval_hate": _tweet_eval(
        "hate",
        " hateful",
        " benign",
        "TweetEval hate speech (against immigrants and women): 1 hateful, 0 not hateful",
        ("not hateful", "hateful"),
    ),
    "tweet_eval_offensive": _tweet_eval(
        "offensive",
        " offensive",
        " harmless",
        "TweetEval offensive language: 1 offensive, 0 not offensive",
        ("not offensive", "offensive"),
    ),
    "tweet_eval_sentiment": _tweet_eval(
        "sentiment",
        " positive",
        " negative",
        "TweetEval sentiment, neutral dropped: 1 positive (raw 2), 0 negative (raw 0)",
        ("negative", "positive"),
        label_map=((0, 0), (2, 1)),
        drop_labels=(1,),
    ),
}

ALIASES: dict[str, str] = {
    "sst_2": "sst2",
    "glue_sst2": "sst2",
    "stanfordnlp/sst2": "sst2",
    "glue/sst2": "sst2",
    "irony": "tweet_eval_irony",
    "hate": "tweet_eval_hate",
    "offensive": "tweet_eval_offensive",
    "tweeteval_irony": "tweet_eval_irony",
    "tweeteval_hate": "tweet_eval_hate",
    "tweeteval_offensive": "tweet_eval_offensive",
    "tweeteval_sentiment": "tweet_eval_sentiment",
    "imdb_reviews": "imdb",
    "amazon": "amazon_polarity",
    "yelp": "yelp_polarity",
    "civilcomments": "civil_comments",
}


def _normalise(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def get_task_spec(name: str) -> TaskSpec:
    """The TaskSpec for a registry name, an alias, or "tweet_eval:<subset>".

    Names are case-insensitive and "-" equals "_" ("SST-2" -> "sst2"). Any TweetEval subset
    not in the registry ("tweet_eval:stance_climate") gets a spec that keeps raw labels 0/1
    and fails at load time if the subset has other labels.
    """
    if isinstance(name, TaskSpec):
        return name
    if not isinstance(name, str):
        raise InputError(f"task name: expected a str, got {type(name).__name__}")
    key = _normalise(name)
    key = ALIASES.get(key, key)
    if key in TASKS:
        return TASKS[key]
    m = re.fullmatch(r"(?:cardiffnlp/)?tweet_?eval[:/](\w+)", key)
    if m:
        subset = m.group(1)
        if f"tweet_eval_{subset}" in TASKS:
            return TASKS[f"tweet_eval_{subset}"]
        spec = _tweet_eval(
            subset,
            " yes",
            " no",
            f"TweetEval {subset}: raw labels used as-is (must be 0/1)",
            ("class 0", "class 1"),
        )
        return dataclasses.replace(spec, name=f"tweet_eval:{subset}")
    raise InputError(
        f"unknown task {name!r}; known: {sorted(TASKS)}, aliases {sorted(ALIASES)}, or "
        "'tweet_eval:<subset>'"
    )
