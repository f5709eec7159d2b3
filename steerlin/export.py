"""Export a steering schedule to other runtimes: llama.cpp control vectors (GGUF)."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError, LayerError


def write_llama_cpp(schedule, path, *, model_hint: str | None = None) -> Path:
    """Write `schedule` as a llama.cpp control-vector GGUF (`llama-cli --control-vector FILE`).

    llama.cpp adds `direction.<n>` to the OUTPUT of layer n (0-based; n >= 1). steerlin
    injects at resid_pre of block l, which is the output of layer l - 1, so block l's vector
    is written as `direction.<l-1>`. Blocks 0 and 1 have no llama.cpp equivalent (block 0's
    input is the embedding, and llama.cpp rejects direction.0): a non-zero injection there
    raises an error; restrict the controller with `layers=range(2, L)` first. llama.cpp
    also steers every position, prompt included, not only generated tokens.
    """
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is in the default install
        raise InputError("to_llama_cpp needs the `gguf` package: pip install gguf") from exc
    vec = schedule.vectors.to(torch.float32)
    bad = [layer for layer in schedule.layers if layer < 2]
    if bad:
        raise LayerError(
            f"to_llama_cpp: injections at blocks {bad} cannot be expressed as llama.cpp "
            "control vectors (it steers layer outputs 1..L-1 = block inputs 2..L-1); use "
            "Controller(..., layers=range(2, L))"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hint = model_hint or _llama_arch(schedule.meta.get("model_name", ""))
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", schedule.n_layers - 1)
    for layer in range(2, schedule.n_layers):
        writer.add_tensor(f"direction.{layer - 1}", vec[layer].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama_arch(model_name: str) -> str:
    name = model_name.lower()
    for key, arch in (
        ("gemma-3", "gemma3"),
        ("gemma", "gemma"),
        ("gpt2", "gpt2"),
        ("llama", "llama"),
        ("smollm", "llama"),
        ("qwen", "qwen2"),
    ):
        if key in name:
            return arch
    return name or "unknown"


__all__ = ["write_llama_cpp"]
