"""Progress bars (issue 34): on by default for fits over more than a few dozen prompts and for
the one-time model conversion, but only where stderr is a terminal; never in logs or CI."""

from __future__ import annotations

import sys

import pytest

from steerlin import LabelledPrompts, load_demo_task
from steerlin.data import Splits
from steerlin.fit_inputs import PROGRESS_MIN_PROMPTS, auto_progress, count_prompts


@pytest.fixture
def tty(monkeypatch):
    def set_tty(on: bool):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: on, raising=False)

    return set_tty


def test_fit_progress_is_automatic(tty):
    demo = load_demo_task()
    many = [f"prompt {i}" for i in range(PROGRESS_MIN_PROMPTS + 1)]
    few = many[:PROGRESS_MIN_PROMPTS]
    assert count_prompts(demo) == 2 * (150 + 75)
    assert count_prompts(LabelledPrompts(few, [i % 2 for i in range(len(few))])) == len(few)
    assert count_prompts((many, [0] * len(many))) == len(many)
    sp = demo.split(10, 5, 5)
    assert count_prompts(Splits(sp.concept, sp.operating, sp.eval, 0)) == 30
    tty(True)
    assert auto_progress(None, demo) and auto_progress(None, many)
    assert not auto_progress(None, few) and not auto_progress(None, object())
    tty(False)
    assert not auto_progress(None, demo)  # not a terminal: off
    assert auto_progress(True, few) and not auto_progress(False, demo)  # as given


def test_conversion_bar_only_on_a_terminal(tty):
    from steerlin.loading.gguf import _GEMMA, _stage, conversion_bar

    for on in (True, False):
        tty(on)
        with conversion_bar(_GEMMA, 4) as bar:
            assert bar.disable is (not on)
            for i in range(4):
                _stage(bar, f"step {i}")
            assert bar.n == (4 if on else 0)  # a disabled bar counts nothing
