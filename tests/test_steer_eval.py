"""steer-eval's computed-vs-searched machinery on a tiny model with a word tokenizer: the
forward-token counter, the searched grid, the "exact" and "searched" strategies and the cost
and readout-correlation summaries. (The Gemma run is tests/test_cli.py's quick steer-eval.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _wordtok import NEG, POS, with_tokenizer
from conftest import make_gpt2_like

from steerlin import ConceptDirections, Controller, Surrogate, count_hooks, exact_gains
from steerlin import steer_eval as se
from steerlin.fisher import kl_metric
from steerlin.readouts import make_readout

GOOD = {"good", "great", "fine", "nice", "happy", "love", "best", "fun"}
BAD = {"bad", "awful", "poor", "sad", "hate", "worst", "dull", "boring"}
STEMS = ["the movie was", "it is a very", "the plot is", "the acting was"]


def word_judge(texts):
    """+1 per good word, −1 per bad word: a judge whose answer is known from the text."""
    return np.array([sum((w in GOOD) - (w in BAD) for w in t.split()) for t in texts], float)


@pytest.fixture(scope="module")
def setup():
    import conftest

    m = with_tokenizer(make_gpt2_like(n_layers=3))
    conftest._MODELS.append(m)
    dirs = ConceptDirections.fit(m, POS + NEG, [1] * len(POS) + [0] * len(NEG))
    sur = Surrogate.fit(m, STEMS, dirs, d=2)
    return m, dirs, sur


def test_forward_counter_counts_token_positions_and_leaves_no_hook(setup):
    m, dirs, sur = setup
    with se.ForwardCounter(m) as c, torch.no_grad():
        m(m.to_tokens(["the movie was good", "the plot"], padding_side="right"))
    assert c.tokens == 2 * 5  # BOS + 4 words, padded batch of 2
    assert count_hooks(m) == 0
    cost = se.Cost()
    with pytest.raises(RuntimeError), cost.measure(m):
        raise RuntimeError("boom")
    assert count_hooks(m) == 0 and cost.seconds >= 0


def test_search_grid_picks_the_best_kept_point(setup):
    m, dirs, sur = setup
    ctrl = Controller(sur, 1.0)
    factory = lambda u, name: ctrl._make(u[None].to(torch.float64), name)
    found = se.search_grid(
        m, dirs, STEMS, word_judge, schedule_factory=factory, coefs=(1.0, 8.0), max_new_tokens=3
    )
    L = m.cfg.n_layers
    nonzero = int((dirs.vectors[:L].norm(dim=-1) > 0).sum())
    assert len(found["grid"]) == (nonzero + 1) * 2
    kept = [g for g in found["grid"] if max(g["ppl_plus"], g["ppl_minus"]) <= 1.5]
    if kept:
        assert found["best"]["delta"] == max(g["delta"] for g in kept)
    else:
        assert found["best"] is None
    for g in found["grid"]:
        assert g["delta"] == pytest.approx(g["judge_plus"] - g["judge_minus"])
    loose = se.search_grid(
        m,
        dirs,
        STEMS,
        word_judge,
        schedule_factory=factory,
        coefs=(1.0, 8.0),
        max_new_tokens=3,
        max_ppl=float("inf"),
        log=None,
    )
    assert loose["best"]["delta"] == max(g["delta"] for g in loose["grid"])


def test_steer_eval_with_exact_and_searched_strategies(setup, monkeypatch):
    m, dirs, sur = setup
    monkeypatch.setattr(se, "get_judge", lambda name: word_judge)
    ctrl = Controller(sur, 1.0)
    factory = lambda u, name: ctrl._make(u[None].to(torch.float64), name)
    h_exact = exact_gains(m, STEMS, dirs)
    res = se.steer_eval(
        m,
        sur,
        dirs,
        make_readout(m, "concept", dirs.unit[-1]),
        setting=se.EvalSetting("toy", "words", "good", "bad"),
        kl=kl_metric(m, STEMS, dirs),
        separation=float(dirs.vectors[-1].double().norm()),
        strategies=["min-norm", "exact", "searched", "prompt", "prompt+min-norm"],
        strengths=[1.0],
        calibration_stems=STEMS,
        eval_stems=[STEMS[:2], STEMS[2:]],
        max_new_tokens=3,
        calibration_tokens=2,
        kl_tokens=2,
        schedule_factory=factory,
        exact_gains=h_exact,
        logit_readout=make_readout(m, "logits", None, label_words=["good", "bad"]),
        search_coefs=(1.0, 4.0),
        log=lambda *a: None,
    )
    res["shared_costs"] = {"min-norm": {"seconds": 1.0, "forward_tokens": 10}}
    summ = {r["strategy"]: r for r in se.summarise(res)}
    assert {"min-norm", "exact"} <= set(summ)
    # exact: the least-norm shape of the exact gains (calibrated, so only the shape matters)
    ex = next(r for r in res["rows"] if r["strategy"] == "exact" and r["t"] == 1.0)
    u = torch.tensor(ex["amplitudes"], dtype=torch.float64)
    assert torch.allclose(u / u.norm(), h_exact / h_exact.norm(), atol=1e-8)
    # costs: a calibrated strategy's own cost is its ±t calibrations, plus the shared steps
    own = res["costs"]["min-norm"]["1"]
    assert own["forward_tokens"] > 0
    assert summ["min-norm"]["cost"]["forward_tokens"] == own["forward_tokens"] + 10
    assert res["costs"]["searched"]["search"]["forward_tokens"] > own["forward_tokens"]
    if "searched" in summ and "error" not in summ["searched"]:
        assert summ["searched"]["choice"].startswith(("layer", "middle"))
        assert "logit_readout_delta" in summ["searched"]
    table = se.format_table(list(summ.values()), "words")
    assert f" / {summ['min-norm']['cost']['forward_tokens']:,} |" in table
    # prompting: no schedule (zero energy), scored as continuations of the unprompted stems
    pr = [r for r in res["rows"] if r["strategy"] == "prompt"]
    assert [r["t"] for r in pr] == [1.0, -1.0]
    assert all(r["energy_norm"] == 0 and r["kl"][0] > 0 and "instruction" in r for r in pr)
    both = [r for r in res["rows"] if r["strategy"] == "prompt+min-norm"]
    assert len(both) == 2 and all(r["energy_norm"] > 0 for r in both)
    corr = se.readout_correlations(list(summ.values()))
    for v in corr.values():
        assert -1 <= v["pearson"] <= 1
    assert count_hooks(m) == 0


def test_kl_between_a_continuation_and_itself_is_zero_and_a_prefix_moves_it(setup):
    from steerlin.regime import Continuations, generate

    m, dirs, sur = setup
    base = generate(m, STEMS, 3)
    assert se.kl_between(m, base, base, n_new=3) == pytest.approx(0, abs=1e-12)
    asked = generate(m, ["very bad . " + p for p in STEMS], 3)
    along = Continuations(None, asked.prompt_ids, base.new_ids, base.texts)
    assert se.kl_between(m, base, along, n_new=3) > 1e-6
