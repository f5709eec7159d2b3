"""Token lexicons: a score per vocabulary token, for the lexicon readout E_π[s] (the expected
score of the next token, `steerlin.inregime`).

A word lexicon (word → score) is mapped onto a model's tokenizer: every token id is decoded to
its string, the tokenizer's leading-space markers (" ", "▁" SentencePiece, "Ġ" byte-level BPE)
stripped and the rest lowercased; a word scores every token that decodes to it exactly, so
" Good", "good" and "▁good" all take the score of "good". Tokens no word matches score 0, as do
special tokens and the model's padding rows past the tokenizer's vocabulary. Scores keep the
lexicon's own scale (VADER valence −4..4, AFINN −5..5, TextBlob polarity −1..1): the readout is
linear in them, and the per-layer predictors built on it are scale-free.

Builders: `Lexicon.from_dict` (any word → score dict), `Lexicon.vader` (vaderSentiment's own
lexicon: the VADER judge's word valences), `Lexicon.afinn` (AFINN-en-165), `Lexicon.textblob`
(TextBlob/Pattern's adjective polarities, averaged over senses), `Lexicon.profanity`
(alt-profanity-check's linear SVM: each word's weight × idf, the hate judge's own token weights),
`Lexicon.learnt` (smoothed
naive-Bayes log-odds of the normalised token forms in labelled texts). `get_lexicon` builds one
by name. The word-list builders need the optional judges (`pip install 'steerlin[eval]'`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float

from .errors import InputError

F64 = torch.float64
MARKERS = (" ", "▁", "Ġ")
LEXICONS = ("vader", "afinn", "textblob", "profanity")


def _tokenizer(model):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise InputError("model: it has no tokenizer; a word lexicon needs one to map words")
    return tok


def normalise(token: str) -> str:
    """A token string as a lexicon word: leading space markers stripped, lowercased."""
    while token and token[0] in MARKERS:
        token = token[1:]
    return token.lower()


def vocab_forms(model) -> list[str]:
    """The normalised form of every token id 0..d_vocab-1 ("" for special tokens and ids past
    the tokenizer's vocabulary). Token strings come from `convert_ids_to_tokens` (the
    tokenizer's own pieces, markers included), which is exact for word pieces and fast."""
    tok = _tokenizer(model)
    V = int(model.cfg.d_vocab)
    n = min(V, len(tok))
    pieces = tok.convert_ids_to_tokens(list(range(n)))
    special = set(getattr(tok, "all_special_ids", []) or [])
    forms = ["" if (i in special or p is None) else normalise(str(p)) for i, p in enumerate(pieces)]
    return forms + [""] * (V - n)


@dataclass(frozen=True)
class Lexicon:
    """A score per vocabulary token.

    Attributes:
        scores: Float[d_vocab] float64, 0 for tokens no word matched.
        name: where the scores come from ("vader", "afinn", "textblob", "learnt", ...).
        matched: tokens with a lexicon word (the nonzero-capable entries).
        words: lexicon words that matched at least one token.
        meta: builder settings.
    """

    scores: Float[torch.Tensor, " V"]
    name: str
    matched: int
    words: int
    meta: dict = field(default_factory=dict)

    def expected(self, logits: Float[torch.Tensor, "... V"]) -> Float[torch.Tensor, "..."]:
        """E_π[s] under the next-token distribution π = softmax(logits), float64."""
        if logits.shape[-1] != self.scores.shape[0]:
            raise InputError(
                f"logits: expected {self.scores.shape[0]} vocabulary entries, got "
                f"{logits.shape[-1]}"
            )
        pi = torch.softmax(logits.to(F64), -1)
        return pi @ self.scores.to(pi.device)

    def top(self, model, k: int = 10) -> dict[str, list[tuple[str, float]]]:
        """The k highest and lowest scored tokens (decoded), for inspection."""
        tok = _tokenizer(model)
        order = torch.argsort(self.scores)
        dec = lambda ids: [(tok.decode([int(i)]), float(self.scores[i])) for i in ids]
        return {"top": dec(order.flip(0)[:k]), "bottom": dec(order[:k])}

    @classmethod
    def from_dict(
        cls, model, scores: Mapping[str, float], *, name: str = "custom", arg: str = "lexicon"
    ) -> Lexicon:
        """Map a word → score dict onto `model`'s vocabulary (module docstring). A lexicon
        that matches no token raises `InputError` naming `arg`."""
        if not isinstance(scores, Mapping) or not scores:
            raise InputError(f"{arg}: expected a non-empty word -> score mapping")
        table: dict[str, float] = {}
        for w, v in scores.items():
            if not isinstance(w, str):
                raise InputError(f"{arg}: words must be strings, got {w!r}")
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise InputError(f"{arg}: the score of {w!r} is not a number: {v!r}") from None
            if not math.isfinite(v):
                raise InputError(f"{arg}: the score of {w!r} is not finite: {v!r}")
            table.setdefault(normalise(w), v)  # the first spelling of a normalised word wins
        forms = vocab_forms(model)
        out = np.zeros(len(forms), dtype=np.float64)
        hit = np.zeros(len(forms), dtype=bool)
        used = set()
        for i, f in enumerate(forms):
            if f and f in table:
                out[i], hit[i] = table[f], True
                used.add(f)
        if not hit.any():
            raise InputError(
                f"{arg}: no token of this model's vocabulary matches a word of the lexicon "
                f"{name!r} ({len(table)} words)"
            )
        if not out.any():
            raise InputError(f"{arg}: every token the lexicon {name!r} matches scores 0")
        return cls(torch.from_numpy(out), name, int(hit.sum()), len(used), {"source": name})

    @classmethod
    def vader(cls, model) -> Lexicon:
        """vaderSentiment's own lexicon (the VADER judge's word valences, −4..4)."""
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except Exception as exc:
            raise _missing("vaderSentiment", exc) from exc
        return cls.from_dict(model, SentimentIntensityAnalyzer().lexicon, name="vader")

    @classmethod
    def afinn(cls, model) -> Lexicon:
        """AFINN-en-165's word scores (−5..5), as the AFINN judge reads them."""
        try:
            from afinn import Afinn
        except Exception as exc:
            raise _missing("afinn", exc) from exc
        return cls.from_dict(model, Afinn()._dict, name="afinn")

    @classmethod
    def textblob(cls, model) -> Lexicon:
        """TextBlob's PatternAnalyzer lexicon: each word's polarity averaged over its senses
        (the entry TextBlob files under part of speech None), −1..1."""
        try:
            from textblob.en import sentiment
        except Exception as exc:
            raise _missing("textblob", exc) from exc
        words = {w: float(e[None][0]) for w, e in sentiment.items() if None in e}
        return cls.from_dict(model, words, name="textblob")

    @classmethod
    def profanity(cls, model) -> Lexicon:
        """alt-profanity-check's token weights: the linear SVM's coefficient (mean over its
        calibration folds) times the TF-IDF idf of each vocabulary word (+ = offensive), the
        per-occurrence contribution to its decision before the l2 document normalisation."""
        try:
            from profanity_check import profanity_check as pc
        except Exception as exc:
            raise _missing("alt-profanity-check", exc) from exc
        coef = np.mean([c.estimator.coef_[0] for c in pc.model.calibrated_classifiers_], 0)
        w = coef * pc.vectorizer.idf_
        words = {t: float(w[i]) for t, i in pc.vectorizer.vocabulary_.items()}
        return cls.from_dict(model, words, name="profanity")

    @classmethod
    def learnt(
        cls,
        model,
        texts: Sequence[str],
        labels: Sequence[int],
        *,
        alpha: float = 1.0,
        min_count: int = 2,
    ) -> Lexicon:
        """Smoothed naive-Bayes log-odds of each normalised token form in labelled texts:
        s_w = log((n1_w + α)/(N1 + αW)) − log((n0_w + α)/(N0 + αW)) (n_c,w: occurrences of
        form w in class-c texts, N_c their totals, W the forms seen), + = label 1 (the
        `ConceptDirections` sign); forms seen fewer than `min_count` times score 0. The forms
        are then mapped back onto every token decoding to them, as a word lexicon."""
        from .directions import check_labels

        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise InputError("texts: expected a non-empty list of labelled texts")
        if not all(isinstance(t, str) for t in texts):
            raise InputError("texts: expected strings")
        y = check_labels(labels, len(texts)).numpy()
        if not 0 < int(y.sum()) < len(y):
            raise InputError("labels: both classes are needed")
        if not (isinstance(alpha, int | float) and alpha > 0 and math.isfinite(alpha)):
            raise InputError(f"alpha: expected a positive number, got {alpha!r}")
        if not isinstance(min_count, int) or min_count < 1:
            raise InputError(f"min_count: expected a positive int, got {min_count!r}")
        tok = _tokenizer(model)
        forms = vocab_forms(model)
        counts: dict[str, np.ndarray] = {}
        for t, c in zip(texts, y, strict=True):
            for i in tok(t, add_special_tokens=False)["input_ids"]:
                f = forms[i] if i < len(forms) else ""
                if f:
                    counts.setdefault(f, np.zeros(2))[int(c)] += 1
        keep = {f: n for f, n in counts.items() if n.sum() >= min_count}
        if not keep:
            raise InputError(f"texts: no token form occurs {min_count} times or more")
        n = np.stack(list(keep.values()))
        tot = n.sum(0)
        W = len(keep)
        lo = np.log((n + alpha) / (tot + alpha * W))
        words = dict(zip(keep, lo[:, 1] - lo[:, 0], strict=True))
        lex = cls.from_dict(model, words, name="learnt", arg="texts")
        meta = {"source": "learnt", "n_texts": len(texts), "alpha": alpha, "min_count": min_count}
        return cls(lex.scores, "learnt", lex.matched, lex.words, meta)


def _missing(pkg: str, exc: Exception) -> InputError:
    return InputError(
        f"lexicon: this lexicon needs the optional package {pkg!r}: pip install "
        f"'steerlin[eval]' (or pip install {pkg}); import failed with: {exc}"
    )


def get_lexicon(model, lexicon, *, arg: str = "lexicon") -> Lexicon:
    """A `Lexicon` as given, a word → score dict mapped onto `model`, or one by name
    ("vader", "afinn", "textblob"). A Lexicon of another vocabulary size raises InputError."""
    if isinstance(lexicon, Lexicon):
        V = int(model.cfg.d_vocab)
        if lexicon.scores.shape != (V,):
            raise InputError(
                f"{arg}: a lexicon of {lexicon.scores.shape[0]} tokens for a model with {V}"
            )
        if not bool(lexicon.scores.ne(0).any()):
            raise InputError(f"{arg}: every token scores 0 (no token of the vocabulary matched)")
        return lexicon
    if isinstance(lexicon, Mapping):
        return Lexicon.from_dict(model, lexicon, arg=arg)
    if lexicon in LEXICONS:
        return getattr(Lexicon, lexicon)(model)
    raise InputError(
        f"{arg}: expected a Lexicon, a word -> score dict or one of {LEXICONS}, got {lexicon!r}"
    )


__all__ = ["Lexicon", "get_lexicon", "vocab_forms", "normalise", "LEXICONS"]
