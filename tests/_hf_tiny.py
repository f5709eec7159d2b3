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


def hf_config(arch: str, n_layers: int | None = None):
    """The tiny config of `arch` (shapes like the TL3 tiny models of conftest)."""
    cfg = _hf_config(arch)
    if n_layers is not None:
        cfg.num_hidden_layers = n_layers
        if arch == "gemma3":
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
                base = 0.0 if arch == "gemma3" else 1.0
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
    }[arch]
    if arch == "gemma3":  # TransformerLens 3 derives Gemma-3 configs from the model name only
        cfg = _gemma3_hooked_config(hf.config, dtype)
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
