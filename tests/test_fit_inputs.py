"""`Surrogate.fit(model, prompts)`: every way of passing prompts and directions.

Each labelled path must give exactly (torch.equal) the surrogate of the explicit two-step recipe
on the same concept and operating prompts -- so a path that leaked concept prompts into the
identification (or the other way round) would fail -- and the split must be disjoint.
"""

from __future__ import annotations

import pytest
import torch
from _wordtok import NEG, POS, with_tokenizer
from conftest import make_gemma_like, random_prompts

from steerlin import ConceptDirections, LabelledPrompts, Surrogate
from steerlin.data import TASKS, Splits, Task
from steerlin.errors import InputError
from steerlin.fit_inputs import resolve_inputs, split_labelled

D = 4
pytestmark = pytest.mark.filterwarnings(
    r"ignore:concept direction is zero at layers \[0\]:UserWarning"
)


def _same(a: Surrogate, b: Surrogate) -> None:
    for k in ("P", "A", "B", "c", "gains", "gains_paper", "gains_std"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


@pytest.fixture(scope="module")
def worded():
    return with_tokenizer(make_gemma_like(seed=3))


def test_tuple_of_token_ids_and_labels(gemma_like):
    prompts = random_prompts(gemma_like, 16, 3, 10, seed=2)
    labels = [i % 2 for i in range(16)]
    sur = Surrogate.fit(gemma_like, (prompts, labels), d=D, seed=3)
    concept, y, operating = split_labelled(prompts, labels, seed=3)
    assert len(concept) == 8 and len(operating) == 8 and sum(y) == 4
    ids = lambda ps: {tuple(p) for p in ps}
    assert not ids(concept) & ids(operating) and ids(concept) | ids(operating) == ids(prompts)
    dirs = ConceptDirections.fit(gemma_like, concept, y)
    _same(sur, Surrogate.fit(gemma_like, operating, dirs, d=D, seed=3))
    assert sur.meta["n_prompts"] == 8 and sur.meta["n_concept"] == 8
    torch.testing.assert_close(sur.directions.unit, dirs.unit, rtol=0, atol=0)
    # a token tensor works the same way
    t = torch.tensor([p[:3] for p in prompts])
    s2 = Surrogate.fit(gemma_like, (t, torch.tensor(labels)), d=D, seed=3)
    c2, y2, o2 = split_labelled(t.tolist(), labels, seed=3)
    _same(s2, Surrogate.fit(gemma_like, o2, ConceptDirections.fit(gemma_like, c2, y2), d=D, seed=3))


def test_labelled_prompts_strings(worded):
    lp = LabelledPrompts(POS + NEG, [1] * 10 + [0] * 10)
    sur = Surrogate.fit(worded, lp, d=D)
    concept, y, operating = split_labelled(list(lp.texts), list(lp.labels), seed=0)
    assert not set(concept) & set(operating)
    _same(sur, Surrogate.fit(worded, operating, ConceptDirections.fit(worded, concept, y), d=D))
    assert "LabelledPrompts" in sur.meta["inputs"]


def test_splits_use_concept_for_directions_and_operating_for_identification(worded):
    mk = lambda pos, neg: LabelledPrompts(pos + neg, [1] * len(pos) + [0] * len(neg))
    splits = Splits(mk(POS[:5], NEG[:5]), mk(POS[5:8], NEG[5:8]), mk(POS[8:], NEG[8:]), 0)
    sur = Surrogate.fit(worded, splits, d=D)
    dirs = ConceptDirections.fit(worded, splits.concept.texts, splits.concept.labels)
    _same(sur, Surrogate.fit(worded, splits.operating.texts, dirs, d=D))
    assert sur.meta["n_prompts"] == 6 and sur.meta["n_concept"] == 10


def test_task_uses_its_documented_default_split(worded):
    pos = [f"{a} {b}" for a in ("good", "great", "nice", "fun") for b in ("movie", "film", "plot")]
    neg = [f"{a} {b}" for a in ("bad", "awful", "poor", "dull") for b in ("movie", "film", "plot")]
    task = Task("toy", TASKS["sst2"], LabelledPrompts(pos + neg, [1] * 12 + [0] * 12))
    # a small task: the paper's 400/200/200 scaled 2:1:1 to its 12 per class, and said so
    assert task.default_counts() == (6, 3, 3)
    small = resolve_inputs(task, labels_needed=True, seed=2)
    ref = task.split(6, 3, 3, seed=2)
    assert small.operating == list(ref.operating.texts) and small.concept == list(ref.concept.texts)
    assert "split(6, 3, 3)" in small.how and "scaled 2:1:1" in small.how
    sur = Surrogate.fit(worded, task, d=D, seed=2)
    assert sur.meta["inputs"] == small.how and sur.meta["n_prompts"] == 6
    _same(sur, Surrogate.fit(worded, ref, d=D, seed=2))
    tiny = Task("toy", TASKS["sst2"], LabelledPrompts(pos[:3] + neg[:3], [1] * 3 + [0] * 3))
    with pytest.raises(InputError, match="at least 4 per class"):
        Surrogate.fit(worded, tiny, d=D)
    # the documented default on a task big enough for it: same surrogate as doing it by hand
    big = Task(
        "toy",
        TASKS["sst2"],
        LabelledPrompts(
            [f"{p} {i}" for p in pos for i in range(70)]
            + [f"{n} {i}" for n in neg for i in range(70)],
            [1] * 840 + [0] * 840,
        ),
    )
    inputs = resolve_inputs(big, labels_needed=True, seed=1)
    ref = big.split(400, 200, 200, seed=1)
    assert big.default_counts() == (400, 200, 200) and "scaled" not in inputs.how
    assert inputs.operating == list(ref.operating.texts)
    assert inputs.concept == list(ref.concept.texts)
    assert not set(inputs.concept) & set(inputs.operating)
    assert not (set(inputs.concept) | set(inputs.operating)) & set(ref.eval.texts)


def test_demo_task_split_fits_its_size():
    """The shipped demo task (300 per class) goes to `Surrogate.fit` as it is (issue 34)."""
    from steerlin import load_demo_task

    inputs = resolve_inputs(load_demo_task(), labels_needed=True)
    assert load_demo_task().default_counts() == (150, 75, 75)
    assert len(inputs.concept) == 300 and len(inputs.operating) == 150
    assert sorted(inputs.concept_labels) == [0] * 150 + [1] * 150
    assert not set(inputs.concept) & set(inputs.operating)


def test_plain_prompts_need_directions(gemma_like):
    prompts = random_prompts(gemma_like, 4)
    with pytest.raises(InputError, match="carry no labels and no directions= was given"):
        Surrogate.fit(gemma_like, prompts)


def test_directions_keyword_with_labelled_prompts_uses_all_as_operating(gemma_like):
    prompts = random_prompts(gemma_like, 8, seed=4)
    labels = [i % 2 for i in range(8)]
    dirs = ConceptDirections.fit(gemma_like, random_prompts(gemma_like, 10, seed=9), [0, 1] * 5)
    sur = Surrogate.fit(gemma_like, (prompts, labels), directions=dirs, d=D)
    _same(sur, Surrogate.fit(gemma_like, prompts, dirs, d=D))
    assert sur.meta["n_prompts"] == 8


def test_split_labelled_errors():
    with pytest.raises(InputError, match="class 1 has 1 prompt"):
        split_labelled([[1], [2], [3]], [0, 0, 1])
    with pytest.raises(InputError, match=r"concept_fraction: expected a number in \(0, 1\)"):
        split_labelled([[1], [2], [3], [4]], [0, 0, 1, 1], concept_fraction=1.0)


def test_surrogate_directions_survive_save_load(gemma_like, tmp_path):
    prompts = random_prompts(gemma_like, 8, seed=4)
    sur = Surrogate.fit(gemma_like, (prompts, [0, 1] * 4), d=D)
    sur.save(tmp_path / "s.safetensors")
    back = Surrogate.load(tmp_path / "s.safetensors", gemma_like)
    assert torch.equal(back.directions.unit, sur.directions.unit)
    assert torch.equal(back.directions.scale, sur.directions.scale)
    assert back.meta == sur.meta


def test_label_names_from_a_task_and_from_the_argument(tiny):
    """A Task carries its class names into the fit; `label_names=` names the poles otherwise.
    Targets such as "positive" and the printed sign convention use them."""
    from steerlin import Controller

    texts = [f"review number {i}" for i in range(1600)]  # 800 per class: 400 + 200 + 200
    task = Task("toy", TASKS["sst2"], LabelledPrompts(texts, [i % 2 for i in range(1600)]))
    assert resolve_inputs(task, labels_needed=True, seed=0, concept_fraction=0.5).label_names == (
        "negative",
        "positive",
    )
    prompts = random_prompts(tiny, 12, seed=4)
    sur = Surrogate.fit(tiny, (prompts, [0, 1] * 6), d=2, label_names=("sad", "happy"))
    assert sur.meta["label_names"] == ["sad", "happy"]
    ctrl = Controller(sur, "happy")
    assert ctrl.targets[0].separations == 1.0 and "+ = 'happy'" in ctrl.sign_convention
    assert Controller(sur, "sad").targets[0].separations == -1.0


def test_summary_says_what_one_target_unit_is(gemma_like):
    """Brought vectors carry no class means: one "class separation" is then ‖v_L‖ in raw
    readout units, and the fit says so (issue 34); class-mean fits say what theirs is."""
    prompts = random_prompts(gemma_like, 8, seed=4)
    v = 3.0 * torch.ones(gemma_like.cfg.d_model, dtype=torch.float64)
    sur = Surrogate.fit(gemma_like, prompts, directions=v, d=D)
    assert sur.brought_directions
    sep = sur.meta["separation"]["value"]
    assert sep == pytest.approx(float(v.norm()))
    assert f"{sep:.4g} raw readout units" in sur.target_unit and "‖v_L‖" in sur.target_unit
    assert sur.target_unit in sur.summary() and "operating prompts" in sur.summary()
    from steerlin import Controller

    assert "brought vector's ‖v_L‖" in Controller(sur, 1.0).sign_convention
    labels = [i % 2 for i in range(8)]
    fitted = Surrogate.fit(gemma_like, (prompts, labels), d=D)
    assert not fitted.brought_directions and "label-1 mean minus" in fitted.target_unit
    assert "brought" not in Controller(fitted, 1.0).sign_convention
