"""The docs run (issue 34): every ```python block of README.md and docs/usage.md is executed, in
order, in one namespace per document, so a renamed argument or a changed default fails here
instead of in a reader's hands.

Two ways, both checked:
- tiny (README.md on both legs, docs/usage.md on the TransformerLens 3 leg; seconds): the
  documented swap below puts a tiny seeded Gemma-3-shaped model (8 blocks, the word tokenizer
  of tests/_wordtok.py, nothing downloaded) behind `steerlin.load_model(...)` for any name, and
  small synthetic labelled tasks built from that tokenizer's words (200 texts per class)
  behind `steerlin.load_task(...)` and `steerlin.load_demo_task()`; nothing else is changed.
  The numbers are the toy's, the calls and arguments are the docs' own.
- gemma (marker `gemma`, the 3.x leg): README.md as written, on the offline Gemma-3-270m and
  the shipped demo task, no swap.
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
import time
from pathlib import Path

import pytest
import torch
from _wordtok import with_tokenizer
from conftest import _MODELS, TL4, make_gemma_like

import steerlin
from steerlin.data import TASKS, LabelledPrompts, Task

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/usage.md")
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

POS = ("good", "great", "fine", "nice", "happy", "best", "fun")
NEG = ("bad", "awful", "poor", "sad", "worst", "dull", "boring")
NOUNS = ("movie", "film", "plot", "story", "acting")


def python_blocks(name: str) -> list[str]:
    return FENCE.findall((ROOT / name).read_text())


def toy_task(name: str = "sst2-toy", n_per_class: int = 200) -> Task:
    """A labelled task in the word tokenizer's vocabulary: `n_per_class` distinct texts per
    class (200: what the docs' largest split, 100/50/50, needs; at most 490)."""
    texts, labels = [], []
    for y, adjs in ((1, POS), (0, NEG)):
        for n in NOUNS:
            for a in adjs:
                for b in adjs:
                    for pre in ("the", "a"):
                        texts.append(f"{pre} {n} was {a} and {b}")
                        labels.append(y)
    keep = [i for y in (1, 0) for i in [j for j, v in enumerate(labels) if v == y][:n_per_class]]
    prompts = LabelledPrompts([texts[i] for i in keep], [labels[i] for i in keep])
    return Task(name, TASKS["sst2"], prompts, data_split="train", source="toy")


def tiny_model(name=None, dtype: torch.dtype = torch.float64, **_):
    if not isinstance(name, str | None):  # load_model(your_model): returned unchanged
        return name
    model = with_tokenizer(make_gemma_like(dtype=dtype, seed=7, n_layers=8))
    _MODELS.append(model)
    return model


@pytest.fixture
def swapped(monkeypatch):
    """The documented swap: tiny model and toy tasks behind steerlin's loaders."""
    monkeypatch.setattr(steerlin, "load_model", tiny_model)
    monkeypatch.setattr(steerlin, "load_task", lambda name, **kw: toy_task(name))
    monkeypatch.setattr(steerlin, "load_demo_task", lambda *a, **kw: toy_task())


@pytest.fixture
def single_process_group(monkeypatch):
    """What `torchrun --nproc_per_node 1` would set, for the docs' distributed block."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1"
    ).items():
        monkeypatch.setenv(k, v)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_document(name: str, tmp_path: Path, monkeypatch) -> dict:
    """Execute the document's blocks in order in one namespace (in tmp_path: files the docs
    save land there); a failing block names itself."""
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__docs__"}
    out = io.StringIO()
    blocks = python_blocks(name)
    assert blocks, f"{name} has no python blocks"
    for i, code in enumerate(blocks):
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{name}[block {i}]", "exec"), ns)
        except Exception as exc:
            raise AssertionError(f"{name}, python block {i} failed:\n{code}") from exc
        print(f"{name} block {i}: {time.perf_counter() - start:.1f} s")
    ns["__stdout__"] = out.getvalue()
    return ns


def test_blocks_are_found():
    """The extraction sees the blocks a reader sees (and no bash block)."""
    for name in DOCS:
        text = (ROOT / name).read_text()
        assert len(python_blocks(name)) == text.count("```python"), name
        assert all("pip install" not in b for b in python_blocks(name))


def test_readme_runs_tiny(swapped, tmp_path, monkeypatch):
    ns = run_document("README.md", tmp_path, monkeypatch)
    assert isinstance(ns["sur"], steerlin.Surrogate) and ns["ctrl"].calibration is not None
    assert "target unit:" in ns["__stdout__"]


@pytest.mark.skipif(
    TL4, reason="TransformerLens 3 leg only: ~3x slower on bridges; README runs on both"
)
def test_usage_runs_tiny(swapped, single_process_group, tmp_path, monkeypatch):
    ns = run_document("docs/usage.md", tmp_path, monkeypatch)
    assert isinstance(ns["sur"], steerlin.Surrogate)


@pytest.mark.gemma
def test_readme_runs_on_gemma(gemma, tmp_path, monkeypatch):
    """README.md as written, on the offline Gemma-3-270m (the session's loaded model stands in
    for `load_model("gemma-3-270m")`, which would load the same cached weights again)."""
    real = steerlin.load_model

    def load(name="gemma-3-270m", **kw):
        return gemma if name == "gemma-3-270m" and not kw else real(name, **kw)

    monkeypatch.setattr(steerlin, "load_model", load)
    ns = run_document("README.md", tmp_path, monkeypatch)
    assert ns["sur"].meta["n_prompts"] == 150  # the demo task's 2:1:1 split: 75 per class
    assert "split(150, 75, 75)" in ns["sur"].meta["inputs"]
