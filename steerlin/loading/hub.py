"""Models from the Hugging Face hub through `HookedTransformer.from_pretrained`, with offline and
unknown-name failures explained."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from typing import Any

import torch

from ..errors import ModelLoadError
from .common import DEFAULT_MODEL, _first_line, _quiet_tl


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the hub could not be reached" (whichever clients exist)."""
    errors: list[type[BaseException]] = [OSError]
    for module, names in [
        ("huggingface_hub.errors", ["OfflineModeIsEnabled", "HfHubHTTPError"]),
        ("requests.exceptions", ["RequestException"]),
        ("httpx", ["HTTPError"]),
        ("httpx2", ["HTTPError"]),
    ]:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(errors)


def _load_from_hub(name: str, device: str, dtype: torch.dtype) -> Any:
    """`HookedTransformer.from_pretrained` (TransformerLens 3) or
    `TransformerBridge.boot_transformers` (4), with offline and unknown-name failures explained."""
    from ..backend.common import tl_major

    try:
        with _quiet_tl():
            if tl_major() >= 4:
                from transformer_lens.model_bridge import TransformerBridge

                return TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
            from transformer_lens import HookedTransformer

            return HookedTransformer.from_pretrained(name, device=device, dtype=dtype)
    except _network_errors() as exc:
        cause = f"({type(exc).__name__}: {_first_line(exc)})"
        if type(exc).__name__ in ("GatedRepoError", "RepositoryNotFoundError"):
            raise ModelLoadError(
                f"could not load {name!r}: the Hugging Face hub refused access {cause}. If the "
                f"repo is gated, accept its licence on huggingface.co and log in with "
                f"`huggingface-cli login` (or set HF_TOKEN); or use the offline default "
                f"load_model({DEFAULT_MODEL!r})."
            ) from exc
        raise ModelLoadError(
            f"could not load {name!r}: the Hugging Face hub could not be reached and the model is "
            f"not in the local cache {cause}. Connect to the internet, pre-download it with "
            f"`huggingface-cli download <repo id>` (set HF_HOME if your cache lives elsewhere), "
            f"or use the offline default load_model({DEFAULT_MODEL!r})."
        ) from exc
    except ValueError as exc:
        if "not found" not in str(exc).lower():
            raise
        raise ModelLoadError(
            f"could not load {name!r}: it is not a TransformerLens official model name"
            f"{_suggest(name)}. Offline, use load_model({DEFAULT_MODEL!r})."
        ) from exc


def _suggest(name: str) -> str:
    """' (did you mean ...?)' from TransformerLens' official names and aliases, or ''."""
    try:
        from transformer_lens import loading_from_pretrained as loading

        known = list(loading.OFFICIAL_MODEL_NAMES) + [
            a for aliases in loading.MODEL_ALIASES.values() for a in aliases
        ]
    except (ImportError, AttributeError):
        return ""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
