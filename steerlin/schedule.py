"""A steering schedule: per-layer amplitudes along per-layer directions, and its uses.

`Schedule` is what every strategy produces (the least-norm solve, the baselines, a llama.cpp
control vector read back): amplitudes u_l in norm-relative units, the vectors b_l u_l they add,
live hooks (`apply`, `hooks`), persistence and export. No TransformerLens import here: the
model is reached through `steerlin.hooks` only when a schedule is applied.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from .errors import FileFormatError, InputError, LayerError, ModelTypeError, ShapeError
from .export import write_llama_cpp
from .io import (
    check_model_meta,
    check_tensor,
    check_unexpected,
    load_tensors,
    meta_int,
    save_tensors,
)
from .validate import check_number

F64 = torch.float64


@dataclass(frozen=True)
class Schedule:
    """Per-layer injection amplitudes and the directions they inject along.

    The vector added to x_l is Σ_j amplitudes[j, l] · scale[j, l] · unit[j, l] (one concept:
    amplitudes[l] · scale[l] · unit[l]).

    Attributes:
        amplitudes: Float[L] (one concept) or Float[k, L], norm-relative units.
        unit: Float[L, H] or Float[k, L, H], unit concept directions at each block input.
        scale: Float[L] or Float[k, L], mean residual norms (the unit of amplitude).
        readout: Float[H] (or Float[k, H]) the concept readout direction(s) unit_L the target
            refers to, used by `calibrate`; None for a logit readout (see meta["readout"]).
        meta: strategy name, target, predicted shift, readout kind, model identity.
    """

    amplitudes: torch.Tensor
    unit: torch.Tensor
    scale: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    readout: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("amplitudes", "unit", "scale", "readout"):
            t = getattr(self, name)
            if name == "readout" and t is None:
                continue
            if not isinstance(t, torch.Tensor) or not (t.is_floating_point()):
                what = type(t).__name__ if not isinstance(t, torch.Tensor) else str(t.dtype)
                raise ModelTypeError(
                    f"Schedule: {name} must be a floating-point tensor, got {what}"
                )
        if not isinstance(self.meta, dict):
            raise ModelTypeError(f"Schedule: meta must be a dict, got {type(self.meta).__name__}")
        a, u, s = self.amplitudes, self.unit, self.scale
        ok = (a.ndim == 1 and u.ndim == 2 and s.ndim == 1) or (
            a.ndim == 2 and u.ndim == 3 and s.ndim == 2
        )
        if not ok or u.shape[:-1] != a.shape or s.shape != a.shape:
            raise ShapeError(
                f"Schedule: amplitudes {tuple(a.shape)}, unit {tuple(u.shape)} and scale "
                f"{tuple(s.shape)} do not match ([L], [L, H], [L]) or ([k, L], [k, L, H], [k, L])"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(u).all() and torch.isfinite(s).all()):
            raise InputError("Schedule: non-finite amplitudes, directions or scales")

    # ------------------------------------------------------------- derived numbers
    @property
    def n_layers(self) -> int:
        return self.amplitudes.shape[-1]

    @property
    def n_concepts(self) -> int:
        return 1 if self.amplitudes.ndim == 1 else self.amplitudes.shape[0]

    def _stack(self):
        a, u, s = self.amplitudes, self.unit, self.scale
        if a.ndim == 1:
            return a[None], u[None], s[None]
        return a, u, s

    @property
    def vectors(self) -> Float[torch.Tensor, "L H"]:
        """The raw vector added at each block input, Σ_j u_jl scale_jl unit_jl."""
        a, u, s = self._stack()
        return torch.einsum("kl,kl,klh->lh", a.to(F64), s.to(F64), u.to(F64))

    @property
    def energy(self) -> float:
        """Σ u_l² in norm-relative units: the headline, comparable across layers."""
        return float(self.amplitudes.to(F64).pow(2).sum())

    @property
    def raw_energy(self) -> float:
        """Σ_l ‖added vector at l‖² in raw residual units (dominated by late, huge layers)."""
        return float(self.vectors.pow(2).sum())

    @property
    def predicted_shift(self) -> float | list[float] | None:
        """Readout shift the surrogate predicted for this schedule (per concept if several)."""
        return self.meta.get("predicted_shift")

    @property
    def strategy(self) -> str:
        return self.meta.get("strategy", "custom")

    @property
    def layers(self) -> list[int]:
        """Layers with a non-zero injection."""
        a, _, _ = self._stack()
        return (a != 0).any(0).nonzero().flatten().tolist()

    def scaled(self, factor: float, **meta) -> Schedule:
        """The same schedule with every amplitude multiplied by `factor`."""
        factor = check_number("factor", factor)
        new_meta = dict(self.meta)
        ps = new_meta.get("predicted_shift")
        if ps is not None:
            new_meta["predicted_shift"] = (
                [p * factor for p in ps] if isinstance(ps, list) else ps * factor
            )
        new_meta.update(meta)
        return Schedule(self.amplitudes * factor, self.unit, self.scale, new_meta, self.readout)

    def additions(self) -> dict[int, torch.Tensor]:
        """layer -> vector for `steerlin.inject`, for the layers with a non-zero injection."""
        vec = self.vectors
        return {layer: vec[layer] for layer in self.layers}

    # ------------------------------------------------------------- on the model
    @contextmanager
    def apply(self, model, *, positions="last", lengths=None, allow_other_model: bool = False):
        """Context manager: this schedule as live hooks on `model` (`steerlin.inject`).

        Hooks are removed on exit and on any exception. `positions` as in `steerlin.inject`
        (default "last", the one default of every steering entry point): inside,
        `model.generate(...)` with its KV cache is steered at the last prompt token and every
        generated token; "generated" does the same and refuses forwards without a cache.

        A schedule made for another model of the same shape (its weight fingerprint differs)
        is refused unless `allow_other_model=True`.
        """
        from .hooks import check_model, inject

        check_model(model)
        self.check_for(model)
        self.check_identity(model, allow_other_model=allow_other_model)
        with inject(model, self._model_additions(model), positions=positions, lengths=lengths) as h:
            yield h

    def hooks(
        self, model, *, positions="last", lengths=None, allow_other_model: bool = False
    ) -> list:
        """`[(hook_name, fn)]` for `model.run_with_hooks(..., fwd_hooks=...)` or
        `with model.hooks(fwd_hooks=...)`: the same additions as `apply`, as stateless
        TransformerLens hooks for forwards without a KV cache ("last", "all" or ("from", i)).
        """
        from .hooks import check_model, steering_hooks

        check_model(model)
        self.check_for(model)
        self.check_identity(model, allow_other_model=allow_other_model)
        return steering_hooks(
            model, self._model_additions(model), positions=positions, lengths=lengths
        )

    def _model_additions(self, model) -> dict[int, torch.Tensor]:
        dev = model.cfg.device
        return {k: v.to(device=dev, dtype=model.cfg.dtype) for k, v in self.additions().items()}

    def check_for(self, model) -> None:
        """ShapeError unless this schedule fits `model` (L blocks, d_model)."""
        L, H = model.cfg.n_layers, model.cfg.d_model
        if self.n_layers != L or self.unit.shape[-1] != H:
            raise ShapeError(
                f"schedule: made for L={self.n_layers}, d_model={self.unit.shape[-1]}; the "
                f"model has L={L}, d_model={H}"
            )

    def check_identity(self, model, *, allow_other_model: bool = False) -> None:
        """OtherModelError if this schedule records another model's weight fingerprint (same
        shape, different weights), unless `allow_other_model`; no record: no check."""
        check_model_meta(
            self.meta, model, None, allow_other_model=allow_other_model, what="schedule"
        )

    # ------------------------------------------------------------- persistence
    def save(self, path) -> None:
        """safetensors (amplitudes, unit, scale) + JSON metadata."""
        tensors = {"amplitudes": self.amplitudes, "unit": self.unit, "scale": self.scale}
        if self.readout is not None:
            tensors["readout"] = self.readout
        save_tensors(path, "Schedule", tensors, self.meta)

    @classmethod
    def load(cls, path, model=None, *, allow_other_model: bool = False) -> Schedule:
        """Load a saved schedule; every tensor's shape, dtype and finiteness is checked against
        the metadata. With `model`, refuse one made for another model shape, or for another
        model of the same shape (weight fingerprint; `allow_other_model=True` to use it
        anyway)."""
        if model is not None:
            from .backend import check_model

            check_model(model)
        t, meta = load_tensors(path, "Schedule")
        if not {"amplitudes", "unit", "scale"} <= set(t):
            raise FileFormatError(f"{str(path)!r}: Schedule file lacks amplitudes/unit/scale")
        check_unexpected(path, "Schedule", t, {"amplitudes", "unit", "scale", "readout"})
        if model is not None:
            check_model_meta(meta, model, path, allow_other_model=allow_other_model)
        a = t["amplitudes"]
        if a.ndim not in (1, 2):
            raise FileFormatError(
                f"{str(path)!r}: tensor 'amplitudes' has shape {list(a.shape)}, expected [L] or "
                "[k, L]"
            )
        lead = tuple(a.shape[:-1])
        L = meta_int(meta, "n_layers", path, min=1)
        H = meta_int(meta, "d_model", path, min=1)
        L = a.shape[-1] if L is None else L
        check_tensor(path, "unit", t["unit"], (*lead, L, None))
        H = t["unit"].shape[-1] if H is None else H
        check_tensor(path, "amplitudes", a, (*lead, L))
        check_tensor(path, "unit", t["unit"], (*lead, L, H))
        check_tensor(path, "scale", t["scale"], (*lead, L))
        if not (t["scale"] > 0).all():
            raise FileFormatError(f"{str(path)!r}: tensor 'scale' has values <= 0")
        if "readout" in t:
            check_tensor(path, "readout", t["readout"], (*lead, H))
        if model is not None:
            check_model_meta({"n_layers": L, "d_model": H}, model.cfg, path)
        return cls(t["amplitudes"], t["unit"], t["scale"], meta, t.get("readout"))

    def to_llama_cpp(self, path, *, model_hint: str | None = None) -> Path:
        """Write a llama.cpp control-vector GGUF (`llama-cli --control-vector FILE`).

        See `steerlin.export.write_llama_cpp` for the layer mapping and its limits (blocks 0
        and 1 cannot be expressed; llama.cpp steers every position).
        """
        return write_llama_cpp(self, path, model_hint=model_hint)

    @classmethod
    def from_llama_cpp(cls, path, model, *, scale=None, drop_final: bool = False) -> Schedule:
        """Read a llama.cpp / repeng control-vector GGUF as a schedule for `model`.

        `direction.N` is added by llama.cpp to the output of layer N, which is steerlin's
        block input x_{N+1}: it becomes the injection at block N + 1 (N = 1..L-2 -> blocks
        2..L-1). N = L - 1 lands on x_L (after the last block, where a steerlin schedule has no
        injection point): an error unless `drop_final=True`. Amplitudes are norm-relative with
        `scale` (a ConceptDirections or Float[L] of mean residual norms), else raw (scale 1).
        llama.cpp steers every position: apply the result with positions="all" to match it.
        """
        from .backend import check_model
        from .interop import read_gguf

        check_model(model)
        L, H = model.cfg.n_layers, model.cfg.d_model
        found, meta_file = read_gguf(path)
        vec = torch.zeros(L, H, dtype=F64)
        for n, v in sorted(found.items()):
            if v.shape != (H,):
                raise ShapeError(
                    f"{str(path)!r}: direction.{n} has {v.shape[0]} entries, the model d_model={H}"
                )
            block = n + 1
            if block == L:
                if drop_final:
                    continue
                raise LayerError(
                    f"{str(path)!r}: direction.{n} is added after the last block (steerlin's x_L, "
                    "not an injection point of a schedule); pass drop_final=True to leave it out"
                )
            if block > L:
                raise LayerError(
                    f"{str(path)!r}: direction.{n} is beyond the model's {L} layers (a control "
                    "vector for another model?)"
                )
            vec[block] = torch.as_tensor(v, dtype=F64)
        if scale is None:
            sc = torch.ones(L, dtype=F64)
            units = "raw"
        else:
            sc = getattr(scale, "scale", scale)
            try:
                sc = torch.as_tensor(sc, dtype=F64).reshape(-1)[:L]
            except (TypeError, ValueError, RuntimeError):
                raise InputError(
                    f"scale: expected ConceptDirections or {L} mean norms, got "
                    f"{type(scale).__name__}"
                ) from None
            if sc.shape != (L,) or not (sc > 0).all():
                raise ShapeError(f"scale: expected {L} positive mean norms, got {tuple(sc.shape)}")
            units = "norm-relative"
        norms = vec.norm(dim=-1)
        unit = torch.where(norms[:, None] > 0, vec / norms.clamp_min(1e-300)[:, None], 0.0)
        meta = {
            "strategy": "llama.cpp",
            "source": str(path),
            "model_name": getattr(model.cfg, "model_name", None),
            "n_layers": L,
            "d_model": H,
            "amplitude_units": units,
            "model_hint": meta_file.get("controlvector.model_hint"),
        }
        return cls(norms / sc, unit, sc, meta)

    def __repr__(self) -> str:
        return (
            f"Schedule(strategy={self.strategy!r}, layers={self.layers}, "
            f"energy={self.energy:.4g}, predicted_shift={self.predicted_shift})"
        )


__all__ = ["Schedule"]
