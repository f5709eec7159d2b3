"""Outside judges of steered text: classifiers nobody in steerlin wrote.

- sentiment: VADER compound score in [-1, 1] (`vaderSentiment`, which ships its lexicon),
- offensive: `alt-profanity-check`'s probability that a text is offensive, in [0, 1].

Both are optional: `pip install steerlin[eval]`. Nothing else in steerlin needs them; they are
imported only when a judge is called, with a clear error when missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import InputError

JUDGES = ("vader", "profanity")


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


def get_judge(name: str) -> Callable[[Sequence[str]], np.ndarray]:
    """A judge by name: "vader" or "profanity"."""
    if name == "vader":
        return vader
    if name == "profanity":
        return profanity
    raise InputError(f"judge: expected one of {JUDGES}, got {name!r}")


__all__ = ["vader", "profanity", "get_judge", "JUDGES"]
