"""Helpers shared by the loaders: eval-mode finalising, the unembedding layout, dtype checks,
quiet TransformerLens construction, messages, and reading a saved tokenizer."""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import FileFormatError, InputError

DEFAULT_MODEL = "gemma-3-270m"


def _finalize(model: Any) -> Any:
    """Eval mode, no parameter gradients, and a pad token (steerlin pads batches itself)."""
    model.eval()
    model.requires_grad_(False)
    tok = model.tokenizer
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.bos_token
    return model


def _store_transposed(module: Any, name: str, keep_values: bool) -> None:
    """Replace parameter `name` of `module` by the same values (shape, name) stored transposed
    in memory, so `F.linear(x, W.T.contiguous())` takes `W.T` as it is instead of copying it."""
    w = getattr(module, name, None)
    if isinstance(w, torch.nn.Parameter) and w.ndim == 2 and not w.T.is_contiguous():
        with torch.no_grad():
            if keep_values:
                t = w.detach().T.contiguous()
            else:
                t = torch.empty(w.shape[::-1], dtype=w.dtype, device=w.device)
            setattr(module, name, torch.nn.Parameter(t.T, requires_grad=w.requires_grad))


def _unembed_layout(model: Any, keep_values: bool = True) -> Any:
    """Store the weights TransformerLens 3 multiplies as `F.linear(x, W.T.contiguous())`
    transposed in memory (same values, shapes and names), so no forward copies them: W_U (670 MB
    for Gemma's 262k vocabulary, on every generated token) and a gated MLP's W_gate, W_in and
    W_out (`GatedMLP`: Llama, Gemma, Mistral, Qwen...; 56% of plain generation time at 135M).
    The products are bit-identical: `.contiguous()` of an already contiguous `W.T` is `W.T`.
    Only models steerlin loads itself get this layout (a user's model is never changed)."""
    _store_transposed(getattr(model, "unembed", None), "W_U", keep_values)
    for block in getattr(model, "blocks", ()):
        mlp = getattr(block, "mlp", None)
        if type(mlp).__name__ == "GatedMLP":  # its forward takes W.T.contiguous() of all three
            for name in ("W_gate", "W_in", "W_out"):
                _store_transposed(mlp, name, keep_values)
    return model


def _check_dtype(dtype: Any) -> torch.dtype:
    """Accept a floating torch.dtype or its name ("float64"); reject anything else."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(
            f"dtype: expected a floating torch.dtype such as torch.float32, got {dtype!r}"
        )
    return dtype


@contextmanager
def _quiet_tl():
    """Hide TransformerLens' deprecation notice for HookedTransformer, which steerlin builds on."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*HookedTransformer.*deprecated", category=DeprecationWarning
        )
        yield


def _say(msg: str) -> None:
    print(f"steerlin: {msg}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"


def _read_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise FileFormatError(f"missing the {path.name}/ folder")
    try:
        # add_bos_token=True is what TransformerLens' set_tokenizer would otherwise reload for.
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, add_bos_token=True)
    except Exception as exc:  # transformers raises many types for a broken tokenizer folder
        raise FileFormatError(f"cannot load the tokenizer: {_first_line(exc)}") from exc
