"""Tiny seeded random Hugging Face causal LMs (built from a config, nothing downloaded), one
per architecture the bridge backend supports, and their TransformerLens wrapping for whichever
line is installed: a TransformerBridge (TransformerLens 4) or a HookedTransformer converted from
the same weights (TransformerLens 3). Both legs then run on identical weights, which is what
the cross-backend reference numbers (tests/data/bridge_reference.json) compare."""

from __future__ import annotations

import tempfile
import warnings

import torch
from _wordtok import word_tokenizer

ARCHS = ("gpt2", "llama", "gemma3")
#: The architecture matrix (tests/test_arch_matrix.py): ARCHS plus seven more families, each
#: with the feature that sets it apart (docs/support.md)
FAMILIES = ARCHS + ("pythia", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma2")
#: family -> (Hugging Face architecture, the features its tiny model exercises)
FEATURES = {
    "gpt2": ("GPT2LMHeadModel", "LayerNorm, learned absolute positions"),
    "llama": ("LlamaForCausalLM", "RMSNorm, rotary, grouped-query attention"),
    "gemma3": ("Gemma3ForCausalLM", "q/k-norm, pre+post norms, local/global, logit soft-cap"),
    "pythia": ("GPTNeoXForCausalLM", "parallel attention + MLP, partial rotary (1/4)"),
    "mistral": ("MistralForCausalLM", "sliding window on every layer"),
    "qwen2": ("Qwen2ForCausalLM", "q/k/v biases"),
    "qwen3": ("Qwen3ForCausalLM", "per-head q/k-norm"),
    "phi3": ("Phi3ForCausalLM", "fused qkv and gate-up projections"),
    "olmo2": ("Olmo2ForCausalLM", "full-width q/k-norm, norms after attention and MLP"),
    "gemma2": ("Gemma2ForCausalLM", "attention + final soft-caps, local/global"),
}
#: families whose RMSNorm scales by (1 + w)
_ONE_PLUS_W = ("gemma3", "gemma2")


def hf_config(arch: str, n_layers: int | None = None):
    """The tiny config of `arch` (shapes like the TL3 tiny models of conftest)."""
    cfg = _hf_config(arch)
    if n_layers is not None:
        cfg.num_hidden_layers = n_layers
        if arch in ("gemma3", "gemma2"):
            cfg.layer_types = (["sliding_attention", "full_attention"] * n_layers)[:n_layers]
    return cfg


def _hf_config(arch: str):
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=97,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=64,
            n_ctx=64,
            activation_function="gelu_new",
            architectures=["GPT2LMHeadModel"],
        )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"],
        )
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            vocab_size=101,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=6,
            max_position_embeddings=64,
            layer_types=["sliding_attention", "full_attention"] * 2,
            attn_logit_softcapping=None,  # as Gemma 3 (HF ignores it; the bridge would not)
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=8,
            architectures=["Gemma3ForCausalLM"],
        )
    return _more_configs(arch)


_SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def _more_configs(arch: str):
    """The seven families beyond GPT-2, Llama and Gemma-3 (transformers' own config classes)."""
    import transformers as tf

    if arch == "pythia":
        return tf.GPTNeoXConfig(
            **(_SMALL | dict(intermediate_size=64)),
            hidden_act="gelu",
            rotary_pct=0.25,
            use_parallel_residual=True,
            architectures=["GPTNeoXForCausalLM"],
        )
    if arch == "mistral":
        return tf.MistralConfig(
            **_SMALL,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=6,
            architectures=["MistralForCausalLM"],
        )
    if arch == "qwen2":
        return tf.Qwen2Config(**_SMALL, num_key_value_heads=2, architectures=["Qwen2ForCausalLM"])
    if arch == "qwen3":
        return tf.Qwen3Config(
            **_SMALL, num_key_value_heads=2, head_dim=8, architectures=["Qwen3ForCausalLM"]
        )
    if arch == "phi3":
        return tf.Phi3Config(
            **_SMALL,
            num_key_value_heads=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            architectures=["Phi3ForCausalLM"],
        )
    if arch == "olmo2":
        return tf.Olmo2Config(
            **_SMALL,
            num_key_value_heads=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            architectures=["Olmo2ForCausalLM"],
        )
    if arch == "gemma2":
        return tf.Gemma2Config(
            **(_SMALL | dict(vocab_size=101, num_hidden_layers=4)),
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"] * 2,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=8,
            architectures=["Gemma2ForCausalLM"],
        )
    raise ValueError(arch)


def hf_model(arch: str, dtype=torch.float64, seed: int = 0, n_layers: int | None = None):
    """The tiny HF model of `arch` with seeded weights (set explicitly, parameter by parameter
    in name order, so they do not depend on the transformers version's initialisation)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(arch, n_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "norm" in name or "ln" in name:
                # Gemma's RMSNorm scales by (1 + w), the others by w
                base = 0.0 if arch in _ONE_PLUS_W else 1.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    return model


def tokenizer_for(arch: str):
    return word_tokenizer(hf_config(arch).vocab_size)


def wrap(arch: str, dtype=torch.float64, seed: int = 0, n_layers: int | None = None):
    """The tiny model as the installed TransformerLens line's model (eval, no grads)."""
    from steerlin.backend.common import tl_major

    hf = hf_model(arch, dtype, seed, n_layers)
    tok = tokenizer_for(arch)
    if tl_major() >= 4:
        from steerlin.loading.bridge import boot

        model = boot(hf, tok, f"tiny-{arch}", "cpu", dtype)
    else:
        model = _hooked_from_hf(arch, hf, tok, dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _hooked_from_hf(arch: str, hf, tok, dtype):
    """TransformerLens 3's own conversion of the HF model (config from a local folder, no
    hub), without weight processing so both lines compute the same functions."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformer_lens.pretrained import weight_conversions as wc

    convert = {
        "gpt2": wc.convert_gpt2_weights,
        "llama": wc.convert_llama_weights,
        "gemma3": wc.convert_gemma_weights,
        "pythia": wc.convert_neox_weights,
        "mistral": wc.convert_mistral_weights,
        "qwen2": wc.convert_qwen2_weights,
        "qwen3": wc.convert_qwen3_weights,
        "phi3": wc.convert_phi3_weights,
        "olmo2": wc.convert_olmo2_weights,
        "gemma2": wc.convert_gemma_weights,
    }[arch]
    # TransformerLens 3 derives Gemma and OLMo-2 configs from the model name only: its entry
    # for the family's published models, at the tiny model's size
    named = {"gemma3": _gemma3_hooked_config, "gemma2": _gemma2_hooked_config}
    named["olmo2"] = _olmo2_hooked_config
    if arch in named:
        cfg = named[arch](hf.config, dtype)
    else:
        with tempfile.TemporaryDirectory(prefix="steerlin-tiny-") as tmp:
            hf.config.save_pretrained(tmp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = loading.get_pretrained_model_config(
                    tmp, fold_ln=False, device="cpu", dtype=dtype, default_prepend_bos=True
                )
    cfg.model_name = f"tiny-{arch}"
    state_dict = convert(hf, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tok, move_to_device=False, default_padding_side="right")
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model


def _gemma3_hooked_config(c, dtype):
    """TransformerLens 3's Gemma-3 config (as its google/gemma-3-270m entry) at `c`'s size."""
    from transformer_lens import HookedTransformerConfig

    rope = c.rope_parameters
    return HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=c.head_dim,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        rotary_base=rope["full_attention"]["rope_theta"],
        rotary_base_local=rope["sliding_attention"]["rope_theta"],
        positional_embedding_type="rotary",
        rotary_dim=c.head_dim,
        use_attn_scale=True,
        n_key_value_heads=c.num_key_value_heads,
        gated_mlp=True,
        final_rms=True,
        use_normalization_before_and_after=True,
        use_qk_norm=True,
        window_size=c.sliding_window,
        use_local_attn=True,
        attn_types=["local" if t == "sliding_attention" else "global" for t in c.layer_types],
        output_logits_soft_cap=c.final_logit_softcapping or -1.0,
        original_architecture="Gemma3ForCausalLM",
        default_prepend_bos=True,
        dtype=dtype,
        device="cpu",
    )


def _gemma2_hooked_config(c, dtype):
    """TransformerLens 3's Gemma-2 config (as its google/gemma-2-2b entry) at `c`'s size."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=c.head_dim,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        rotary_base=c.rope_parameters["rope_theta"],
        positional_embedding_type="rotary",
        use_attn_scale=True,
        n_key_value_heads=c.num_key_value_heads,
        window_size=c.sliding_window,
        use_local_attn=True,
        attn_types=["local" if t == "sliding_attention" else "global" for t in c.layer_types],
        attn_scores_soft_cap=c.attn_logit_softcapping,
        output_logits_soft_cap=c.final_logit_softcapping,
        gated_mlp=True,
        final_rms=True,
        use_normalization_before_and_after=True,
        original_architecture="Gemma2ForCausalLM",
        default_prepend_bos=True,
        dtype=dtype,
        device="cpu",
    )


def _olmo2_hooked_config(c, dtype):
    """TransformerLens 3's OLMo-2 config (as its allenai/OLMo-2-0425-1B entry) at `c`'s size."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn="silu",
        normalization_type="RMS",
        rotary_base=c.rope_parameters["rope_theta"],
        attn_types=["global"] * c.num_hidden_layers,
        positional_embedding_type="rotary",
        gated_mlp=True,
        original_architecture="Olmo2ForCausalLM",
        default_prepend_bos=True,
        dtype=dtype,
        device="cpu",
    )
