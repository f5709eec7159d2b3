"""A model the user passes in is never changed: `load_model(model)` and every entry point leave
its training flag, gradient flags, tokenizer (pad token, padding side), parameters and hooks
exactly as they were, and results do not depend on those flags."""

from __future__ import annotations

import torch
from _wordtok import with_tokenizer
from conftest import make_gemma_like, random_prompts

from steerlin import ConceptDirections, Controller, Surrogate, load_model
from steerlin.backend import count_hooks
from steerlin.gains import exact_gains, scan_gains
from steerlin.verify import calibrate


def _state(model):
    tok = model.tokenizer
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "pad": None if tok is None else (tok.pad_token, tok.padding_side),
        "hooks": count_hooks(model),
        "cfg": dict(vars(model.cfg)),
    }


def _assert_same(a, b):
    assert a["training"] == b["training"]
    assert a["requires_grad"] == b["requires_grad"]
    assert a["pad"] == b["pad"] and a["hooks"] == b["hooks"] == 0
    assert a["cfg"].keys() == b["cfg"].keys()
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k


def test_load_model_and_a_whole_run_leave_a_user_model_alone():
    model = with_tokenizer(make_gemma_like(seed=7))
    model.train()
    model.requires_grad_(True)
    model.tokenizer.pad_token = None  # a tokenizer without a pad token
    model.tokenizer.padding_side = "left"
    before = _state(model)
    assert load_model(model) is model
    _assert_same(before, _state(model))
    prompts = random_prompts(model, 8, seed=1)
    dirs = ConceptDirections.fit(model, prompts, [0, 1] * 4)
    sur = Surrogate.fit(model, prompts, dirs, d=4)
    assert not any(t.requires_grad for t in (sur.P, sur.A, sur.B, sur.c, sur.gains))
    scan_gains(model, prompts, dirs)
    exact_gains(model, prompts, dirs)
    sched = Controller(sur, target=0.5).schedule
    calibrate(model, prompts, sched, 0.5)
    tokens = torch.tensor([[1, 2, 3]])
    with sched.apply(model):  # (TransformerLens itself needs a pad token for a mask-less call)
        model(tokens, attention_mask=torch.ones_like(tokens))
    _assert_same(before, _state(model))

    # and the flags do not change the numbers: an eval/no-grad twin gives the same surrogate
    twin = make_gemma_like(seed=7)
    twin.load_state_dict(model.state_dict())
    ref = Surrogate.fit(twin, prompts, ConceptDirections.fit(twin, prompts, [0, 1] * 4), d=4)
    torch.testing.assert_close(sur.gains, ref.gains, rtol=1e-12, atol=0)
