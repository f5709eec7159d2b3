"""Integration tests on the offline Gemma-3-270m (fp32) with real SST-2 sentences."""

import pytest
import torch

from steerlin import ConceptDirections, Controller, Surrogate, capture, exact_gains, scan_gains
from steerlin.data import load_task
from steerlin.frozen import iter_contexts
from steerlin.hooks import inject
from steerlin.measure import calibrate, measure_shift
from steerlin.metrics import fidelity

pytestmark = pytest.mark.gemma


@pytest.fixture(scope="module")
def sst2(shared_data):
    return load_task("sst2", data_dir=shared_data).split(20, 8, 8, seed=0)


@pytest.fixture(scope="module")
def dirs(gemma, sst2):
    return ConceptDirections.fit(gemma, list(sst2.concept.texts), list(sst2.concept.labels))


def _unpadded_states(model, text):
    toks = model.to_tokens(text)
    L = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
    return torch.stack([cache[n][0, -1] for n in names])


def test_capture_equals_unpadded_runs(gemma, sst2):
    texts = list(sst2.eval.texts)[:6]  # mixed lengths, padded on the right in one batch
    traj = capture(gemma, texts, batch_size=6)
    for i, t in enumerate(texts):
        ref = _unpadded_states(gemma, t)
        # fp32: batched matmuls may reorder sums; 1e-5 of each state's norm
        err = (traj.states[i] - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert err.max() < 1e-5, err
    assert traj.lengths.tolist() == [gemma.to_tokens(t).shape[1] for t in texts]


def test_frozen_context_map_equals_hooked_full_model(gemma, sst2, dirs):
    texts = list(sst2.eval.texts)[:4]
    ctx = next(iter_contexts(gemma, texts, batch_size=4))
    layer, u = 5, 0.1
    v = u * dirs.injection(layer)
    x_final = ctx.run(ctx.states[:, layer] + v, layer)
    for r, i in enumerate(ctx.index.tolist()):
        toks = gemma.to_tokens(texts[i])
        name = f"blocks.{gemma.cfg.n_layers - 1}.hook_resid_post"
        with torch.no_grad(), inject(gemma, {layer: v}):
            _, cache = gemma.run_with_cache(toks, names_filter=lambda n: n == name)
        ref = cache[name][0, -1]
        assert (x_final[r] - ref).norm() / ref.norm() < 1e-5


def test_directions_separate_classes_at_late_layers(gemma, shared_data):
    sp = load_task("sst2", data_dir=shared_data).split(20, 1, 1, seed=1)
    texts, labels = list(sp.concept.texts), torch.tensor(sp.concept.labels)
    traj = capture(gemma, texts)
    d = ConceptDirections.fit(gemma, traj, labels)
    L = gemma.cfg.n_layers
    for layer in (L - 2, L):
        proj = traj.states[:, layer] @ d.unit[layer]
        gap = proj[labels == 1].mean() - proj[labels == 0].mean()
        spread = proj.std()
        assert gap > 0.5 * spread  # class means clearly apart along the direction
    assert torch.allclose(d.scale, traj.norms.mean(0))


def test_scans_agree_and_surrogate_tracks_them(gemma, sst2, dirs):
    ev = list(sst2.eval.texts)[:4]
    cached = scan_gains(gemma, ev, dirs, eps=0.1, layers=[0, 6, 12, 17])
    hooks = scan_gains(gemma, ev, dirs, eps=0.1, layers=[0, 6, 12, 17], method="hooks")
    assert torch.allclose(cached, hooks, rtol=1e-4, atol=1e-4 * cached.abs().max())
    sur = Surrogate.fit(gemma, list(sst2.operating.texts), dirs, d=16)
    full = scan_gains(gemma, list(sst2.eval.texts), dirs, eps=0.1)
    ex = exact_gains(gemma, list(sst2.eval.texts), dirs)
    assert fidelity(ex, full).spearman > 0.9
    # Spearman in norm-relative units is a weak oracle: u is relative to the residual norm,
    # so a "predictor" that is just scale_l (no model of the dynamics at all) already ranks
    # the layers with Spearman ~0.95 on this model (measured). Compare with that null instead.
    scale = dirs.scale[: gemma.cfg.n_layers].to(torch.float64)
    null = scale * (scale @ full) / (scale @ scale)  # best-fitting multiple of scale_l
    err_sur = float((sur.gains - full).norm() / full.norm())  # measured 0.05
    err_null = float((null - full).norm() / full.norm())  # measured 0.19
    assert err_sur < 0.5 * err_null, (err_sur, err_null)
    # raw units (gain per unit of raw residual norm, g_l / scale_l): the scale trend is gone,
    # the scale-only null is a constant (no ranking), and the surrogate still ranks the
    # layers (measured 0.91; 0.90 for the paper's single mean model)
    assert fidelity(sur.gains / scale, full / scale).spearman > 0.8


def test_controller_schedule_on_gemma(gemma, sst2, dirs):
    sur = Surrogate.fit(gemma, list(sst2.operating.texts), dirs, d=8)
    ops = list(sst2.operating.texts)
    target = 0.02 * float(dirs.scale[-1])
    sched = Controller(sur, target, units="raw").schedule
    # small target: the full model responds as predicted (linear regime) within 20%
    got = float(measure_shift(gemma, ops, sched)[0])
    assert abs(got - target) < 0.2 * abs(target)
    cal = calibrate(gemma, ops, sched, target, tol=1e-3)
    assert abs(cal.measured_shift - target) <= 1e-3 * abs(target)


def test_steered_generation_changes_text_and_moves_the_readout(gemma, sst2, dirs):
    """Steering by ± one class separation (the gap of the class means of <unit_L, x_L> on the
    concept split, raw units) changes greedy continuations, differently for the two signs, and
    shifts the readout at the steered forward in the intended direction.

    Not asserted, because it did not hold when measured: re-reading the generated text
    without steering, the mean <unit_L, x_L> over generated positions was 6661 (+1
    separation), 6842 (-1) and 6590 (unsteered) on these four prompts, so that readout does
    not judge the continuations' sentiment (the +1 texts read positive to a human: "a great
    success, and I was very happy").
    """
    sur = Surrogate.fit(gemma, list(sst2.operating.texts), dirs, d=8)
    traj = capture(gemma, list(sst2.concept.texts))
    labels = torch.tensor(sst2.concept.labels)
    proj = traj.states[:, -1].to(torch.float64) @ dirs.unit[-1].to(torch.float64)
    sep = float(proj[labels == 1].mean() - proj[labels == 0].mean())  # measured 2934
    assert sep > 0
    prompts = ["The movie was", "I thought the film", "Overall, the story", "The acting in this"]
    gen = dict(max_new_tokens=10, do_sample=False, verbose=False)
    plain = [gemma.generate(p, **gen) for p in prompts]
    texts, shifts = {}, {}
    for sign in (1, -1):
        sched = Controller(sur, sign * sep, units="raw").schedule
        with sched.apply(gemma):
            texts[sign] = [gemma.generate(p, **gen) for p in prompts]
        shifts[sign] = float(measure_shift(gemma, list(sst2.operating.texts), sched)[0])
    # measured: 4/4 prompts change for each sign and the two signs differ on 4/4
    for sign in (1, -1):
        assert sum(a != b for a, b in zip(plain, texts[sign], strict=True)) >= 3, texts[sign]
    assert sum(a != b for a, b in zip(texts[1], texts[-1], strict=True)) >= 3
    assert shifts[1] > 0.25 * sep and shifts[-1] < -0.25 * sep, shifts
    with sched.apply(gemma):
        a = gemma.generate("The movie was", max_new_tokens=4, do_sample=False, verbose=False)
    assert isinstance(a, str)


def test_steered_generation_moves_in_the_intended_direction(gemma, sst2, dirs):
    """Calibrated ±1 class separation in the generation regime: the unsteered model's own
    readout of the finished continuations is ordered + > unsteered-ish > −, on 12 held-out
    neutral stems (means; the eval shows a ~0.9 separation swing at t = 1)."""
    from steerlin.measure import continuation_scores
    from steerlin.readouts import make_readout
    from steerlin.regime import generate
    from steerlin.steer_eval import neutral_stems

    sur = Surrogate.fit(gemma, list(sst2.operating.texts), dirs, d=8)
    stems = neutral_stems()
    rd = make_readout(gemma, "concept", dirs.unit[-1])
    ys = {}
    for target in ("positive", "negative"):
        ctrl = Controller(sur, target).calibrate(gemma, stems["calibration"], n_tokens=8)
        cont = generate(gemma, stems["eval"][:12], 20, ctrl)
        ys[target] = float(continuation_scores(gemma, cont, rd)["readout"].mean())
    base = generate(gemma, stems["eval"][:12], 20)
    y0 = float(continuation_scores(gemma, base, rd)["readout"].mean())
    assert ys["positive"] > y0 > ys["negative"]
