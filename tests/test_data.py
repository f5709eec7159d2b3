"""steerlin.data: labelled prompts, task registry, local/online loading, balanced splits."""

from __future__ import annotations

import shutil
import warnings
from importlib import resources

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steerlin.data import (
    TASKS,
    LabelledPrompts,
    Splits,
    Task,
    TaskSpec,
    dedupe,
    get_task_spec,
    load_demo_task,
    load_task,
    read_sst2_tsv,
    select_demo_rows,
    warn_if_common_suffix,
)
from steerlin.errors import FileFormatError, InputError, ShapeError


def make_task(texts, labels, template="{text}", name="toy") -> Task:
    return Task(name, TASKS["sst2"], LabelledPrompts(texts, labels), template)


def toy_task(n0: int, n1: int, template="{text}") -> Task:
    texts = [f"negative example number {i}" for i in range(n0)]
    texts += [f"positive example number {i}" for i in range(n1)]
    return make_task(texts, [0] * n0 + [1] * n1, template)


# ------------------------------------------------------------------ LabelledPrompts


def test_labelled_prompts_converts_and_validates():
    p = LabelledPrompts(["a", "b", "c"], np.array([0, 1, 1]))
    assert p.texts == ("a", "b", "c") and p.labels == (0, 1, 1)
    assert all(type(y) is int for y in p.labels)
    assert len(p) == 3
    assert list(p) == [("a", 0), ("b", 1), ("c", 1)]
    arr = p.labels_array()
    assert arr.dtype == np.int64 and arr.tolist() == [0, 1, 1]
    assert p.n_per_class == {0: 1, 1: 2}
    assert p.by_class(1) == LabelledPrompts(("b", "c"), (1, 1))
    assert p.by_class(0).texts == ("a",)
    hash(p)  # frozen and hashable


def test_labelled_prompts_errors():
    with pytest.raises(ShapeError, match=r"3 texts and 2 labels"):
        LabelledPrompts(["a", "b", "c"], [0, 1])
    with pytest.raises(InputError, match=r"labels\[1\]: expected 0 or 1, got 2"):
        LabelledPrompts(["a", "b"], [0, 2])
    with pytest.raises(InputError, match=r"expected 0 or 1, got 0.5"):
        LabelledPrompts(["a", "b"], [0, 0.5])
    with pytest.raises(InputError, match=r"texts\[0\]: expected a str"):
        LabelledPrompts([3], [0])
    with pytest.raises(InputError, match="single string"):
        LabelledPrompts("ab", [0, 1])
    with pytest.raises(InputError, match="by_class"):
        LabelledPrompts(["a"], [0]).by_class(2)


def test_with_template():
    p = LabelledPrompts(["good", "bad"], [1, 0]).with_template("Review: {text}\nSentiment:")
    assert p.texts == ("Review: good\nSentiment:", "Review: bad\nSentiment:")
    assert p.labels == (1, 0)
    # braces inside the text are not format fields
    assert LabelledPrompts(["{x}"], [1]).with_template("<{text}>").texts == ("<{x}>",)
    with pytest.raises(InputError, match="no '\\{text\\}' placeholder"):
        LabelledPrompts(["a"], [1]).with_template("Review:")
    with pytest.raises(InputError, match="literal braces"):
        LabelledPrompts(["a"], [1]).with_template("{text} {label}")


# ------------------------------------------------------------------ splitting


def test_split_balanced_disjoint_and_templated():
    task = toy_task(30, 40, template="Q: {text} A")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every prompt ends in " A"
        s = task.split(5, 4, 3, seed=7)
    assert isinstance(s, Splits) and s.seed == 7
    assert s.concept.n_per_class == {0: 5, 1: 5}
    assert s.operating.n_per_class == {0: 4, 1: 4}
    assert s.eval.n_per_class == {0: 3, 1: 3}
    sets = [set(p.texts) for _, p in s.items()]
    assert all(len(x) == n for x, n in zip(sets, (10, 8, 6), strict=True))
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    for _, p in s.items():
        for t, y in p:
            assert t.startswith("Q: ") and t.endswith(" A")
            assert ("positive" in t) == (y == 1)


def test_split_deterministic_and_seed_dependent():
    task = toy_task(50, 50)
    a, b = task.split(10, 5, 5, seed=3), task.split(10, 5, 5, seed=3)
    assert a == b
    c = task.split(10, 5, 5, seed=4)
    assert set(a.concept.texts) != set(c.concept.texts)
    # the concept set depends only on (seed, n_concept)
    assert task.split(10, 0, 0, seed=3).concept == a.concept


def test_split_dedupes_and_drops_conflicts():
    texts = ["a", "a", "b", "b", "c", "d", "d", "e", "f"]
    labels = [0, 0, 0, 1, 0, 1, 1, 1, 1]
    unique, n_conflicts = dedupe(LabelledPrompts(texts, labels))
    assert unique.texts == ("a", "c", "d", "e", "f") and unique.labels == (0, 0, 1, 1, 1)
    assert n_conflicts == 1
    s = make_task(texts, labels).split(1, 1, 0, seed=0)
    allt = s.concept.texts + s.operating.texts
    assert "b" not in allt and len(set(allt)) == len(allt) == 4
    # class 0 has only 2 unique texts after dedupe ("a", "c"): 3 per class is too many
    with pytest.raises(InputError, match=r"class 0 \(negative\) has 2 examples after dedup"):
        make_task(texts, labels).split(1, 1, 1)


def test_split_too_few_message_names_counts():
    task = toy_task(20, 8)
    with pytest.raises(InputError) as ei:
        task.split(4, 3, 2)
    msg = str(ei.value)
    assert "class 1 (positive) has 8 examples" in msg
    assert "4 + 3 + 2 = 9 per class" in msg


@pytest.mark.parametrize(
    "kwargs", [dict(n_concept=0), dict(n_operating=-1), dict(n_eval=1.5), dict(seed=-1)]
)
def test_split_bad_counts(kwargs):
    with pytest.raises(InputError):
        toy_task(10, 10).split(**{"n_concept": 1, "n_operating": 1, "n_eval": 1, **kwargs})


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 1), min_size=0, max_size=40),
    dup=st.integers(0, 5),
    n=st.tuples(st.integers(1, 6), st.integers(0, 6), st.integers(0, 6)),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_property(labels, dup, n, seed):
    texts = [f"t{i}" for i in range(len(labels))]
    texts += texts[:dup]  # exact duplicates with the same label
    labels = labels + labels[:dup]
    task = make_task(texts, labels)
    have = {c: len({t for t, y in zip(texts, labels, strict=True) if y == c}) for c in (0, 1)}
    if min(have.values()) < sum(n):
        with pytest.raises(InputError, match="examples after deduplication"):
            task.split(*n, seed=seed)
        return
    s = task.split(*n, seed=seed)
    parts = [s.concept, s.operating, s.eval]
    for p, k in zip(parts, n, strict=True):
        assert p.n_per_class == {0: k, 1: k}
        assert len(set(p.texts)) == len(p)
    flat = [t for p in parts for t in p.texts]
    assert len(flat) == len(set(flat))
    lab = dict(zip(texts, labels, strict=True))
    assert all(lab[t] == y for p in parts for t, y in p)
    assert task.split(*n, seed=seed) == s


# ------------------------------------------------------------------ common-suffix warning


def test_warn_if_common_suffix_strings():
    with pytest.warns(UserWarning, match="layer-0 concept direction is zero"):
        assert warn_if_common_suffix(["Review: good\nSentiment:", "Review: bad\nSentiment:"])
    with pytest.warns(UserWarning, match="'movie'"):
        warn_if_common_suffix(["a fine movie", "a dreadful movie"])
    with pytest.warns(UserWarning, match=r"'\.'"):
        warn_if_common_suffix(["great.", "bad."])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_common_suffix(["cats", "dogs"])
        assert not warn_if_common_suffix(["great.", "bad!"])
        assert not warn_if_common_suffix(["only one."])
        assert not warn_if_common_suffix(["", "x"])


def test_warn_if_common_suffix_token_ids():
    with pytest.warns(UserWarning, match="token id 7"):
        assert warn_if_common_suffix([[1, 2, 7], [5, 7], np.array([3, 3, 3, 7])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_common_suffix([[1, 2, 7], [5, 8]])
        assert not warn_if_common_suffix(np.array([[1, 2], [3, 4]]))


def test_split_warns_once_on_fixed_suffix():
    task = toy_task(10, 10, template="Review: {text}\nSentiment:")
    with pytest.warns(UserWarning, match="concept, operating, eval") as rec:
        task.split(2, 2, 2)
    assert len([w for w in rec if "final token" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_task(["x good", "y bad", "z ok", "w meh"], [1, 0, 1, 0]).split(1, 1, 0)


# ------------------------------------------------------------------ registry and label mapping


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("sst2", "sst2"),
        ("SST-2", "sst2"),
        ("sst-2", "sst2"),
        ("irony", "tweet_eval_irony"),
        ("Hate", "tweet_eval_hate"),
        ("offensive", "tweet_eval_offensive"),
        ("tweet_eval:sentiment", "tweet_eval_sentiment"),
        ("civil_comments", "civil_comments"),
    ],
)
def test_get_task_spec_aliases(name, key):
    assert get_task_spec(name) is TASKS[key]


def test_registry_contents():
    assert {"sst2", "imdb", "amazon_polarity", "yelp_polarity", "civil_comments"} <= set(TASKS)
    for spec in TASKS.values():
        assert spec.positive_label_word.startswith(" ")
        assert spec.negative_label_word.startswith(" ")
        assert spec.positive_label_word != spec.negative_label_word
        assert spec.hf_id
    assert TASKS["amazon_polarity"].text_field == "content"
    assert TASKS["tweet_eval_irony"].hf_config == "irony"
    with pytest.raises(InputError, match="unknown task 'nope'"):
        get_task_spec("nope")


def test_tweet_eval_sentiment_mapping():
    spec = TASKS["tweet_eval_sentiment"]
    assert spec.map_labels([0, 1, 2, 2, 0]) == [0, None, 1, 1, 0]
    assert spec.map_label(np.int64(2)) == 1
    with pytest.raises(InputError, match=r"raw labels \[3\]"):
        spec.map_labels([0, 3])
    rows = [("bad day", 0), ("meh", 1), ("lovely", 2)]
    from steerlin.data.readers import _clean

    p = _clean([t for t, _ in rows], spec.map_labels([y for _, y in rows]))
    assert p == LabelledPrompts(("bad day", "lovely"), (0, 1))


def test_threshold_and_generic_tweet_eval_mapping():
    cc = TASKS["civil_comments"]
    assert cc.map_labels([0.0, 0.49, 0.5, 0.9]) == [0, 0, 1, 1]
    generic = get_task_spec("tweet_eval:stance_climate")
    assert generic.hf_config == "stance_climate" and generic.name == "tweet_eval:stance_climate"
    assert generic.map_labels([0, 1]) == [0, 1]
    with pytest.raises(InputError, match="is binary but raw labels"):
        generic.map_labels([0, 1, 2])
    with pytest.raises(InputError, match="unlabelled split"):
        TASKS["sst2"].map_labels([0, -1])


# ------------------------------------------------------------------ online path (no network)


class _FakeDataset:
    def __init__(self, cols):
        self.cols = cols
        self.column_names = list(cols)

    def __getitem__(self, key):
        return list(self.cols[key])

    def select(self, rows):
        return _FakeDataset({k: [v[i] for i in rows] for k, v in self.cols.items()})


def test_online_failure_gives_data_dir_advice(monkeypatch):
    import datasets

    def boom(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(InputError, match="data_dir=") as ei:
        load_task("sst2", split="validation")
    msg = str(ei.value)
    assert "dev.tsv" in msg and "ConnectionError" in msg and "nyu-mll/glue" in msg
    with pytest.raises(InputError, match=r"test_text\.txt' and 'test_labels\.txt'"):
        load_task("irony", split="test")
    with pytest.raises(InputError, match="no local file format"):
        load_task("imdb")


def test_online_path_with_fake_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(hf_id, config, split):
        calls.append((hf_id, config, split))
        return _FakeDataset(
            {"text": ["  nice  ", "meh", "awful", "", "great"], "label": [2, 1, 0, 0, 2]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    task = load_task("tweet_eval_sentiment", split="val")
    assert calls == [("cardiffnlp/tweet_eval", "sentiment", "validation")]
    assert task.prompts == LabelledPrompts(("nice", "awful", "great"), (1, 0, 1))
    assert task.data_split == "validation"
    small = load_task("tweet_eval_sentiment", max_examples=2)
    assert len(small.prompts) <= 2
    with pytest.raises(InputError, match="has splits"):
        load_task("imdb", split="validation")


# ------------------------------------------------------------------ offline path (real data)


def test_offline_sst2_both_folder_forms(shared_data):
    parent = load_task("sst2", data_dir=shared_data, split="dev")
    direct = load_task("SST-2", data_dir=shared_data / "sst2", split="validation")
    assert parent.prompts == direct.prompts
    assert len(parent.prompts) == 872 and parent.prompts.n_per_class == {0: 428, 1: 444}
    assert not any(t != t.strip() or not t for t in parent.prompts.texts)
    train = load_task("sst2", data_dir=shared_data, max_examples=2000, template="{text} ->")
    assert len(train.prompts) == 2000 and min(train.prompts.n_per_class.values()) > 500
    with pytest.warns(UserWarning, match="'->'"):
        s = train.split(100, 50, 50, seed=1)
    assert s.concept.n_per_class == {0: 100, 1: 100}
    with pytest.raises(InputError, match="test.tsv"):
        load_task("sst2", data_dir=shared_data, split="test")


def test_offline_sst2_full_train_has_quotes(shared_data):
    texts, labels = read_sst2_tsv(shared_data / "sst2" / "train.tsv")
    assert len(texts) == len(labels) == 67349
    assert any('"' in t or "'" in t for t in texts)


@pytest.mark.parametrize("subset", ["irony", "hate"])
def test_offline_tweeteval_both_folder_forms(shared_data, subset):
    a = load_task(subset, data_dir=shared_data, split="validation")
    b = load_task(f"tweet_eval_{subset}", data_dir=shared_data / "tweeteval", split="val")
    c = load_task(f"tweet_eval:{subset}", data_dir=shared_data / "tweeteval" / subset)
    assert a.prompts == b.prompts
    n_lines = len((shared_data / "tweeteval" / subset / "val_labels.txt").read_text().split())
    assert 0.99 * n_lines <= len(a.prompts) <= n_lines
    assert set(a.prompts.labels) == {0, 1} and len(c.prompts) > len(a.prompts)
    assert a.source.endswith(subset)


def test_offline_copy_layouts_and_errors(shared_data, tmp_path):
    irony = tmp_path / "datasets" / "irony"
    irony.mkdir(parents=True)
    for f in ("test_text.txt", "test_labels.txt"):
        shutil.copy(shared_data / "tweeteval" / "irony" / f, irony / f)
    task = load_task("irony", data_dir=tmp_path, split="test")
    assert task.prompts.n_per_class == {0: 473, 1: 311}
    with pytest.raises(InputError, match="train_text.txt"):
        load_task("irony", data_dir=tmp_path)
    (irony / "test_labels.txt").write_text("0\n1\n")
    with pytest.raises(FileFormatError, match="must correspond line by line"):
        load_task("irony", data_dir=tmp_path, split="test")


def test_local_sst2_tsv_format_errors(tmp_path):
    good = tmp_path / "train.tsv"
    good.write_text("label\tcontent\n1\tit 's \"great\n0\t  dull  \n1\t \n", encoding="utf-8")
    task = load_task("sst2", data_dir=tmp_path)
    assert task.prompts == LabelledPrompts(("it 's \"great", "dull"), (1, 0))
    assert load_task("sst2", data_dir=good).prompts == task.prompts
    (tmp_path / "dev.tsv").write_text("index\tsentence\n0\tx\n")
    with pytest.raises(FileFormatError, match="header"):
        load_task("sst2", data_dir=tmp_path, split="dev")
    (tmp_path / "dev.tsv").write_text("label\tsentence\nx\ty\n")
    with pytest.raises(FileFormatError, match="line 2"):
        load_task("sst2", data_dir=tmp_path, split="dev")
    with pytest.raises(InputError, match="no local file format"):
        load_task("yelp_polarity", data_dir=tmp_path)


# ------------------------------------------------------------------ shipped demo


def test_demo_task():
    task = load_demo_task()
    assert task.name == "sst2-demo"
    assert task.prompts.n_per_class == {0: 300, 1: 300}
    assert all(len(t.split()) <= 20 for t in task.prompts.texts)
    assert len(set(task.prompts.texts)) == 600
    s = task.split(100, 50, 50, seed=0)
    assert s.eval.n_per_class == {0: 50, 1: 50}
    templated = load_demo_task(template="Review: {text}\nSentiment:")
    with pytest.warns(UserWarning):
        assert templated.split(10, 0, 0).concept.texts[0].startswith("Review: ")


def test_demo_file_reproducible(shared_data):
    rows = select_demo_rows(shared_data / "sst2" / "train.tsv")
    ref = resources.files("steerlin").joinpath("data", "sst2_demo.tsv").read_text("utf-8")
    expected = "label\tcontent\n" + "".join(f"{y}\t{t}\n" for y, t in rows)
    assert ref == expected


def test_taskspec_validation():
    with pytest.raises(InputError, match="local_format"):
        TaskSpec("x", "a/b", None, "t", "l", " p", " n", "d", local_format="csv")
    with pytest.raises(InputError, match="targets must be 0 or 1"):
        TaskSpec("x", "a/b", None, "t", "l", " p", " n", "d", label_map=((0, 2),))
