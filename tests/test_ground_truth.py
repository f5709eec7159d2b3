"""The per-layer judged ground truth (`steerlin.ground_truth`): per-stem scores, reused
amplitudes, the split-half reliability, bad input. Tiny random model with a word tokenizer and
a word-counting judge; the reliability on synthetic per-stem curves with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
from _wordtok import NEG, POS, with_tokenizer
from conftest import make_gemma_like

from steerlin import ConceptDirections, count_hooks
from steerlin import ground_truth as gt
from steerlin.errors import InputError, SteerlinError

GOOD = {"good", "great", "fine", "nice", "happy", "love", "best", "fun"}
BAD = {"bad", "awful", "poor", "sad", "hate", "worst", "dull", "boring"}
STEMS = ["the movie was", "it is a very", "the plot is", "the acting was", "a film", "the story"]
CAL = ["the movie", "a plot was", "it is"]


def word_judge(texts):
    """+1 per good word, −1 per bad word."""
    return np.array([sum((w in GOOD) - (w in BAD) for w in t.split()) for t in texts], float)


@pytest.fixture(scope="module")
def setup():
    import conftest

    m = with_tokenizer(make_gemma_like(n_layers=3))
    conftest._MODELS.append(m)
    dirs = ConceptDirections.fit(m, POS + NEG, [1] * len(POS) + [0] * len(NEG))
    return m, dirs


def _run(setup, **kw):
    m, dirs = setup
    kw = dict(stems=STEMS, tokens=4, calibration=CAL, batch_size=4) | kw
    return gt.layer_effects(m, dirs, word_judge, [0.2], **kw)["0.2"]


def test_per_stem_scores_shapes_and_their_mean_is_the_delta(setup):
    m, dirs = setup
    rec = _run(setup)
    L = m.cfg.n_layers
    plus, minus = np.array(rec["plus_stems"]), np.array(rec["minus_stems"])
    assert plus.shape == minus.shape == (L, len(STEMS))
    zero = (dirs.b[:L].norm(dim=-1) == 0).numpy()
    for layer in range(L):
        if zero[layer]:  # nothing to inject: NaN everywhere
            assert np.isnan(plus[layer]).all() and np.isnan(rec["delta"][layer])
            continue
        assert rec["delta"][layer] == pytest.approx(plus[layer].mean() - minus[layer].mean())
        assert rec["plus"][layer] == pytest.approx(plus[layer].mean())
        assert rec["kl"][layer] == pytest.approx(0.2, rel=0.05)  # bisection tolerance
    assert (~zero).any()
    d = gt.stem_deltas(rec)
    np.testing.assert_allclose(d[~zero].mean(1), np.array(rec["delta"])[~zero])
    assert rec["n_stems"] == len(STEMS) and "bisected" in rec["amplitude_source"]
    assert count_hooks(m) == 0


def test_reused_amplitudes_skip_bisection_and_reproduce(setup, monkeypatch):
    import steerlin.measure

    rec = _run(setup)

    def boom(*a, **k):
        raise AssertionError("bisection run although amplitudes were given")

    monkeypatch.setattr(steerlin.measure, "bisect_multiplier", boom)
    again = _run(setup, amplitudes={0.2: rec["amp"]}, amplitude_source="earlier run")
    assert again["amplitude_source"] == "earlier run"
    np.testing.assert_array_equal(np.array(again["amp"]), np.array(rec["amp"]))
    np.testing.assert_allclose(again["kl"], rec["kl"], rtol=1e-9)  # measured there, once
    np.testing.assert_array_equal(np.array(again["plus_stems"]), np.array(rec["plus_stems"]))
    np.testing.assert_array_equal(np.array(again["delta"]), np.array(rec["delta"]))
    with pytest.raises(AssertionError, match="bisection"):
        _run(setup)


def test_partial_results_after_each_layer(setup):
    m, _ = setup
    seen = []
    _run(setup, on_layer=lambda out: seen.append(len(out["0.2"]["delta"])))
    assert seen == list(range(1, m.cfg.n_layers + 1))


def _synthetic(L: int, n: int, noise: float, seed: int = 0) -> np.ndarray:
    """per-stem curves: a true curve [L] (unit variance) plus independent per-stem noise."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(L)[:, None] + noise * rng.standard_normal((L, n))


def test_reliability_identical_halves_is_one():
    r = gt.split_half_reliability(_synthetic(18, 40, 1e-6), n_splits=50)
    assert r["reliability"] > 0.999 and r["ceiling"] > 0.999
    assert r["reliability_q05"] <= r["reliability"] <= r["reliability_q95"]


def test_reliability_of_pure_noise_is_near_zero():
    # 200 layers: one split's r has sd ≈ 1/√199 ≈ 0.07
    x = np.random.default_rng(1).standard_normal((200, 60))
    r = gt.split_half_reliability(x, n_splits=100)
    assert abs(r["r_halves"]) < 0.12
    assert r["reliability"] < 0.2  # r ≤ 0 counts as reliability 0, so the mean is ≥ 0


def test_reliability_follows_spearman_brown():
    # one stem's reliability ρ = 1 / (1 + σ²) = 1/41 with σ² = 40: the mean over k stems has
    # kρ / (1 + (k−1)ρ) = 0.5 at k = 40 and 1/3 at k = 20 (Pearson; Spearman slightly below)
    x = _synthetic(400, 40, 40**0.5, seed=2)
    full = gt.split_half_reliability(x, n_splits=100)
    assert full["reliability"] == pytest.approx(0.5, abs=0.1)
    assert full["ceiling"] == pytest.approx(full["reliability"] ** 0.5)
    half = gt.split_half_reliability(x, n_splits=100, n_stems=20)
    assert half["reliability"] == pytest.approx(1 / 3, abs=0.1)
    assert half["n_stems"] == 20 and half["reliability"] < full["reliability"]


def test_nan_layers_left_out_of_the_reliability():
    x = _synthetic(10, 20, 0.5)
    x[0] = np.nan
    r = gt.split_half_reliability(x, n_splits=20)
    assert r["n_layers"] == 9 and np.isfinite(r["reliability"])


def test_score_with_ceiling():
    s = gt.score_with_ceiling({"a": {"spearman": 0.45, "top_layer": 3}}, 0.9)
    assert s["a"]["fraction_of_ceiling"] == pytest.approx(0.5)
    assert gt.score_with_ceiling({"a": {"spearman": 0.4}}, 0.0)["a"]["fraction_of_ceiling"] is None


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(levels=[-0.1]), "levels"),
        (dict(levels=[float("nan")]), "levels"),
        (dict(stems="the movie"), "stems"),
        (dict(stems=["the movie"]), "stems"),
        (dict(judge=3), "judge"),
        (dict(amplitudes={0.2: [1.0]}), "amplitudes"),
        (dict(amplitudes={0.3: [1.0, 1.0, 1.0]}), "amplitudes"),
        (dict(tokens=0), "tokens"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_input_names_the_argument(setup, kw, name):
    m, dirs = setup
    args = dict(judge=word_judge, levels=[0.2], stems=STEMS, calibration=CAL) | kw
    judge, levels = args.pop("judge"), args.pop("levels")
    with pytest.raises(SteerlinError, match=name):
        gt.layer_effects(m, dirs, judge, levels, **args)
    assert count_hooks(m) == 0


def test_bad_per_stem_input():
    with pytest.raises(InputError, match="per_stem"):
        gt.split_half_reliability(np.zeros(5))
    with pytest.raises(InputError, match="per_stem"):
        gt.split_half_reliability(np.zeros((2, 10)))  # fewer than 3 layers
    with pytest.raises(InputError, match="rec"):
        gt.stem_deltas({"delta": [0.1]})


def test_merge_stems_equals_one_run_over_all_stems(setup):
    whole = _run(setup)
    amps = {0.2: whole["amp"]}
    a = _run(setup, stems=STEMS[:4], amplitudes=amps)
    b = _run(setup, stems=STEMS[4:], amplitudes=amps)
    m = gt.merge_stems({"0.2": a}, {"0.2": b})["0.2"]
    assert m["n_stems"] == len(STEMS)
    np.testing.assert_array_equal(np.array(m["plus_stems"]), np.array(whole["plus_stems"]))
    np.testing.assert_allclose(m["delta"], whole["delta"], rtol=1e-12)
    other = dict(b, amp=[x * 2 for x in b["amp"]])
    with pytest.raises(InputError, match="amplitudes"):
        gt.merge_stems({"0.2": a}, {"0.2": other})
