"""Labelled prompts, balanced seeded splits and the Task that draws them; dedupe; a warning
for prompts that all end alike (their last token would carry no concept signal)."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError, ShapeError
from .registry import TaskSpec

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

    def with_chat(self, tokenizer, *, system: str | None = None) -> LabelledPrompts:
        """The prompts as user turns of the chat template (instruct models), ending with the
        generation prompt, same labels. `tokenizer`: the model (preferred) or its tokenizer;
        see `chat_prompts`."""
        return LabelledPrompts(
            tuple(chat_prompts(self.texts, tokenizer, system=system)), self.labels
        )


def chat_prompts(texts, tokenizer, *, system: str | None = None) -> list[str]:
    """Each text as one user turn through `tokenizer.apply_chat_template(...,
    add_generation_prompt=True)`, so the last token is where the assistant's answer starts.

    `tokenizer`: the model (preferred: `model.tokenizer` and its BOS convention are read) or a
    bare tokenizer. A leading BOS token the template writes is removed only where it would be
    doubled: TransformerLens's `to_tokens` (which steerlin uses) prepends BOS itself when
    `model.cfg.default_prepend_bos` is set (Gemma), and two would shift every position. Where
    it is not (steerlin's SmolLM2), the template's text is kept whole. With a bare tokenizer,
    a BOS that recurs in the templated text is turn markup (SmolLM2's `<|im_start|>` opens
    every turn) and is kept; one that only opens the text is dropped.
    Apply it to the templated texts of a split, e.g. `splits.operating.with_chat(model)`.
    """
    cfg = getattr(tokenizer, "cfg", None)
    prepend = None if cfg is None else bool(getattr(cfg, "default_prepend_bos", True))
    if cfg is not None:
        tokenizer = tokenizer.tokenizer
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise InputError(
            "tokenizer: no chat template (an instruct model's tokenizer has one, e.g. "
            "SmolLM2-135M-Instruct: steerlin.load_model('smollm2-135m').tokenizer)"
        )
    bos = getattr(tokenizer, "bos_token", None)
    out = []
    for t in texts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": t}
        ]
        s = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if bos and s.startswith(bos):
            strip = prepend if prepend is not None else bos not in s[len(bos) :]
            if strip:
                s = s[len(bos) :]
        out.append(s)
    return out


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


#: The paper's split sizes per class (concept, operating, eval): what a Task gives `Surrogate.fit`
#: when it has enough examples; smaller tasks get the same 2:1:1 proportions (`default_counts`).
PAPER_COUNTS = (400, 200, 200)


def scaled_counts(n_per_class: int) -> tuple[int, int, int]:
    """(n_concept, n_operating, n_eval) per class for a task with `n_per_class` usable examples
    in its smaller class: the paper's 400/200/200 when there are 800 or more, else the same
    2:1:1 proportions of what there is (300 -> 150/75/75). Fewer than 4 raise InputError."""
    n = int(n_per_class)
    if n >= sum(PAPER_COUNTS):
        return PAPER_COUNTS
    if n < 4:
        raise InputError(
            f"task: its smaller class has {n} usable example(s); a concept/operating/eval split "
            "needs at least 4 per class"
        )
    n_c, n_o = n // 2, n // 4
    return n_c, n_o, min(n // 4, n - n_c - n_o)


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

    def split_chat(self, tokenizer, *args, system: str | None = None, **kwargs) -> Splits:
        """`split(...)`, then every set through the tokenizer's chat template
        (`LabelledPrompts.with_chat`): prompts for an instruct model."""
        sp = self.split(*args, **kwargs)
        chat = lambda lp: lp.with_chat(tokenizer, system=system)
        return Splits(chat(sp.concept), chat(sp.operating), chat(sp.eval), sp.seed)

    def default_counts(self) -> tuple[int, int, int]:
        """The per-class split sizes `Surrogate.fit(model, task)` uses: the paper's 400/200/200
        if the smaller class has 800 examples after deduplication, else 2:1:1 of what it has
        (`scaled_counts`; the shipped demo task, 300 per class: 150/75/75)."""
        unique, _ = dedupe(self.prompts)
        labels = unique.labels_array()
        return scaled_counts(min(int((labels == c).sum()) for c in (0, 1)))

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
