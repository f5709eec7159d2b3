"""Chat templates for instruct models: prompts become user turns ending with the generation
prompt, BOS not doubled, labels kept (an in-memory tokenizer with a chat template)."""

from __future__ import annotations

import pytest
from _wordtok import NEG, POS, with_tokenizer
from conftest import make_gemma_like

from steerlin import LabelledPrompts, Surrogate
from steerlin.data import TASKS, Task, chat_prompts
from steerlin.errors import InputError


def test_chat_prompts_and_fit():
    model = with_tokenizer(make_gemma_like(seed=2))
    # given the model: TransformerLens prepends BOS here, so the template's leading one goes
    lp = LabelledPrompts(POS + NEG, [1] * 10 + [0] * 10).with_chat(model)
    assert lp.texts[0] == "user : good movie .<s>assistant :"
    assert lp.labels == (1,) * 10 + (0,) * 10
    toks = model.to_tokens(lp.texts[0])[0].tolist()
    assert toks.count(model.tokenizer.bos_token_id) == 2  # TL's BOS + the assistant turn's
    assert toks[0] == model.tokenizer.bos_token_id and toks[1] != toks[0]
    with_sys = chat_prompts(["good"], model, system="be nice")
    assert with_sys == ["system : be nice .<s>user : good .<s>assistant :"]
    # a bare tokenizer: this template's BOS also separates turns, so it is markup and stays
    assert chat_prompts(["good"], model.tokenizer) == ["<s>user : good .<s>assistant :"]
    model.cfg.default_prepend_bos = False  # a model whose tokenization adds no BOS: keep it
    assert chat_prompts(["good"], model) == ["<s>user : good .<s>assistant :"]
    model.cfg.default_prepend_bos = True
    task = Task("toy", TASKS["sst2"], LabelledPrompts(POS + NEG, [1] * 10 + [0] * 10))
    sp = task.split_chat(model, 4, 3, 3, seed=0)
    assert all(t.endswith("assistant :") for t in sp.operating.texts)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every chat prompt ends in "assistant :" (documented)
        Surrogate.fit(model, sp, d=4)


def test_chat_without_template():
    with pytest.raises(InputError, match="no chat template"):
        chat_prompts(["x"], None)


def test_prompting_baseline_through_the_chat_template():
    """steer-eval's `prompt` strategy on an instruct model: the instruction is a user turn and
    the stem opens the assistant's answer; on a base model it is a plain prefix."""
    from steerlin.steer_eval import instructed

    model = with_tokenizer(make_gemma_like(seed=2))
    got = instructed(model, "be good .\n\n", ["the film", "a day"], chat=True)
    head = "user : be good . .<s>assistant :"  # the toy template closes each turn with " ."
    assert got == [head + "the film", head + "a day"]
    assert instructed(model, "be good . ", ["the film"]) == ["be good . the film"]
    with pytest.raises(InputError, match="no chat template"):
        instructed(make_gemma_like(seed=2), "x", ["y"], chat=True)
