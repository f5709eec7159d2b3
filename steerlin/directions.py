"""Concept directions from class means, and steerlin's norm-relative injection unit."""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from .backend import Model, check_model
from .errors import FileFormatError, InputError, NonFiniteError, ShapeError
from .io import (
    ANY_FLOAT_DTYPES,
    check_model_meta,
    check_tensor,
    check_unexpected,
    load_tensors,
    meta_int,
    model_meta,
    save_tensors,
)
from .tokens import PromptsLike
from .trajectory import Trajectory, capture
from .validate import check_int


def check_labels(labels, n: int) -> torch.Tensor:
    """Validate binary labels for n prompts: length n, values 0/1, both classes present."""
    if labels is None or isinstance(labels, str | bytes):
        raise InputError(f"labels: expected a list of 0/1 labels, one per prompt, got {labels!r}")
    if not isinstance(labels, torch.Tensor):
        try:
            labels = list(labels)
        except TypeError:
            raise InputError(
                f"labels: expected a list of 0/1 labels, got {type(labels).__name__}"
            ) from None
        for i, v in enumerate(labels):
            v = v.item() if isinstance(v, torch.Tensor | np.generic) and v.ndim == 0 else v
            if isinstance(v, str) or not isinstance(v, numbers.Real):
                raise InputError(
                    f"labels[{i}]: expected a 0/1 label, got {v!r} ({type(v).__name__}); map "
                    "class names to 0/1 (label_names= keeps the names)"
                )
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"labels: expected a flat list of 0/1 labels ({exc})") from None
    if labels.is_complex():
        raise InputError(f"labels: expected 0/1 labels, got a {labels.dtype} tensor")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ShapeError(f"labels: expected {n} labels (one per prompt), got {tuple(labels.shape)}")
    uniq = set(labels.tolist())
    if not uniq <= {0, 1}:
        raise InputError(f"labels: expected 0/1 labels, got values {sorted(uniq)}")
    if len(uniq) < 2:
        raise InputError(
            f"labels: need prompts of both classes (0 and 1) to form a direction, got only "
            f"class {uniq.pop() if uniq else 'none'}"
        )
    return labels.long()


@dataclass(frozen=True)
class ConceptDirections:
    """Class-mean concept directions and per-layer injection units, for layers 0..L.

    v_l = mean(x_l | label 1) - mean(x_l | label 0);  unit_l = v_l / ‖v_l‖;
    scale_l = mean ‖x_l‖ over the fitting prompts.

    An injection of amplitude u at layer l adds `u * scale_l * unit_l` to x_l: u = 0.1 is 10%
    of a typical residual norm there (Gemma-3-270m's mean ‖x_l‖ grows from ~26 at x_0 to ~37,000
    at x_L on the demo task's prompts).

    Sign convention: + is label 1 (v_l points from the class-0 mean to the class-1 mean);
    `meta["label_names"]` = [name of label 0, name of label 1].

    Attributes:
        vectors: Float[L+1, H] the raw class-mean differences.
        unit: Float[L+1, H] unit vectors (zero where v_l = 0).
        scale: Float[L+1] mean residual norms.
        meta: model identity and fitting info.
        logit_means: Float[2, V] the class means (label 0, label 1) of the next-token logits at
            the last token, for the logit readout's class separation (None when fitted from
            states without a model).
    """

    vectors: Float[torch.Tensor, "Lp1 H"]
    unit: Float[torch.Tensor, "Lp1 H"]
    scale: Float[torch.Tensor, " Lp1"]
    meta: dict[str, Any]
    logit_means: Float[torch.Tensor, "2 V"] | None = None

    @classmethod
    def fit(
        cls,
        model: Model,
        prompts: PromptsLike | Trajectory,
        labels: Sequence[int] | torch.Tensor,
        *,
        label_names: Sequence[str] | None = None,
        batch_size: int = 16,
        progress: bool | None = None,
    ) -> ConceptDirections:
        """Fit directions on labelled prompts (or on an already captured Trajectory).

        label_names: (name of label 0, name of label 1), e.g. a task's class_names; stored
        and printed with targets ("+" is label 1).
        progress: a capture progress bar; None (default): when stderr is a terminal and there
        are more than 48 prompts.
        """
        from .fit_inputs import auto_progress

        check_model(model)
        batch_size = check_int("batch_size", batch_size, min=1)
        if label_names is not None and (
            isinstance(label_names, str) or not isinstance(label_names, Sequence)
        ):
            raise InputError(
                f"label_names: expected (name of label 0, name of label 1), got {label_names!r}"
            )
        if isinstance(prompts, Trajectory):
            traj = prompts
        else:
            if not isinstance(prompts, torch.Tensor | Sequence):
                raise InputError(
                    f"prompts: expected a list of prompts, got {type(prompts).__name__}"
                )
            if not isinstance(prompts, torch.Tensor) and len(prompts) == 0:
                raise InputError("prompts: expected at least one prompt, got an empty list")
            check_labels(labels, len(prompts))
            progress = auto_progress(progress, prompts)
            traj = capture(model, prompts, batch_size=batch_size, progress=progress)
        y = check_labels(labels, len(traj))
        meta = model_meta(model)
        if label_names is not None:
            names = [str(n) for n in label_names]
            if len(names) != 2:
                raise InputError(f"label_names: expected (label 0, label 1), got {label_names!r}")
            meta["label_names"] = names
        out = cls.from_states(traj.states, y, meta=meta)
        return dataclasses.replace(out, logit_means=_logit_means(model, traj.states[:, -1], y))

    @classmethod
    def from_states(
        cls, states: Float[torch.Tensor, "n Lp1 H"], labels, *, meta: dict | None = None
    ) -> ConceptDirections:
        """Directions from captured states [n, L+1, H] and 0/1 labels."""
        if not isinstance(states, torch.Tensor) or not states.is_floating_point():
            raise InputError(
                f"states: expected a float tensor [n, L+1, H], got {type(states).__name__}"
            )
        if states.ndim != 3:
            raise ShapeError(f"states: expected shape [n, L+1, H], got {tuple(states.shape)}")
        y = check_labels(labels, states.shape[0])
        x = states
        bad = ~torch.isfinite(x).reshape(x.shape[0], x.shape[1], -1).all(-1).all(0)
        if bad.any():
            raise NonFiniteError(
                f"states: non-finite residual states at layers {bad.nonzero().flatten().tolist()}"
            )
        vectors = x[y == 1].mean(0) - x[y == 0].mean(0)
        norms = vectors.norm(dim=-1, keepdim=True)
        zero = norms.squeeze(-1) <= 1e-12 * x.norm(dim=-1).mean(0).clamp_min(1e-30)
        if zero.any():
            warnings.warn(
                f"concept direction is zero at layers {zero.nonzero().flatten().tolist()}: the "
                "classes have identical mean states there (e.g. every prompt ends in the same "
                "token, so x_0 is identical); injections at those layers do nothing",
                UserWarning,
            )
        safe = vectors / norms.clamp_min(1e-30)
        unit = torch.where(zero[:, None], torch.zeros_like(vectors), safe)
        scale = x.norm(dim=-1).mean(0)
        meta = dict(meta or {})
        meta.setdefault("label_names", ["label 0", "label 1"])
        meta.update(n_prompts=int(x.shape[0]), n_pos=int((y == 1).sum()), n_neg=int((y == 0).sum()))
        return cls(vectors=vectors, unit=unit, scale=scale, meta=meta)

    @classmethod
    def from_vectors(
        cls,
        model: Model,
        vectors: Any,
        prompts: PromptsLike | Trajectory,
        *,
        index: str = "resid_pre",
        batch_size: int = 16,
        progress: bool = False,
    ) -> ConceptDirections:
        """Directions you already have, with injection scales from a capture over `prompts`.

        `vectors`: a tensor Float[L+1, H] (x_0..x_L) or Float[H] (the same at every layer), a
        dict {layer: Float[H]}, a steering-vectors `SteeringVector`, a repeng `ControlVector`
        or a path to a llama.cpp/repeng control-vector `.gguf` (see `steerlin.interop` for
        the layer conventions: their index n is the OUTPUT of block n, steerlin's x_{n+1}).
        Layers without a vector take the nearest given layer's (ties: the later one), so one
        vector means one direction everywhere. `index="block_output"` reads a plain dict's
        keys in the other tools' convention.

        scale_l = mean ‖x_l‖ over `prompts` (any prompts that look like the ones you will
        steer; no labels needed). The concept readout of a surrogate fitted on these
        directions is ⟨unit_L, x_L⟩ along the (given or nearest) final direction.
        """
        from .interop import fill_nearest, to_steerlin_layers

        check_model(model)
        if isinstance(vectors, ConceptDirections):
            vectors.check_for(model)
            given, source = dict(enumerate(vectors.vectors)), "ConceptDirections"
        else:
            L, H = model.cfg.n_layers, model.cfg.d_model
            given, source = to_steerlin_layers(vectors, L, H, index=index)
        v = fill_nearest(given, model.cfg.n_layers + 1)
        if isinstance(prompts, Trajectory):
            traj = prompts
        else:
            if not isinstance(prompts, torch.Tensor) and len(prompts) == 0:
                raise InputError("prompts: expected at least one prompt for the scales, got none")
            traj = capture(model, prompts, batch_size=batch_size, progress=progress)
        norms = v.norm(dim=-1)
        zero = norms == 0
        if zero.any():
            raise InputError(
                f"directions: zero vector at layers {zero.nonzero().flatten().tolist()}"
            )
        unit = (v / norms[:, None]).to(model.cfg.dtype)
        scale = traj.states.norm(dim=-1).mean(0).to(model.cfg.dtype)
        meta = model_meta(model) | {
            "source": source,
            "given_layers": sorted(given),
            "n_prompts": len(traj),
        }
        return cls(vectors=v.to(model.cfg.dtype), unit=unit, scale=scale, meta=meta)

    @classmethod
    def from_gguf(
        cls, model: Model, path, prompts: PromptsLike | Trajectory, **kwargs
    ) -> ConceptDirections:
        """Directions from a llama.cpp/repeng control-vector GGUF: `direction.N` is added to the
        output of layer N, i.e. steerlin's x_{N+1} (see `steerlin.interop`)."""
        from .interop import is_gguf_path

        if not is_gguf_path(path):
            raise InputError(f"path: expected a .gguf file, got {str(path)!r}")
        return cls.from_vectors(model, path, prompts, **kwargs)

    @property
    def n_layers(self) -> int:
        return self.unit.shape[0] - 1

    @property
    def d_model(self) -> int:
        return self.unit.shape[1]

    def injection(self, layer: int) -> Float[torch.Tensor, " H"]:
        """b_l = scale_l * unit_l, the vector added per unit amplitude at layer l."""
        return self.scale[layer] * self.unit[layer]

    @property
    def b(self) -> Float[torch.Tensor, "Lp1 H"]:
        """All injection vectors b_l = scale_l * unit_l, stacked."""
        return self.scale[:, None] * self.unit

    def to(self, dtype=None, device=None) -> ConceptDirections:
        """A copy in another dtype/device."""
        conv = lambda t: t.to(dtype=dtype or t.dtype, device=device or t.device)
        lm = None if self.logit_means is None else conv(self.logit_means)
        return ConceptDirections(
            conv(self.vectors), conv(self.unit), conv(self.scale), self.meta, lm
        )

    def separation(self, readout) -> float | None:
        """One class separation of `readout` on the fitting (concept) split: mean readout of
        label 1 minus label 0. Concept readout <d, x_L>: <d, v_L> (exact, linear). Logit
        readout: from the stored class-mean logits (None if they were not stored)."""
        if readout.kind == "concept":
            d = readout.direction.to(torch.float64)
            return float(d @ self.vectors[-1].to(torch.float64))
        if self.logit_means is None:
            return None
        lm = self.logit_means.to(torch.float64)
        pos, neg = readout.pos_token, readout.neg_token
        return float((lm[1, pos] - lm[1, neg]) - (lm[0, pos] - lm[0, neg]))

    @property
    def label_names(self) -> list[str]:
        """[name of label 0 (−), name of label 1 (+)]."""
        return list(self.meta.get("label_names", ["label 0", "label 1"]))

    def save(self, path) -> None:
        tensors = {"vectors": self.vectors, "unit": self.unit, "scale": self.scale}
        if self.logit_means is not None:
            tensors["logit_means"] = self.logit_means
        save_tensors(path, "ConceptDirections", tensors, self.meta)

    @classmethod
    def load(
        cls, path, model: Model | None = None, *, allow_other_model: bool = False
    ) -> ConceptDirections:
        """Load; every tensor's shape, dtype and finiteness is checked against the metadata.

        With `model`, refuse a file fitted on a model of another shape, or on another model
        of the same shape (weight fingerprint; `allow_other_model=True` to use it anyway).
        """
        if model is not None:
            check_model(model)
        t, meta = load_tensors(path, "ConceptDirections")
        base = {"vectors", "unit", "scale"}
        if not base <= set(t):
            raise FileFormatError(
                f"{str(path)!r}: ConceptDirections file lacks tensors {sorted(base - set(t))}"
            )
        check_unexpected(path, "ConceptDirections", t, base | {"logit_means"})
        if model is not None:
            check_model_meta(meta, model, path, allow_other_model=allow_other_model)
        L = meta_int(meta, "n_layers", path, min=1)
        H = meta_int(meta, "d_model", path, min=1)
        unit = t["unit"]
        check_tensor(path, "unit", unit, (None, None), dtypes=ANY_FLOAT_DTYPES)
        Lp1 = unit.shape[0] if L is None else L + 1
        H = unit.shape[1] if H is None else H
        for name in ("vectors", "unit"):
            check_tensor(path, name, t[name], (Lp1, H), dtypes=ANY_FLOAT_DTYPES)
        check_tensor(path, "scale", t["scale"], (Lp1,), dtypes=ANY_FLOAT_DTYPES)
        if "logit_means" in t:
            check_tensor(path, "logit_means", t["logit_means"], (2, None), dtypes=ANY_FLOAT_DTYPES)
        names = meta.get("label_names")
        if names is not None and not (
            isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) for n in names)
        ):
            raise FileFormatError(
                f"{str(path)!r}: metadata 'label_names' should be two strings, got {names!r}"
            )
        if model is not None:
            check_model_meta({"n_layers": Lp1 - 1, "d_model": H}, model.cfg, path)
        return cls(
            vectors=t["vectors"],
            unit=t["unit"],
            scale=t["scale"],
            meta=meta,
            logit_means=t.get("logit_means"),
        )

    def check_for(self, model: Model) -> None:
        """Raise ShapeError unless these directions fit `model` (L+1 layers, d_model)."""
        L, H = model.cfg.n_layers, model.cfg.d_model
        if self.unit.shape != (L + 1, H):
            raise ShapeError(
                f"directions: expected unit of shape [{L + 1}, {H}] for this model, got "
                f"{tuple(self.unit.shape)}"
            )
        for name, t in (("unit", self.unit), ("scale", self.scale)):
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(-1)
            if bad.any():
                where = bad.nonzero().flatten().tolist()
                raise NonFiniteError(f"directions.{name}: non-finite values at layers {where}")


def _logit_means(model, xL: torch.Tensor, y: torch.Tensor, chunk: int = 16):
    """Class means [2, V] of the next-token logits from the final states (chunked), or None
    if the model has no unembedding."""
    if not hasattr(model, "unembed"):
        return None
    from .readouts import full_logits

    V = model.cfg.d_vocab_out if getattr(model.cfg, "d_vocab_out", -1) > 0 else model.cfg.d_vocab
    # states and labels stay on the CPU (`capture` keeps them there); each chunk goes to the
    # model's device for the unembedding and its logits come back to the CPU float64 sums
    dev = model.cfg.device
    sums = torch.zeros(2, V, dtype=torch.float64, device="cpu")
    y = y.to("cpu")
    with torch.no_grad():
        for s in range(0, xL.shape[0], chunk):
            x = xL[s : s + chunk].to(device=dev, dtype=model.cfg.dtype)
            z = full_logits(model, x).to(device="cpu", dtype=torch.float64)
            yy = y[s : s + chunk]
            sums[0] += z[yy == 0].sum(0)
            sums[1] += z[yy == 1].sum(0)
    counts = torch.stack([(y == 0).sum(), (y == 1).sum()]).to(torch.float64)
    return (sums / counts[:, None]).to(torch.float32)


__all__ = ["ConceptDirections", "check_labels"]
