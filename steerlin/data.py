"""Labelled binary tasks: loading (Hugging Face or local files), dedupe, balanced seeded splits.

A task is a binary concept: label 1 is the concept's positive pole (positive sentiment, ironic,
hateful, toxic ...), label 0 its opposite. `load_task` reads one data split of a registered
task, either through `datasets.load_dataset` or, with `data_dir=`, from a local copy in the
original file format (SST-2 TSV, TweetEval text files). `Task.split` then draws three balanced,
pairwise-disjoint sets of prompts per class -- concept (fits the direction), operating (where
gains are measured) and eval -- deterministically from a seed, and applies the prompt template.

Nothing here downloads anything unless `load_task` is called without `data_dir`, and nothing
assumes any particular local folder exists. `load_demo_task` reads a small SST-2 sample shipped
inside the package (see `steerlin/data/README.md` for its source and licence).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FileFormatError, InputError, ShapeError

# --------------------------------------------------------------------------------------------
# Labelled prompts
# --------------------------------------------------------------------------------------------


def _as_label(x: Any, i: int) -> int:
    """One 0/1 label as a Python int (bools and numpy integers accepted; floats only if 0.0/1.0)."""
    if isinstance(x, (bool, np.bool_)):
        return int(x)
    if isinstance(x, (int, np.integer)):
        v = int(x)
    elif isinstance(x, (float, np.floating)) and float(x).is_integer():
        v = int(x)
    else:
        raise InputError(f"labels[{i}]: expected 0 or 1, got {x!r}")
    if v not in (0, 1):
        raise InputError(f"labels[{i}]: expected 0 or 1, got {v}")
    return v


def _check_template(template: str) -> str:
    if not isinstance(template, str):
        raise InputError(f"template: expected a str containing '{{text}}', got {type(template)}")
    if "{text}" not in template:
        raise InputError(
            f"template: {template!r} has no '{{text}}' placeholder, so every prompt would be "
            "identical; write e.g. 'Review: {text}\\nSentiment:'"
        )
    try:
        template.format(text="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(
            f"template: {template!r} cannot be formatted with only text= ({type(exc).__name__}: "
            f"{exc}); write literal braces as '{{{{' and '}}}}'"
        ) from None
    return template


@dataclass(frozen=True)
class LabelledPrompts:
    """Texts with binary labels (1 = the concept's positive pole, 0 = its opposite).

    Lists, numpy arrays and other iterables are accepted and stored as tuples.

    Attributes:
        texts: the prompts.
        labels: one 0/1 label per prompt.
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if isinstance(self.texts, str):
            raise InputError("texts: expected a sequence of strings, got a single string")
        texts = tuple(self.texts)
        labels_in = self.labels.tolist() if hasattr(self.labels, "tolist") else self.labels
        if isinstance(labels_in, (int, str)):
            raise InputError(f"labels: expected a sequence of 0/1 labels, got {labels_in!r}")
        labels_in = tuple(labels_in)
        if len(texts) != len(labels_in):
            raise ShapeError(
                f"texts and labels must have the same length: got {len(texts)} texts and "
                f"{len(labels_in)} labels"
            )
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"texts[{i}]: expected a str, got {type(t).__name__}")
        labels = tuple(_as_label(x, i) for i, x in enumerate(labels_in))
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(zip(self.texts, self.labels, strict=True))

    def labels_array(self) -> np.ndarray:
        """Labels as an int64 numpy array of shape [n]."""
        return np.asarray(self.labels, dtype=np.int64).reshape(len(self.labels))

    def by_class(self, c: int) -> LabelledPrompts:
        """The prompts of class c (0 or 1), in their original order."""
        try:
            c = _as_label(c, 0)
        except InputError:
            raise InputError(f"by_class: expected class 0 or 1, got {c!r}") from None
        keep = [i for i, y in enumerate(self.labels) if y == c]
        return LabelledPrompts(tuple(self.texts[i] for i in keep), (c,) * len(keep))

    @property
    def n_per_class(self) -> dict[int, int]:
        """{0: number of class-0 prompts, 1: number of class-1 prompts}."""
        n1 = sum(self.labels)
        return {0: len(self.labels) - n1, 1: n1}

    def with_template(self, template: str) -> LabelledPrompts:
        """New prompts `template.format(text=t)` with the same labels."""
        template = _check_template(template)
        return LabelledPrompts(tuple(template.format(text=t) for t in self.texts), self.labels)


@dataclass(frozen=True)
class Splits:
    """Three balanced, pairwise-disjoint sets of prompts drawn from one task with one seed.

    Attributes:
        concept: prompts the concept direction is fitted on.
        operating: prompts on which gains / the surrogate are measured.
        eval: held-out prompts for evaluation.
        seed: the seed that drew them.
    """

    concept: LabelledPrompts
    operating: LabelledPrompts
    eval: LabelledPrompts
    seed: int

    def __post_init__(self) -> None:
        for name in ("concept", "operating", "eval"):
            if not isinstance(getattr(self, name), LabelledPrompts):
                raise InputError(
                    f"{name}: expected LabelledPrompts, got {type(getattr(self, name)).__name__}"
                )

    def items(self) -> tuple[tuple[str, LabelledPrompts], ...]:
        """(("concept", ...), ("operating", ...), ("eval", ...))."""
        return (("concept", self.concept), ("operating", self.operating), ("eval", self.eval))


# --------------------------------------------------------------------------------------------
# Common-suffix warning
# --------------------------------------------------------------------------------------------

# The final "piece" of a string: a run of whitespace, of word characters, or of other
# characters -- a rough stand-in for the last token of a BPE/SentencePiece tokenisation.
_LAST_PIECE = re.compile(r"(\s+|\w+|[^\w\s]+)\Z")


def _last_piece(text: str) -> str | None:
    m = _LAST_PIECE.search(text)
    return m.group(0) if m else None


def _common_suffix(prompts: Iterable[Any]) -> str | int | None:
    """The final piece (strings) or final token id (int sequences) shared by every prompt.

    None when there are fewer than two prompts, any prompt is empty, or the endings differ.
    """
    prompts = list(prompts)
    if len(prompts) < 2:
        return None
    ends: set[Any] = set()
    for p in prompts:
        if isinstance(p, str):
            end: Any = _last_piece(p)
        else:
            seq = p.tolist() if hasattr(p, "tolist") else list(p)
            if isinstance(seq, (int, float)) or not seq:
                return None
            end = int(seq[-1])
        if end is None:
            return None
        ends.add(end)
        if len(ends) > 1:
            return None
    return ends.pop()


def _suffix_message(end: str | int, n: int, what: str) -> str:
    desc = f"token id {end}" if isinstance(end, int) else f"{end!r}"
    return (
        f"{what}: all {n} prompts end with the same final token/suffix {desc}. The last "
        "token's layer-0 residual state (its embedding, plus the position embedding in "
        "absolute-position models) is then the same for every prompt, so the layer-0 concept "
        "direction is zero (or only positional) and the earliest layers carry little concept "
        "signal there. This is expected and fine when a fixed suffix (e.g. a readout template "
        "ending in 'Sentiment:') is used on purpose; otherwise check the template/data."
    )


def warn_if_common_suffix(
    prompts: Sequence[str] | Sequence[Sequence[int]], *, what: str = "prompts"
) -> bool:
    """Warn (UserWarning) if every prompt ends in the same last token; return whether it warned.

    Token ids (sequences of ints, e.g. lists or a 2-D tensor) are compared by their last id.
    Strings are not tokenised here, so their final "piece" stands in for the last token: the
    trailing run of word characters (the last word), of punctuation, or of whitespace. All
    texts ending in "Sentiment:" (piece ":"), in "... movie" or in "." count as a common
    suffix; "cats" / "dogs" do not. It is a heuristic and can miss or over-report cases where
    the tokenizer merges characters differently.

    Why it matters: the residual stream at layer 0 is the token embedding (plus a position
    embedding in models with learned absolute positions). When every prompt ends in the same
    token, the last position's layer-0 state is identical for all prompts (up to position in
    absolute-position models), so the class-mean concept direction at layer 0 is zero (or
    purely positional) and early layers carry little concept signal at that position. That
    is expected and fine when a fixed suffix is used on purpose (a readout template such as
    "Review: {text}\\nSentiment:"); otherwise check the template or data.
    """
    if isinstance(prompts, str):
        raise InputError(f"{what}: expected a list of prompts, got a single string")
    items = list(prompts)
    end = _common_suffix(items)
    if end is None:
        return False
    warnings.warn(_suffix_message(end, len(items), what), UserWarning, stacklevel=2)
    return True


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


# --------------------------------------------------------------------------------------------
# Task and splitting
# --------------------------------------------------------------------------------------------


def dedupe(prompts: LabelledPrompts) -> tuple[LabelledPrompts, int]:
    """Keep the first occurrence of each text; drop texts that occur with both labels.

    Returns the deduplicated prompts (original order) and the number of conflicting texts
    dropped.
    """
    first: dict[str, int] = {}
    labels_of: dict[str, set[int]] = {}
    for t, y in prompts:
        first.setdefault(t, y)
        labels_of.setdefault(t, set()).add(y)
    conflicts = {t for t, ys in labels_of.items() if len(ys) > 1}
    keep = [(t, y) for t, y in first.items() if t not in conflicts]
    return (
        LabelledPrompts(tuple(t for t, _ in keep), tuple(y for _, y in keep)),
        len(conflicts),
    )


def _check_count(name: str, n: Any, minimum: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum} (per class), got {n!r}")
    return int(n)


@dataclass(frozen=True)
class Task:
    """One loaded data split of a binary task, plus the prompt template.

    `prompts` holds the raw (untemplated) texts as loaded; the template is applied by `split`.

    Attributes:
        name: task name ("sst2", "tweet_eval_irony", "sst2-demo" ...).
        spec: how it was loaded and what its labels mean.
        prompts: every loaded example (not deduplicated, no template).
        template: prompt template with a "{text}" placeholder.
        data_split: which data split was loaded ("train", "validation", "test").
        source: where the data came from (a Hugging Face id or a local path).
    """

    name: str
    spec: TaskSpec
    prompts: LabelledPrompts
    template: str = "{text}"
    data_split: str = "train"
    source: str = ""

    def __post_init__(self) -> None:
        _check_template(self.template)
        if not isinstance(self.prompts, LabelledPrompts):
            raise InputError(f"prompts: expected LabelledPrompts, got {type(self.prompts)}")

    def with_template(self, template: str) -> Task:
        """The same task with another prompt template."""
        return dataclasses.replace(self, template=_check_template(template))

    def split(
        self, n_concept: int = 400, n_operating: int = 200, n_eval: int = 200, *, seed: int = 0
    ) -> Splits:
        """Balanced, pairwise-disjoint concept / operating / eval prompts (n_* PER CLASS).

        Texts are deduplicated first (exact duplicates kept once, texts seen with both labels
        dropped). Each class is permuted with `numpy.random.default_rng(seed)`; the concept
        set takes the first n_concept of each class, operating the next n_operating, eval the
        next n_eval, and each set is shuffled. The same seed gives identical splits, and the
        concept set depends only on (seed, n_concept). The template is applied to every text;
        warns if all prompts of a set end with the same token-like suffix
        (`warn_if_common_suffix`).

        Raises:
            InputError: a class has fewer than n_concept + n_operating + n_eval examples after
                deduplication (the message names the class and both counts).
        """
        n_c = _check_count("n_concept", n_concept, 1)
        n_o = _check_count("n_operating", n_operating, 0)
        n_e = _check_count("n_eval", n_eval, 0)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"seed: expected a non-negative integer, got {seed!r}")
        need = n_c + n_o + n_e
        unique, n_conflicts = dedupe(self.prompts)
        texts = np.asarray(unique.texts, dtype=object)
        labels = unique.labels_array()
        raw_counts = self.prompts.n_per_class
        for c in (0, 1):
            have = int((labels == c).sum())
            if have < need:
                raise InputError(
                    f"task {self.name!r}: class {c} ({self.spec.class_names[c]}) has {have} "
                    f"examples after deduplication ({raw_counts[c]} loaded, "
                    f"{n_conflicts} texts dropped for having both labels), but "
                    f"n_concept + n_operating + n_eval = {n_c} + {n_o} + {n_e} = {need} per "
                    "class are needed; lower the counts or load more data"
                )
        rng = np.random.default_rng(int(seed))
        perms = [
            np.flatnonzero(labels == c)[rng.permutation(int((labels == c).sum()))] for c in (0, 1)
        ]
        out: dict[str, LabelledPrompts] = {}
        start = 0
        for name, n in (("concept", n_c), ("operating", n_o), ("eval", n_e)):
            idx = np.concatenate([perms[0][start : start + n], perms[1][start : start + n]])
            idx = idx[rng.permutation(idx.size)]
            start += n
            out[name] = LabelledPrompts(
                tuple(self.template.format(text=t) for t in texts[idx]),
                tuple(int(y) for y in labels[idx]),
            )
        flagged = {k: _common_suffix(v.texts) for k, v in out.items()}
        flagged = {k: v for k, v in flagged.items() if v is not None}
        if flagged:  # one warning per call, naming every affected set
            first = next(iter(flagged))
            what = f"task {self.name!r} split(s) {', '.join(flagged)} (template {self.template!r})"
            warnings.warn(
                _suffix_message(flagged[first], len(out[first]), what), UserWarning, stacklevel=2
            )
        return Splits(out["concept"], out["operating"], out["eval"], int(seed))


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


__all__ = [
    "ALIASES",
    "LOCAL_FORMATS",
    "TASKS",
    "LabelledPrompts",
    "Splits",
    "Task",
    "TaskSpec",
    "dedupe",
    "get_task_spec",
    "load_demo_task",
    "load_task",
    "read_sst2_tsv",
    "read_tweeteval",
    "select_demo_rows",
    "warn_if_common_suffix",
    "write_demo_rows",
]
