"""Shared fixtures: tiny seeded random models (nothing downloaded), the offline Gemma-3-270m
(module-cached), the real data folder, and a guard that no hook is left behind.

With TransformerLens 3 the tiny models are HookedTransformers built from a config; with
TransformerLens 4 (the second CI leg) `make_gpt2_like`/`make_gemma_like` return
TransformerBridges over tiny Hugging Face GPT-2/Gemma-3 models of the same shapes
(tests/_hf_tiny.py), and tests marked `tl3` (they read HookedTransformer internals) skip."""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from jaxtyping import install_import_hook

# The TransformerLens line, read without importing steerlin (the import hook below must be
# installed first): 3.x HookedTransformer, 4.x TransformerBridge.
TL4 = int(version("transformer-lens").split(".")[0]) >= 4
if not TL4:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

# Runtime shape/type checking (jaxtyping + beartype), installed before steerlin is imported:
# always for steerlin.linalg (bases and reduced algebra on plain tensors) and
# steerlin.backend.fast (the single-query engine's tensors), whose shape annotations are the
# contract; for the whole package with STEERLIN_JAXTYPING=1, not yet the default there: the
# public boundaries' hints (Literal, HookedTransformer, Sequence) pre-empt steerlin's own
# argument errors that the bad-input tests check, and tests pass duck-typed test doubles.

install_import_hook(
    "steerlin"
    if os.environ.get("STEERLIN_JAXTYPING", "") not in ("", "0")
    else ("steerlin.linalg", "steerlin.backend.fast"),
    "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))",
)

from steerlin.backend import count_hooks  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_MODELS: list = []


def _bridge_like(arch: str, dtype, seed: int, n_layers: int):
    """TransformerLens 4: the tiny Hugging Face model as a bridge, without a tokenizer (as the
    TransformerLens 3 tiny models: prompts are token ids)."""
    from _hf_tiny import wrap

    model = wrap(arch, dtype=dtype, seed=seed, n_layers=n_layers)
    model.tokenizer = None
    _MODELS.append(model)
    return model


def make_gpt2_like(dtype=torch.float64, seed: int = 0, n_layers: int = 3):
    """LayerNorm, learned absolute positions, MHA: GPT-2's shape at toy size."""
    if TL4:
        return _bridge_like("gpt2", dtype, seed, n_layers)
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


def make_gemma_like(dtype=torch.float64, seed: int = 1, n_layers: int = 4):
    """RMSNorm pre+post, rotary, q/k norm, GQA, gated MLP, local/global layers, soft caps."""
    if TL4:
        return _bridge_like("gemma3", dtype, seed, n_layers)
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


def _init(model, seed: int) -> None:
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


def random_prompts(model, n: int, lo: int = 3, hi: int = 12, seed: int = 0):
    """n token-id prompts of mixed lengths lo..hi."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, model.cfg.d_vocab, (k,), generator=g).tolist() for k in lens]


# Module-scoped: a test must not mutate these models (the autouse fixture below checks and removes
# hooks after every test; a test that needs to change a model builds its own with make_*), and
# building them once per module instead of once per test keeps the suite fast.
@pytest.fixture(scope="module", params=["gpt2_like", "gemma_like"])
def tiny(request):
    """Each tiny model in float64."""
    return make_gpt2_like() if request.param == "gpt2_like" else make_gemma_like()


@pytest.fixture(scope="module")
def gpt2_like():
    return make_gpt2_like()


@pytest.fixture(scope="module")
def gemma_like():
    return make_gemma_like()


@pytest.fixture(scope="session")
def gemma():
    """The offline Gemma-3-270m, loaded once per test session from the steerlin cache."""
    from steerlin import load_model

    model = load_model("gemma-3-270m", cache_dir=os.environ.get("STEERLIN_CACHE"))
    _MODELS.append(model)
    return model


def in_ci() -> bool:
    """True under CI (the CI=true convention of GitHub Actions, GitLab and most runners)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_shared_data(folder: Path | None = None) -> Path:
    """The real data folder (``../shared/data`` next to the repository).

    Locally a missing folder skips the test with the reason; under CI (``CI=true``) it fails
    the test, so a CI run cannot go green with the data-dependent tests silently skipped.
    """
    folder = SHARED_DATA if folder is None else folder
    if folder.is_dir():
        return folder
    reason = f"real data folder {folder} (../shared/data next to the repository) not present"
    if in_ci():
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


_INTERNALS = "reads or rebuilds HookedTransformer internals (TransformerLens 3 leg)"
_FLOAT32 = (
    "needs float64-exact blocks; on the bridge Hugging Face's Gemma-3 RMSNorm and TL4's "
    "attention softmax compute in float32 (~1e-7 relative; tests/test_bridge.py states it)"
)
#: Tests skipped on the TransformerLens 4 leg (node-id prefix -> reason). Everything else of
#: the tiny suite runs on bridges over tiny Hugging Face GPT-2 / Gemma-3 models.
TL4_SKIPS = {
    "tests/test_hooks.py::test_hooks_removed_on_exception": _INTERNALS,
    "tests/test_hooks.py::test_from_counts_absolute_positions_through_the_cache": _INTERNALS,
    "tests/test_hooks.py::test_generated_without_a_cache_raises_and_cleans_up": (
        "a bridge's plain forward carries an (empty) Hugging Face cache, so 'generated' cannot "
        "tell it from a generation's first step"
    ),
    "tests/test_hooks.py::test_generate_cache_on_off_identical[3tok]": _FLOAT32,
    "tests/test_reliability.py::test_fault_leaves_no_hooks_and_an_unchanged_model[block-": (
        _INTERNALS + ": patches a block's forward"
    ),
    "tests/test_reliability.py::test_steering_after_an_interrupted_generation_is_unaffected": (
        _INTERNALS + ": patches a block's forward"
    ),
    "tests/test_reliability.py::test_nan_": _INTERNALS + ": patches a block's forward",
    "tests/test_reliability.py::test_random_basis_depends_on_the_seed": (
        _INTERNALS + ": patches a block's forward"
    ),
    "tests/test_directions.py::test_vectors_are_class_mean_difference[gemma_like]": _FLOAT32,
    "tests/test_evaluate.py::test_small_eps_scan_approximates_exact_gains[gemma_like": _FLOAT32,
    "tests/test_evaluate.py::test_exact_gains_last_layer_is_one_jvp[gemma_like]": _FLOAT32,
    "tests/test_jacobians.py::test_contexts_cover_prompts_and_states_match_capture[gemma": _FLOAT32,
    "tests/test_jacobians.py::test_perturbed_chain_equals_full_model_with_inject[gemma": _FLOAT32,
    "tests/test_jacobians.py::test_batch_composition_does_not_matter[gemma_like": _FLOAT32,
    "tests/test_jacobians.py::test_jvp_equals_dense_jacobian[gemma_like": _FLOAT32,
    "tests/test_jacobians.py::test_logit_readout_equals_full_forward_logits[gemma_like": _FLOAT32,
    "tests/test_jacobians.py::test_per_prompt_gains_vs_full_model_finite_differences"
    "[gemma_like": _FLOAT32,
    "tests/test_surrogate.py::test_one_prompt_full_basis_equals_exact_gains[gemma_like": _FLOAT32,
    "tests/test_surrogate.py::test_one_prompt_full_basis_logit_readout[gemma_like]": _FLOAT32,
    "tests/test_surrogate.py::test_per_prompt_variant_full_basis_equals_exact_mean[gemma": _FLOAT32,
    "tests/test_surrogate.py::test_zero_direction_at_layer_0_is_allowed[gemma_like]": _FLOAT32,
    "tests/test_trajectory.py::test_batch_size_does_not_matter[gemma_like]": _FLOAT32,
    "tests/test_reduction.py::test_paper_variant_at_full_reachable_order_equals_product": _FLOAT32,
    "tests/test_regime.py::test_generated_policy_matches_steered_generation[gemma_like": _FLOAT32,
}


#: Test files whose numbers depend on how float32 kernels round (the real Gemma in float32,
#: float32 tiny models, greedy tokens under steering, cross-backend references): marked
#: `numerics`, and `make test` runs them a second time with the BLAS pinned to AVX2, so each CI
#: machine exercises both kernel families (AVX2 and AVX-512/AMX round differently).
NUMERICS_FILES = {
    "test_bf16.py",
    "test_bridge.py",
    "test_directions.py",
    "test_engine.py",
    "test_evaluate.py",
    "test_gemma.py",
    "test_jacobians.py",
    "test_krylov.py",
    "test_regime.py",
    "test_steering.py",
    "test_surrogate.py",
    "test_trajectory.py",
}


def pytest_collection_modifyitems(config, items):
    """Mark the kernel-sensitive tests `numerics`; under TransformerLens 4, skip tests marked
    `tl3` and those listed in TL4_SKIPS."""
    for item in items:
        if item.path.name in NUMERICS_FILES:
            item.add_marker(pytest.mark.numerics)
    if not TL4:
        return
    for item in items:
        if "tl3" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=_INTERNALS))
            continue
        for prefix, reason in TL4_SKIPS.items():
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.skip(reason=reason))
                break


@pytest.fixture(autouse=True)
def no_hooks_left_behind():
    """Every test must leave every model it touched without hooks."""
    yield
    leaks = {getattr(m.cfg, "model_name", "?"): count_hooks(m) for m in _MODELS if count_hooks(m)}
    for m in _MODELS:
        m.reset_hooks(including_permanent=True)
    assert not leaks, f"hooks left on models: {leaks}"


def greedy_continuations(model, prompts, n):
    """Unsteered greedy continuations of token-id prompts (one at a time, no tokenizer), as the
    `steerlin.regime.Continuations` the regime functions take."""
    from steerlin.regime import Continuations

    new = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([p]),
                max_new_tokens=n,
                do_sample=False,
                stop_at_eos=False,
                verbose=False,
            )
        new.append(out[0, len(p) :])
    return Continuations(None, [list(p) for p in prompts], torch.stack(new), [""] * len(prompts))
