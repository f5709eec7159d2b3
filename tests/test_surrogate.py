"""steerlin.surrogate.Surrogate: oracle checks with a full basis, persistence, determinism, errors.

Oracle: with d = d_model the basis is complete, so the reduction loses nothing. With ONE prompt
the mean Jacobian is that prompt's Jacobian, hence both variants must equal the exact
first-order gains (one backward pass, `exact_gains`); with several prompts only the
per-prompt variant (mean of products) equals the exact mean gain. Both are float64 with an
identical chain rule in a different association order: ~1e-15 relative, we allow 1e-9.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TL4, make_gpt2_like, random_prompts

from steerlin import ConceptDirections, Controller
from steerlin.errors import FileFormatError, InputError, ShapeError
from steerlin.gains import exact_gains
from steerlin.linalg import gains_from_reduced
from steerlin.metrics import fidelity
from steerlin.surrogate import BASES, VARIANTS, Surrogate

FULL = 32  # d_model of the tiny models
# A full-dimensional POD basis has fewer informative directions than d_model on few prompts:
# the documented breakdown warning fills the rest with random directions (expected here).
pytestmark = pytest.mark.filterwarnings("ignore:POD basis. Krylov breakdown:UserWarning")


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _setup(model, n_ops=5):
    concept = random_prompts(model, 12, 3, 12, seed=11)
    dirs = ConceptDirections.fit(model, concept, [i % 2 for i in range(12)])
    ops = random_prompts(model, n_ops, 3, 12, seed=5)
    return dirs, ops


@pytest.fixture
def gpt2_setup(gpt2_like):
    dirs, ops = _setup(gpt2_like)
    return gpt2_like, dirs, ops


@pytest.mark.parametrize("basis", BASES)
def test_one_prompt_full_basis_equals_exact_gains(tiny, basis):
    dirs, ops = _setup(tiny)
    one = ops[:1]
    ex = exact_gains(tiny, one, dirs)
    assert ex.abs().min() > 1e-6  # non-trivial reference
    for variant in VARIANTS:
        s = Surrogate.fit(tiny, one, dirs, d=FULL, basis=basis, variant=variant)
        assert s.variant == variant and s.meta["basis"] == basis
        assert s.gains.shape == (tiny.cfg.n_layers,) and s.gains.dtype == torch.float64
        assert _rel(s.gains, ex) < 1e-9, (variant, s.gains, ex)
        assert _rel(s.gains_paper, ex) < 1e-9
        torch.testing.assert_close(
            s.gains_std, torch.zeros_like(s.gains_std), rtol=0, atol=1e-9 * ex.abs().max().item()
        )


def test_one_prompt_full_basis_logit_readout(tiny):
    dirs, ops = _setup(tiny)
    ex = exact_gains(tiny, ops[:1], dirs, readout="logits", label_words=[3, 5])
    s = Surrogate.fit(tiny, ops[:1], dirs, d=FULL, readout="logits", label_words=[3, 5])
    assert _rel(s.gains, ex) < 1e-9
    assert s.meta["readout"] == {"kind": "logits", "pos_token": 3, "neg_token": 5}


def test_per_prompt_variant_full_basis_equals_exact_mean(tiny):
    dirs, ops = _setup(tiny)
    ex_all = exact_gains(tiny, ops, dirs, per_prompt=True)
    s = Surrogate.fit(tiny, ops, dirs, d=FULL, batch_size=2)  # several batches
    assert s.variant == "per-prompt"
    assert _rel(s.gains, ex_all.mean(0)) < 1e-9
    std = ex_all.std(0, unbiased=False)
    torch.testing.assert_close(s.gains_std, std, rtol=1e-6, atol=1e-9 * std.max().item())
    # the paper's single mean model is a product of means, which is not the mean of products
    assert _rel(s.gains_paper, ex_all.mean(0)) > 1e-8
    assert s.meta["n_prompts"] == len(ops)


def test_reduced_model_is_consistent(gpt2_setup):
    model, dirs, ops = gpt2_setup
    L, H, d = model.cfg.n_layers, model.cfg.d_model, 6
    s = Surrogate.fit(model, ops, dirs, d=d, variant="paper")
    assert s.P.shape == (L + 1, H, d) and s.A.shape == (L, d, d) and s.B.shape == (L, d)
    assert s.d == d and s.n_layers == L and s.layers == list(range(L))
    for l in range(L + 1):
        P = s.P[l]
        assert (P.T @ P - torch.eye(d, dtype=torch.float64)).abs().max() < 1e-12
        torch.testing.assert_close(P[:, 0], dirs.unit[l], rtol=0, atol=1e-12)
    # concept readout: c = P_L^T unit_L = e_1
    e1 = torch.zeros(d, dtype=torch.float64)
    e1[0] = 1
    torch.testing.assert_close(s.c, e1, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.gains, gains_from_reduced(s.A, s.B, s.c), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.h, s.gains)
    # B_l = A_l e_1 * scale_l (the injected direction is the first basis column)
    torch.testing.assert_close(s.B, s.A[:, :, 0] * dirs.scale[:L, None], rtol=1e-12, atol=1e-12)
    from steerlin.surrogate import DEFAULT_BASIS

    assert s.meta["basis"] == DEFAULT_BASIS  # the default, recorded and shown
    assert f"basis={DEFAULT_BASIS!r}" in repr(s) and "variant='paper'" in repr(s)


def test_predict(gpt2_setup):
    model, dirs, ops = gpt2_setup
    s = Surrogate.fit(model, ops, dirs, d=4)
    u = torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64)
    torch.testing.assert_close(s.predict(u), s.gains @ u, rtol=0, atol=0)
    torch.testing.assert_close(s.predict([0.1, -0.3, 0.2]), s.gains @ u, rtol=0, atol=0)
    with pytest.raises(ShapeError, match=r"u: expected shape \[3\], got \(2,\)"):
        s.predict([1.0, 2.0])
    with pytest.raises(ShapeError, match=r"u: expected shape \[3\], got \(1, 3\)"):
        s.predict(u[None])


def test_save_load_round_trip(gpt2_setup, tmp_path):
    model, dirs, ops = gpt2_setup
    s = Surrogate.fit(model, ops, dirs, d=5, basis="pod", readout="logits", label_words=[1, 2])
    path = tmp_path / "s.safetensors"
    s.save(path)
    back = Surrogate.load(path, model=model)
    for k in ("P", "A", "B", "c", "gains", "gains_paper", "gains_std"):
        assert torch.equal(getattr(back, k), getattr(s, k)), k
    assert back.meta == s.meta
    assert back.variant == s.variant and back.d == 5
    other = make_gpt2_like(n_layers=2)
    with pytest.raises(
        FileFormatError,
        match=r"was made for a model with n_layers=3, this model "
        r"has n_layers=2",
    ):
        Surrogate.load(path, model=other)
    dpath = tmp_path / "d.safetensors"
    dirs.save(dpath)
    with pytest.raises(
        FileFormatError,
        match=r"not a steerlin Surrogate file \(it holds a "
        r"ConceptDirections\)",
    ):
        Surrogate.load(dpath)
    torch.save({"A": s.A}, tmp_path / "p.safetensors")
    with pytest.raises(FileFormatError, match="not a readable safetensors file"):
        Surrogate.load(tmp_path / "p.safetensors")


@pytest.mark.parametrize("basis", BASES)
def test_deterministic(gpt2_setup, basis):
    model, dirs, ops = gpt2_setup
    a = Surrogate.fit(model, ops, dirs, d=6, basis=basis, seed=3)
    b = Surrogate.fit(model, ops, dirs, d=6, basis=basis, seed=3)
    for k in ("P", "A", "B", "c", "gains", "gains_paper", "gains_std"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_seed_changes_random_basis_only_in_random_columns(gpt2_setup):
    model, dirs, ops = gpt2_setup
    a = Surrogate.fit(model, ops, dirs, d=6, basis="random", seed=0)
    b = Surrogate.fit(model, ops, dirs, d=6, basis="random", seed=1)
    assert not torch.equal(a.P[:, :, 1:], b.P[:, :, 1:])
    torch.testing.assert_close(a.P[:, :, 0], b.P[:, :, 0], rtol=0, atol=1e-15)


def test_reduced_order_is_an_approximation(tiny):
    """Sanity on a low order: finite gains, first column still the concept; krylov at d=1
    equals a pure 'stay on the concept direction' model."""
    dirs, ops = _setup(tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # krylov with d << H must not break down
        s = Surrogate.fit(tiny, ops, dirs, d=4)
    assert torch.isfinite(s.gains).all()
    s1 = Surrogate.fit(tiny, ops, dirs, d=1, variant="paper")
    L = tiny.cfg.n_layers
    assert s1.A.shape == (L, 1, 1)
    # 1-d model: h_l = prod_{m>l} a_m * b_l with a_m = <unit_{m+1}, mean A_m unit_m>
    a, bb = s1.A[:, 0, 0], s1.B[:, 0]
    brute = torch.stack([bb[l] * torch.prod(a[l + 1 :]) for l in range(L)])
    torch.testing.assert_close(s1.gains, brute, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("d", [0, -1, FULL + 1])
def test_bad_order(gpt2_setup, d):
    model, dirs, ops = gpt2_setup
    with pytest.raises(InputError, match=rf"d: expected 1 <= d <= d_model=32, got {d}"):
        Surrogate.fit(model, ops, dirs, d=d)


def test_bad_basis_and_variant(gpt2_setup):
    model, dirs, ops = gpt2_setup
    with pytest.raises(
        InputError,
        match=r"basis: expected one of \('krylov', 'two-sided', 'observable', 'pod', 'random'\), "
        r"got 'svd'",
    ):
        Surrogate.fit(model, ops, dirs, d=4, basis="svd")
    with pytest.raises(InputError, match=r"variant: expected one of .* got 'mean'"):
        Surrogate.fit(model, ops, dirs, d=4, variant="mean")
    with pytest.raises(InputError, match="readout: expected 'concept' or 'logits'"):
        Surrogate.fit(model, ops, dirs, d=4, readout="probe")


def test_directions_for_another_model(gpt2_setup):
    model, _, ops = gpt2_setup
    other = make_gpt2_like(n_layers=4)
    dirs4, _ = _setup(other)
    with pytest.raises(
        ShapeError,
        match=r"directions: expected unit of shape \[4, 32\] for this "
        r"model, got \(5, 32\)",
    ):
        Surrogate.fit(model, ops, dirs4, d=4)


def test_zero_direction_after_layer_0_is_refused(gpt2_setup):
    model, dirs, ops = gpt2_setup
    unit = dirs.unit.clone()
    unit[2] = 0
    bad = ConceptDirections(dirs.vectors, unit, dirs.scale, dirs.meta)
    with pytest.raises(InputError, match=r"zero concept direction at layers \[2\]"):
        Surrogate.fit(model, ops, bad, d=4)


def test_empty_operating_prompts(gpt2_setup):
    model, dirs, _ = gpt2_setup
    with pytest.raises(InputError, match="expected at least one prompt"):
        Surrogate.fit(model, [], dirs, d=4)


@pytest.mark.filterwarnings("ignore:concept direction is zero:UserWarning")
def test_zero_direction_at_layer_0_is_allowed(tiny):
    """All concept prompts end in the same token (typical of templated prompts such as
    '... Sentiment:') -> x_0 identical -> unit_0 = 0 (ConceptDirections warns).
    `Surrogate.fit` explicitly accepts that (it only refuses zeros at layers >= 1) and the
    correct gain at layer 0 is 0 (nothing is injected there); the other layers are unaffected.

    Regression test: the fit used to anchor P_0 on unit_0 and raise a bare ValueError when it
    was zero; it now anchors on e_0. Checked: the fit succeeds, gain 0 at layer 0, and the
    full-rank gains equal the exact ones at every layer.
    """
    g = torch.Generator().manual_seed(0)
    concept = [torch.randint(0, 90, (6,), generator=g).tolist() + [93] for _ in range(10)]
    dirs = ConceptDirections.fit(tiny, concept, [i % 2 for i in range(10)])
    assert dirs.unit[0].abs().max() == 0
    ops = random_prompts(tiny, 1, 3, 12, seed=5)
    ex = exact_gains(tiny, ops, dirs)
    assert ex[0] == 0 and ex[1:].abs().min() > 1e-6
    s = Surrogate.fit(tiny, ops, dirs, d=FULL)
    assert s.gains[0].abs() <= 1e-12 * ex.abs().max()
    assert _rel(s.gains, ex) < 1e-9


@pytest.mark.parametrize("readout", ["concept", "logits"])
def test_fit_carries_exact_gains_and_its_own_reduction_check(tiny, readout):
    """The two-sided/observable fits keep the exact gains their observability pass computes:
    equal to `exact_gains` on the same prompts; `reduction_error` scores the reduced gains
    against them; `adjoint_captured` is 1 for a full basis and in (0, 1] below it."""
    dirs, ops = _setup(tiny, n_ops=7)
    lw = [3, 5] if readout == "logits" else None
    ex = exact_gains(tiny, ops, dirs, readout=readout, label_words=lw)
    for basis in ("two-sided", "observable"):
        s = Surrogate.fit(tiny, ops, dirs, d=4, basis=basis, readout=readout, label_words=lw)
        assert s.gains_exact is not None and _rel(s.gains_exact, ex) < 1e-9, basis
        fid = s.reduction_error()
        ref = fidelity(s.gains, ex, scale=dirs.scale, identity=s.gains_identity)
        assert fid.raw_spearman == pytest.approx(ref.raw_spearman, abs=1e-12)
        assert fid.rel_err_median == pytest.approx(ref.rel_err_median, rel=1e-9)
        assert fid.rel_err_median > 1e-6  # d = 4 < d_model: a real reduction, a real error
        cap = s.adjoint_captured
        assert cap.shape == (tiny.cfg.n_layers + 1,)
        assert ((cap > 0) & (cap <= 1 + 1e-12)).all() and (cap < 1 - 1e-6).any()
    full = Surrogate.fit(tiny, ops, dirs, d=FULL, readout=readout, label_words=lw)
    torch.testing.assert_close(
        full.adjoint_captured, torch.ones_like(full.adjoint_captured), rtol=0, atol=1e-9
    )
    # per-prompt gains exact at d = d_model (max-normalised: a near-zero layer's relative
    # error is round-off over round-off); TL4's Gemma bridge has float32 steps inside
    # (tests/test_bridge.py; measured 2-5e-8 here)
    assert _rel(full.gains, full.gains_exact) < (1e-6 if TL4 else 1e-9)
    assert full.reduction_error().raw_spearman == pytest.approx(1.0, abs=1e-12)


def test_nested_orders_capture_more_of_the_adjoint(gpt2_setup):
    model, dirs, ops = gpt2_setup
    fits = Surrogate.fit_orders(model, ops, dirs, orders=[2, 4, 8])
    caps = [fits[o].adjoint_captured for o in (2, 4, 8)]
    assert all((b >= a - 1e-12).all() for a, b in zip(caps, caps[1:], strict=False))
    for o in (2, 4):  # the truncations share the exact gains of the one fit
        assert torch.equal(fits[o].gains_exact, fits[8].gains_exact)


def test_krylov_has_no_exact_gains_and_says_so(gpt2_setup, tmp_path):
    model, dirs, ops = gpt2_setup
    s = Surrogate.fit(model, ops, dirs, d=4, basis="krylov")
    assert s.gains_exact is None and s.adjoint_captured is None
    with pytest.raises(InputError, match=r"no exact gains \(basis 'krylov'"):
        s.reduction_error()
    t = Surrogate.fit(model, ops, dirs, d=4)
    t.save(tmp_path / "t.safetensors")
    back = Surrogate.load(tmp_path / "t.safetensors", model=model)
    assert torch.equal(back.gains_exact, t.gains_exact)
    assert torch.equal(back.adjoint_captured, t.adjoint_captured)
    assert back.reduction_error().raw_spearman == t.reduction_error().raw_spearman
    ctrl = Controller.from_gains(back.gains_exact, back.directions, -1.0)  # as docs/usage.md
    ref = Controller.from_gains(exact_gains(model, ops, dirs), dirs, -1.0)
    torch.testing.assert_close(ctrl.schedule.amplitudes, ref.schedule.amplitudes, rtol=1e-9, atol=0)
