"""Outside judges of steered text: classifiers nobody in steerlin wrote.

- sentiment: VADER compound score in [-1, 1] (`vaderSentiment`, which ships its lexicon),
- offensive: `alt-profanity-check`'s probability that a text is offensive, in [0, 1],
- second sentiment judges, independent of VADER's lexicon (so that a readout built on VADER's
  word scores is never scored only by VADER): TextBlob's polarity in [-1, 1] (its
  PatternAnalyzer, which ships its lexicon: no NLTK corpus download), and AFINN (AFINN-en-165
  word scores −5..5, summed per text), normalised as score / sqrt(score² + 15) like VADER's
  compound (alpha 15), so it lies in (-1, 1) and saturates smoothly with long texts.

Both are optional: `pip install steerlin[eval]`. Nothing else in steerlin needs them; they are
imported only when a judge is called, with a clear error when missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import InputError

JUDGES = ("vader", "profanity", "textblob", "afinn")


def _missing(pkg: str, exc: Exception) -> InputError:
    return InputError(
        f"this judge needs the optional package {pkg!r}: pip install 'steerlin[eval]' (or pip "
        f"install {pkg}); import failed with: {exc}"
    )


def vader(texts: Sequence[str]) -> np.ndarray:
    """VADER compound sentiment per text, in [-1, 1] (+ positive)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except Exception as exc:  # ImportError, or a broken install
        raise _missing("vaderSentiment", exc) from exc
    sia = SentimentIntensityAnalyzer()
    return np.array([sia.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)


def profanity(texts: Sequence[str]) -> np.ndarray:
    """alt-profanity-check's probability that each text is offensive, in [0, 1]."""
    try:
        from profanity_check import predict_prob
    except Exception as exc:  # ImportError, or a scikit-learn version it cannot unpickle with
        raise _missing("alt-profanity-check", exc) from exc
    if not len(texts):
        return np.zeros(0)
    return np.asarray(predict_prob(list(texts)), dtype=np.float64)


def textblob(texts: Sequence[str]) -> np.ndarray:
    """TextBlob polarity per text, in [-1, 1] (+ positive; PatternAnalyzer, no download)."""
    try:
        from textblob import TextBlob
    except Exception as exc:
        raise _missing("textblob", exc) from exc
    return np.array([TextBlob(t).sentiment.polarity for t in texts], dtype=np.float64)


AFINN_ALPHA = 15.0


def afinn(texts: Sequence[str]) -> np.ndarray:
    """AFINN per text: the summed AFINN-en-165 word scores s, as s / sqrt(s² + 15) in (-1, 1)
    (VADER's normalisation of its summed valences; sign and order of s kept)."""
    try:
        from afinn import Afinn
    except Exception as exc:
        raise _missing("afinn", exc) from exc
    af = Afinn()
    s = np.array([af.score(t) for t in texts], dtype=np.float64)
    return s / np.sqrt(s * s + AFINN_ALPHA)


def get_judge(name: str) -> Callable[[Sequence[str]], np.ndarray]:
    """A judge by name: "vader", "profanity", "textblob" or "afinn"."""
    judges = {"vader": vader, "profanity": profanity, "textblob": textblob, "afinn": afinn}
    if name in judges:
        return judges[name]
    raise InputError(f"judge: expected one of {JUDGES}, got {name!r}")


__all__ = ["vader", "profanity", "textblob", "afinn", "get_judge", "JUDGES"]
