"""Shared fixtures: tiny seeded random HookedTransformers (nothing downloaded), the offline
Gemma-3-270m (module-cached), the real data folder, and a guard that no hook is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from steerlin.hooks import count_hooks

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_MODELS: list[HookedTransformer] = []


def make_gpt2_like(dtype=torch.float64, seed: int = 0, n_layers: int = 3) -> HookedTransformer:
    """LayerNorm, learned absolute positions, MHA: GPT-2's shape at toy size."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        n_ctx=64,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=97,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        dtype=dtype,
        seed=seed,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    _init(model, seed)
    return model


def make_gemma_like(dtype=torch.float64, seed: int = 1, n_layers: int = 4) -> HookedTransformer:
    """RMSNorm pre+post, rotary, q/k norm, GQA, gated MLP, local/global layers, soft caps."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        n_ctx=64,
        d_head=8,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=48,
        d_vocab=101,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        rotary_base=10000,
        rotary_base_local=1000,
        gated_mlp=True,
        final_rms=True,
        use_normalization_before_and_after=True,
        use_qk_norm=True,
        use_local_attn=True,
        window_size=6,
        attn_types=(["local", "global"] * n_layers)[:n_layers],
        attn_scores_soft_cap=50.0,
        output_logits_soft_cap=30.0,
        use_attn_scale=True,
        dtype=dtype,
        seed=seed,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    _init(model, seed)
    return model


def _init(model: HookedTransformer, seed: int) -> None:
    """Larger-than-default random weights so the maps are visibly non-linear; eval, no grads."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
            elif "ln" in name or "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.eval()
    model.requires_grad_(False)
    _MODELS.append(model)


def random_prompts(model: HookedTransformer, n: int, lo: int = 3, hi: int = 12, seed: int = 0):
    """n token-id prompts of mixed lengths lo..hi."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, model.cfg.d_vocab, (k,), generator=g).tolist() for k in lens]


# Module-scoped: a test must not mutate these models (the autouse fixture below checks and removes
# hooks after every test; a test that needs to change a model builds its own with make_*), and
# building them once per module instead of once per test keeps the suite fast.
@pytest.fixture(scope="module", params=["gpt2_like", "gemma_like"])
def tiny(request) -> HookedTransformer:
    """Each tiny model in float64."""
    return make_gpt2_like() if request.param == "gpt2_like" else make_gemma_like()


@pytest.fixture(scope="module")
def gpt2_like() -> HookedTransformer:
    return make_gpt2_like()


@pytest.fixture(scope="module")
def gemma_like() -> HookedTransformer:
    return make_gemma_like()


@pytest.fixture(scope="session")
def gemma() -> HookedTransformer:
    """The offline Gemma-3-270m, loaded once per test session from the steerlin cache."""
    from steerlin.models import load_model

    model = load_model("gemma-3-270m", cache_dir=os.environ.get("STEERLIN_CACHE"))
    _MODELS.append(model)
    return model


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def no_hooks_left_behind():
    """Every test must leave every model it touched without hooks."""
    yield
    leaks = {m.cfg.model_name: count_hooks(m) for m in _MODELS if count_hooks(m)}
    for m in _MODELS:
        m.reset_hooks(including_permanent=True)
    assert not leaks, f"hooks left on models: {leaks}"
