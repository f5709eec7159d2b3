"""Where-to-steer predictors (steerlin.predictors) on tiny models, with answers known by
construction where possible."""

from __future__ import annotations

import pytest
import torch
from _wordtok import with_tokenizer
from conftest import make_gpt2_like

from steerlin import predictors as pr
from steerlin.errors import InputError, ShapeError

F64 = torch.float64


@pytest.fixture(scope="module")
def model():
    import conftest

    m = with_tokenizer(make_gpt2_like(n_layers=3))
    conftest._MODELS.append(m)
    return m


# class 1 prompts end in "good", class 0 in "bad": x_0 (token + position embedding of the last
# token) separates them perfectly, whatever the random weights
POS = ["the movie was good", "it is good", "the plot is very good", "a film and good"]
NEG = ["the movie was bad", "it is bad", "the plot is very bad", "a film and bad"]
LABELS = [1] * 4 + [0] * 4


def test_probe_is_perfect_where_the_label_is_the_last_token(model):
    acc = pr.probe_accuracy(model, POS + NEG, LABELS, seed=0)
    assert acc.shape == (3,) and acc[0] == 1.0
    assert ((acc >= 0) & (acc <= 1)).all()


def test_probe_is_chance_level_when_labels_ignore_the_text(model):
    texts = POS + NEG
    shuffled = [1, 0, 1, 0, 1, 0, 1, 0]  # unrelated to the last word: x_0 cannot decode it
    acc = pr.probe_accuracy(model, texts, shuffled, seed=0)
    assert float(acc[0]) <= 0.75


@pytest.mark.tl3
def test_logit_lens_accuracy_matches_ln_final_and_unembed_by_hand(model):
    acc = pr.logit_lens_accuracy(model, POS + NEG, LABELS, label_words=["good", "bad"])
    good, bad = (model.to_tokens(w, prepend_bos=False)[0, 0] for w in ("good", "bad"))
    want = []
    for layer in range(model.cfg.n_layers):
        right = 0.0
        for text, y in zip(POS + NEG, LABELS, strict=True):
            _, cache = model.run_with_cache(text)
            x = cache[f"blocks.{layer}.hook_resid_pre"][0, -1]
            z = model.unembed(model.ln_final(x[None, None]))[0, 0]
            m = torch.sign(z[good] - z[bad]) * (1 if y else -1)
            right += float((m + 1) / 2)
        want.append(right / len(LABELS))
    assert acc.tolist() == pytest.approx(want)


def test_gain_per_kl_and_scores_by_construction():
    h = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    assert pr.gain_per_kl(h, torch.eye(3, dtype=F64)).tolist() == [1.0, 4.0, 9.0]
    F = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=F64))
    assert pr.gain_per_kl(h, F).tolist() == [1.0, 1.0, 1.0]
    judged = torch.tensor([0.1, 0.5, 0.3], dtype=F64)
    s = pr.score_predictors(
        {"same": judged, "reversed": -judged, "abs h": pr.gain_curve(h)}, judged
    )
    assert s["same"]["spearman"] == pytest.approx(1) and s["same"]["top_fraction"] == 1
    assert s["reversed"]["spearman"] == pytest.approx(-1) and s["reversed"]["top_layer"] == 0
    assert s["abs h"]["top_layer"] == 2 and s["abs h"]["top_fraction"] == pytest.approx(0.6)


def test_predictors_refuse_bad_input(model):
    with pytest.raises(InputError, match="labels"):
        pr.probe_accuracy(model, POS, [1] * 4)
    with pytest.raises(InputError, match="label_words"):
        pr.logit_lens_accuracy(model, POS + NEG, LABELS, label_words=["good", "good"])
    with pytest.raises(ShapeError):
        pr.score_predictors({"x": torch.zeros(2)}, torch.zeros(3))
