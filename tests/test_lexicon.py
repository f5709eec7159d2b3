"""Token lexicons (steerlin.lexicon) mapped onto a tokenizer, and the second sentiment judges
(TextBlob, AFINN) in steerlin.judges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _wordtok import NEG, POS, with_tokenizer
from conftest import make_gemma_like

from steerlin.errors import SteerlinError
from steerlin.judges import get_judge
from steerlin.lexicon import Lexicon, get_lexicon, normalise, vocab_forms

F64 = torch.float64


@pytest.fixture(scope="module")
def model():
    return with_tokenizer(make_gemma_like(n_layers=2))


def _id(model, word: str) -> int:
    return model.tokenizer.convert_tokens_to_ids(word)


def test_normalise_strips_markers_and_case():
    assert normalise("▁Good") == "good"
    assert normalise("Ġgood") == "good"
    assert normalise(" BAD") == "bad"
    assert normalise("good") == "good"
    assert normalise("▁") == ""


def test_from_dict_maps_words_onto_tokens(model):
    V = model.cfg.d_vocab
    forms = vocab_forms(model)
    assert len(forms) == V and forms[_id(model, "good")] == "good"
    assert forms[0] == ""  # <pad>: special tokens never match
    lex = Lexicon.from_dict(model, {"Good": 2.0, "awful": -3.0, "zebra": 1.0}, name="mine")
    assert lex.scores.shape == (V,) and lex.scores.dtype == F64
    assert lex.scores[_id(model, "good")] == 2.0
    assert lex.scores[_id(model, "awful")] == -3.0
    assert lex.matched == 2 and lex.words == 2 and lex.name == "mine"
    assert int(lex.scores.ne(0).sum()) == 2  # every other token (and "zebra") scores 0
    z = torch.randn(3, V, dtype=F64)
    assert torch.allclose(lex.expected(z), torch.softmax(z, -1) @ lex.scores)


def test_learnt_lexicon_sign(model):
    labels = [1] * len(POS) + [0] * len(NEG)
    lex = Lexicon.learnt(model, POS + NEG, labels, min_count=1)
    s = lambda w: float(lex.scores[_id(model, w)])
    assert s("good") > 0 and s("great") > 0  # + = label 1
    assert s("bad") < 0 and s("awful") < 0
    assert s("movie") == pytest.approx(0.0, abs=1e-12)  # as often in each class (equal totals): 0
    flipped = Lexicon.learnt(model, POS + NEG, [1 - y for y in labels], min_count=1)
    assert torch.allclose(flipped.scores, -lex.scores)
    assert lex.meta["n_texts"] == 20


@pytest.mark.parametrize(
    "name,pkg", [("vader", "vaderSentiment"), ("afinn", "afinn"), ("textblob", "textblob")]
)
def test_judge_lexicons(model, name, pkg):
    pytest.importorskip(pkg)
    lex = get_lexicon(model, name)
    assert lex.name == name and lex.matched >= 6
    assert float(lex.scores[_id(model, "good")]) > 0
    assert float(lex.scores[_id(model, "awful")]) < 0
    assert float(lex.scores[_id(model, "movie")]) == 0


def test_profanity_lexicon(model):
    pytest.importorskip("profanity_check")
    lex = get_lexicon(model, "profanity")
    assert lex.name == "profanity" and lex.matched >= 10
    assert float(lex.scores[_id(model, "hate")]) > float(lex.scores[_id(model, "love")])


def test_bad_lexicons(model):
    with pytest.raises(SteerlinError, match="lexicon"):
        Lexicon.from_dict(model, {"zebra": 1.0, "quokka": -1.0})  # no token in the vocabulary
    with pytest.raises(SteerlinError, match="lexicon"):
        Lexicon.from_dict(model, {})
    with pytest.raises(SteerlinError, match="lexicon"):
        Lexicon.from_dict(model, {"good": float("nan")})
    with pytest.raises(SteerlinError, match="lexicon"):
        Lexicon.from_dict(model, {"good": 0.0})
    with pytest.raises(SteerlinError, match="lexicon"):
        get_lexicon(model, "sentiwordnet")
    with pytest.raises(SteerlinError, match="lexicon"):
        get_lexicon(model, Lexicon(torch.ones(5, dtype=F64), "short", 5, 5))
    with pytest.raises(SteerlinError, match="labels"):
        Lexicon.learnt(model, POS, [1] * len(POS))
    with pytest.raises(SteerlinError, match="texts"):
        Lexicon.learnt(model, ["zzz qqq", "yyy"], [1, 0])  # only unknown forms
    bare = make_gemma_like(n_layers=1)
    bare.tokenizer = None
    with pytest.raises(SteerlinError, match="model"):
        Lexicon.from_dict(bare, {"good": 1.0})


@pytest.mark.parametrize("name,pkg", [("textblob", "textblob"), ("afinn", "afinn")])
def test_second_judges(name, pkg):
    pytest.importorskip(pkg)
    judge = get_judge(name)
    s = judge(
        [
            "What a wonderful, great and lovely day.",
            "This is awful, terrible and bad.",
            "The table.",
        ]
    )
    assert s.shape == (3,) and s.dtype == np.float64
    assert s[0] > 0.3 and s[1] < -0.3 and s[2] == 0
    assert np.all(np.abs(s) <= 1)
    assert judge([]).shape == (0,)


def test_unknown_judge():
    with pytest.raises(SteerlinError, match="judge"):
        get_judge("sentiwordnet")
