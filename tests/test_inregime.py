"""In-regime gains (steerlin.inregime): each readout's first-order change per unit injection at
every steered position, checked against central differences of steered teacher-forced forwards
(attention not frozen), and the Fisher of the same pass against `regime_fisher`."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_continuations, random_prompts

from steerlin import ConceptDirections, count_hooks
from steerlin.budget import regime_fisher
from steerlin.errors import SteerlinError
from steerlin.inregime import regime_gains
from steerlin.lexicon import Lexicon
from steerlin.measure import final_states
from steerlin.readouts import full_logits

F64 = torch.float64
POS, NEG = [3, 5], [7]  # label token ids of the tiny (tokenizer-less) models


@pytest.fixture(scope="module")
def setup(tiny):
    m = tiny
    dirs = ConceptDirections.fit(
        m, random_prompts(m, 16, 3, 12, seed=11), [i % 2 for i in range(16)]
    )
    cont = greedy_continuations(m, random_prompts(m, 3, 3, 8, seed=7), 4)
    g = torch.Generator().manual_seed(3)
    lex = Lexicon(torch.randn(m.cfg.d_vocab, generator=g, dtype=F64), "random", 1, 1)
    rg = regime_gains(m, cont, dirs, label_words=(POS, NEG), lexicon=lex, n_tokens=4, batch_size=2)
    return m, dirs, cont, lex, rg


def _readouts(m, x, unit, lex):
    """The three readouts of final states x [P, n, H], float64 [P*n]."""
    z = full_logits(m, x).to(F64)
    return {
        "concept": (x.to(F64) @ unit.to(F64)).reshape(-1),
        "label_words": (z[..., POS].mean(-1) - z[..., NEG].mean(-1)).reshape(-1),
        "lexicon": lex.expected(z).reshape(-1),
    }


def test_gains_match_central_differences(setup):
    """Each readout's per-token tangent against (y(+ε b_l) − y(−ε b_l)) / 2ε of full steered
    forwards (the injection at the last prompt token and every continuation position)."""
    m, dirs, cont, lex, rg = setup
    L = m.cfg.n_layers
    unit = dirs.unit[L]
    b = rg.fisher.b
    eps = 1e-3
    base = _readouts(m, final_states(m, cont, None, n_new=4), unit, lex)
    for name, v in base.items():  # the unsteered readouts are the pass's primal
        assert torch.allclose(rg.values[name], v, rtol=1e-5, atol=1e-6), name
    for layer in (0, L - 1):
        vec = torch.zeros(L, b.shape[1], dtype=F64)
        vec[layer] = b[layer]
        vec = vec.to(m.cfg.dtype)
        yp = _readouts(m, final_states(m, cont, eps * vec, n_new=4), unit, lex)
        ym = _readouts(m, final_states(m, cont, -eps * vec, n_new=4), unit, lex)
        for name in ("concept", "label_words", "lexicon"):
            fd = (yp[name] - ym[name]) / (2 * eps)
            g = rg.per_token[name][:, layer]
            scale = float(g.abs().max())
            assert scale > 0, (name, layer)
            assert torch.allclose(g, fd, atol=2e-3 * scale, rtol=0), (name, layer)  # O(ε²) ~1e-4
            assert rg.gains[name][layer] == pytest.approx(float(fd.mean()), abs=2e-3 * scale)


def test_fisher_is_regime_fishers(setup):
    m, dirs, cont, lex, rg = setup
    ref = regime_fisher(m, cont, rg.fisher.b, n_new=4, batch_size=2)
    assert torch.equal(rg.fisher.F, ref.F)
    assert torch.equal(rg.fisher.clean, ref.clean)
    assert (rg.fisher.n_new, rg.fisher.n_prompts, rg.fisher.positions) == (4, 3, "generated")
    assert rg.per_token["concept"].shape == (3 * 4, m.cfg.n_layers)
    # per_kl: |g| / sqrt(mean F_ll)
    f = ref.F.diagonal(dim1=1, dim2=2).mean(0)
    assert torch.allclose(rg.per_kl("lexicon"), rg.gains["lexicon"].abs() / f.sqrt())
    assert rg.gains["lexicon"].equal(rg.gains["lexicon:random"])


def test_zero_direction_layers_give_zero(setup):
    m, dirs, cont, lex, rg = setup
    b = rg.fisher.b.clone()
    b[1] = 0
    out = regime_gains(
        m, cont, b, concept=dirs.unit[-1], label_words=(POS, NEG), lexicon=lex, n_tokens=4
    )
    for name in ("concept", "label_words", "lexicon"):
        assert float(out.per_token[name][:, 1].abs().max()) == 0.0
        assert float(out.per_kl(name)[1]) == 0.0
        assert torch.allclose(out.gains[name][0], rg.gains[name][0])
    assert float(out.fisher.F[:, 1].abs().max()) == 0.0


def test_several_lexicons_and_last_policy(setup):
    m, dirs, cont, lex, rg = setup
    other = Lexicon(-2 * lex.scores, "neg2", 1, 1)
    out = regime_gains(m, cont, dirs, readouts="lexicon", lexicon=[lex, other], n_tokens=4)
    assert list(out.gains) == ["lexicon", "lexicon:random", "lexicon:neg2"]
    assert torch.allclose(out.gains["lexicon:neg2"], -2 * out.gains["lexicon"])
    last = regime_gains(m, cont, dirs, readouts=["concept"], positions="last", n_tokens=4)
    assert last.per_token["concept"].shape == (3, m.cfg.n_layers)


def test_bad_input(setup):
    m, dirs, cont, lex, rg = setup
    L, H = m.cfg.n_layers, m.cfg.d_model
    kw = dict(n_tokens=4)
    bad = [
        (dict(label_words=([m.cfg.d_vocab], NEG)), "label_words"),
        (dict(label_words=(POS, POS)), "label_words"),
        (dict(label_words=(" positive", " negative")), "label_words"),  # no tokenizer
        (dict(label_words=(POS,)), "label_words"),
        (dict(label_words=(POS, NEG), lexicon=None), "lexicon"),
        (
            dict(label_words=(POS, NEG), lexicon=Lexicon(torch.zeros(7, dtype=F64), "x", 1, 1)),
            "lexicon",
        ),
        (
            dict(
                label_words=(POS, NEG),
                lexicon=Lexicon(torch.zeros(m.cfg.d_vocab, dtype=F64), "z", 0, 0),
            ),
            "lexicon",
        ),
        (dict(label_words=(POS, NEG), lexicon=lex, readouts=("concept", "nope")), "readouts"),
        (dict(label_words=(POS, NEG), lexicon=lex, positions="every"), "positions"),
        (dict(label_words=(POS, NEG), lexicon=lex, batch_size=0), "batch_size"),
    ]
    for extra, name in bad:
        with pytest.raises(SteerlinError, match=name):
            regime_gains(m, cont, dirs, **(kw | extra))
    with pytest.raises(SteerlinError, match="directions"):
        regime_gains(m, cont, torch.zeros(L, H + 1), readouts="label_words", label_words=(POS, NEG))
    with pytest.raises(SteerlinError, match="concept"):
        regime_gains(m, cont, torch.zeros(L, H), readouts="concept")
    with pytest.raises(SteerlinError, match="concept"):
        regime_gains(m, cont, torch.zeros(L, H), readouts="concept", concept=torch.zeros(H + 1))
    with pytest.raises(SteerlinError, match="prompts"):
        regime_gains(m, cont.subset([]), dirs, readouts="concept")
    with pytest.raises(SteerlinError, match="prompts"):
        regime_gains(m, [], dirs, readouts="concept")
    assert count_hooks(m) == 0


def test_label_words_through_a_tokenizer():
    from _wordtok import with_tokenizer
    from conftest import make_gemma_like

    from steerlin.inregime import label_ids

    m = with_tokenizer(make_gemma_like(n_layers=1))
    tok = m.tokenizer
    pos, neg = label_ids(m, (["good", "great", "zebra"], "bad"))
    assert pos == sorted(tok.convert_tokens_to_ids(["good", "great"]))  # "zebra" is <unk>
    assert neg == [tok.convert_tokens_to_ids("bad")]
    with pytest.raises(SteerlinError, match="label_words.*positive"):
        label_ids(m, (["zebra", "quokka"], "bad"))
    with pytest.raises(SteerlinError, match="label_words.*negative"):
        label_ids(m, ("good", "good bad"))  # two tokens


def test_hooks_removed_after_an_exception(setup, monkeypatch):
    m, dirs, cont, lex, rg = setup
    import steerlin.budget as budget

    def boom(*a, **k):
        raise RuntimeError("boom inside the hooked forward")

    monkeypatch.setattr(budget.fwAD, "make_dual", boom)
    with pytest.raises(RuntimeError, match="boom"):
        regime_gains(m, cont, dirs, readouts="concept", n_tokens=4)
    assert count_hooks(m) == 0


# ------------------------------------------------------------------ LayerNavigator (predictors)


def _synthetic(n=400, H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([i % 2 for i in range(n)])
    v = torch.zeros(H, dtype=F64)
    v[0] = 1.0
    w = torch.zeros(H, dtype=F64)
    w[1] = 1.0
    base = torch.randn(H, generator=g, dtype=F64)
    sgn = (2 * y - 1).to(F64)[:, None]
    noise = lambda s: s * torch.randn(n, H, generator=g, dtype=F64)
    along = base + 3 * sgn * v + noise(1e-3)  # classes separated exactly along v
    across = base + 3 * sgn * w + noise(1.0)  # separated along w ⟂ v
    return torch.stack([along, across], 1), y, torch.stack([v, v])


def test_layer_navigator_known_answers():
    from steerlin.predictors import layer_navigator_scores

    x, y, v = _synthetic()
    sc = layer_navigator_scores(x, y, 5 * v)  # v is normalised inside
    assert sc.d[0] == pytest.approx(1.0, abs=1e-3) and sc.c[0] == pytest.approx(1.0, abs=1e-3)
    assert abs(float(sc.d[1])) < 0.05 and abs(float(sc.c[1])) < 0.05  # sampling: ~1/n, ~1/sqrt(n)
    assert torch.allclose(sc.s, sc.d + sc.c)
    flipped = layer_navigator_scores(x, 1 - y, v)  # consistency is signed, d is not
    assert torch.allclose(flipped.c, -sc.c) and torch.allclose(flipped.d, sc.d)


def test_layer_navigator_equals_the_pairwise_loop_and_scatter_matrices():
    """The vectorised all-pairs consistency against an explicit loop over pairs, and the
    discriminability against S_b, S_t built as the official get_score.py builds them."""
    from steerlin.predictors import layer_navigator_scores

    g = torch.Generator().manual_seed(1)
    n, L, H = 9, 2, 5
    x = torch.randn(n, L, H, generator=g, dtype=F64)
    y = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1])
    v = torch.randn(L, H, generator=g, dtype=F64)
    sc = layer_navigator_scores(x, y, v)
    for l in range(L):
        u = v[l] / v[l].norm()
        cos = [
            float((x[i, l] - x[j, l]) @ u / (x[i, l] - x[j, l]).norm())
            for i in range(n)
            for j in range(n)
            if y[i] == 1 and y[j] == 0
        ]
        assert float(sc.c[l]) == pytest.approx(sum(cos) / len(cos), abs=1e-12)
        mu = x[:, l].mean(0)
        Sb = torch.zeros(H, H, dtype=F64)
        Sw = torch.zeros(H, H, dtype=F64)
        for c in (0, 1):
            xc = x[y == c, l]
            dm = (xc.mean(0) - mu)[:, None]
            Sb += xc.shape[0] * dm @ dm.T
            Sw += (xc - xc.mean(0)).T @ (xc - xc.mean(0))
        assert float(sc.d[l]) == pytest.approx(float(u @ Sb @ u / (u @ (Sw + Sb) @ u)), abs=1e-12)


def test_layer_navigator_on_a_model(setup):
    from steerlin.errors import ShapeError
    from steerlin.predictors import layer_navigator

    m, dirs, cont, lex, rg = setup
    prompts = random_prompts(m, 10, 3, 8, seed=2)
    sc = layer_navigator(m, prompts, [i % 2 for i in range(10)], dirs)
    assert sc.s.shape == (m.cfg.n_layers,) and torch.isfinite(sc.s).all()
    assert ((sc.d >= 0) & (sc.d <= 1 + 1e-12)).all() and (sc.c.abs() <= 1 + 1e-12).all()
    with pytest.raises(ShapeError, match="units"):
        from steerlin.predictors import layer_navigator_scores

        layer_navigator_scores(torch.zeros(4, 2, 3), [0, 1, 0, 1], torch.zeros(2, 4))
    with pytest.raises(SteerlinError, match="labels"):
        layer_navigator(m, prompts, [1] * 10, dirs)
