"""Minimum-energy steering schedules from surrogate gains (no model needed here).

With predicted shifts δy ≈ h^T u (u in norm-relative units, one amplitude per layer), the
least-norm schedule that reaches a target Δy is

    u* = Δy · h / ‖h‖²      (over the allowed layers; zero elsewhere)

and with k concepts and the gain tensor G[i, j, l] = ∂y_i/∂u_{j,l} (cross-gains included),
u* = pinv(G) t over the stacked amplitudes. Baselines spread equal amplitude over a layer
pattern (all layers, the last, one given or one random layer) and solve for its size.

This module imports no TransformerLens: `Schedule.apply` reaches the model through
`steerlin.hooks.inject` only when called.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from .errors import FileFormatError, InputError, LayerError, ShapeError
from .krylov import gains_from_reduced
from .persist import check_model_meta, load_tensors, save_tensors

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
        if not math.isfinite(factor):
            raise InputError(f"factor: expected a finite number, got {factor}")
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
    def apply(self, model, *, positions: str = "generated"):
        """Context manager: this schedule as live hooks on `model` (see `steerlin.inject`).

        Inside, `model.generate(...)` is steered at the last prompt token and every generated
        token; hooks are removed on exit and on any exception.
        """
        from .hooks import check_model, inject

        check_model(model)
        self.check_for(model)
        adds = {k: v.to(model.cfg.dtype) for k, v in self.additions().items()}
        with inject(model, adds, positions=positions) as handle:
            yield handle

    def check_for(self, model) -> None:
        """ShapeError unless this schedule fits `model` (L blocks, d_model)."""
        L, H = model.cfg.n_layers, model.cfg.d_model
        if self.n_layers != L or self.unit.shape[-1] != H:
            raise ShapeError(
                f"schedule: made for L={self.n_layers}, d_model={self.unit.shape[-1]}; the "
                f"model has L={L}, d_model={H}"
            )

    # ------------------------------------------------------------- persistence
    def save(self, path) -> None:
        """safetensors (amplitudes, unit, scale) + JSON metadata."""
        tensors = {"amplitudes": self.amplitudes, "unit": self.unit, "scale": self.scale}
        if self.readout is not None:
            tensors["readout"] = self.readout
        save_tensors(path, "Schedule", tensors, self.meta)

    @classmethod
    def load(cls, path, model=None) -> Schedule:
        """Load a saved schedule; with `model`, refuse one made for another model shape."""
        t, meta = load_tensors(path, "Schedule")
        if not {"amplitudes", "unit", "scale"} <= set(t):
            raise FileFormatError(f"{str(path)!r}: Schedule file lacks amplitudes/unit/scale")
        if model is not None:
            check_model_meta(meta, model.cfg, path)
            check_model_meta(
                {"n_layers": t["amplitudes"].shape[-1], "d_model": t["unit"].shape[-1]},
                model.cfg,
                path,
            )
        return cls(t["amplitudes"], t["unit"], t["scale"], meta, t.get("readout"))

    def to_llama_cpp(self, path, *, model_hint: str | None = None) -> Path:
        """Write a llama.cpp control-vector GGUF (`llama-cli --control-vector FILE`).

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
        vec = self.vectors.to(torch.float32)
        bad = [layer for layer in self.layers if layer < 2]
        if bad:
            raise LayerError(
                f"to_llama_cpp: injections at blocks {bad} cannot be expressed as llama.cpp "
                "control vectors (it steers layer outputs 1..L-1 = block inputs 2..L-1); use "
                "Controller(..., layers=range(2, L))"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        hint = model_hint or _llama_arch(self.meta.get("model_name", ""))
        writer = gguf.GGUFWriter(str(path), "controlvector")
        writer.add_string("controlvector.model_hint", hint)
        writer.add_uint32("controlvector.layer_count", self.n_layers - 1)
        for layer in range(2, self.n_layers):
            writer.add_tensor(f"direction.{layer - 1}", vec[layer].numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    def __repr__(self) -> str:
        return (
            f"Schedule(strategy={self.strategy!r}, layers={self.layers}, "
            f"energy={self.energy:.4g}, predicted_shift={self.predicted_shift})"
        )


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


class Controller:
    """Least-norm steering schedules from one or several fitted surrogates.

    `Controller(surrogate, target=1.0)`: one concept. `Controller([s1, s2], target=[t1, t2])`:
    several concepts on the same model, solved jointly with cross-gains (concept j's injection
    moving concept i's readout) taken from the surrogates, or from `coupling` (Float[k, k, L],
    e.g. measured with `steerlin.evaluate.cross_gains`).

    Args:
        surrogates: a Surrogate or a list of them (same model).
        target: desired readout shift Δy (one per concept).
        layers: the layers the schedule may use (default all).
        coupling: optional gain tensor G[i, j, l]; default from the surrogates.
        seed: for the "random" baseline.
    """

    def __init__(self, surrogates, target=1.0, *, layers=None, coupling=None, seed: int = 0):
        single = not isinstance(surrogates, list | tuple)
        self.surrogates = [surrogates] if single else list(surrogates)
        if not self.surrogates:
            raise InputError("surrogates: expected at least one Surrogate, got an empty list")
        self.single = single
        k = len(self.surrogates)
        L = self.surrogates[0].n_layers
        H = self.surrogates[0].P.shape[1]
        for s in self.surrogates:
            if s.n_layers != L or s.P.shape[1] != H:
                raise ShapeError("surrogates: all must come from the same model shape (L, H)")
        t = torch.as_tensor(target, dtype=F64).reshape(-1)
        if t.shape[0] != k:
            raise ShapeError(f"target: expected {k} value(s), one per surrogate, got {t.shape[0]}")
        if not torch.isfinite(t).all():
            raise InputError(f"target: expected finite values, got {t.tolist()}")
        if (t == 0).all():
            raise InputError("target: 0 asks for no shift (the schedule would be all zeros)")
        self.target = t
        self.n_layers = L
        if layers is None:
            allowed = list(range(L))
        else:
            allowed = sorted({int(x) for x in layers})
            if not allowed:
                raise InputError("layers: expected at least one allowed layer, got none")
            for x in allowed:
                if not 0 <= x < L:
                    raise LayerError(f"layers: expected indices in 0..{L - 1}, got {x}")
        self.layers = allowed
        self.seed = seed
        self.G = self._gain_tensor(coupling)

    # ----------------------------------------------------------------- gains
    def _gain_tensor(self, coupling) -> torch.Tensor:
        k, L = len(self.surrogates), self.n_layers
        if coupling is not None:
            G = torch.as_tensor(coupling, dtype=F64)
            if G.shape != (k, k, L):
                raise ShapeError(f"coupling: expected shape [{k}, {k}, {L}], got {tuple(G.shape)}")
            return G
        G = torch.zeros(k, k, L, dtype=F64)
        for i, si in enumerate(self.surrogates):
            for j, sj in enumerate(self.surrogates):
                G[i, j] = si.gains if i == j else surrogate_cross_gains(si, sj)
        return G

    @property
    def coupling(self) -> Float[torch.Tensor, "k k"]:
        """‖G[i, j, :]‖ relative to ‖G[i, i, :]‖: how much concept j's injections move readout i."""
        norms = self.G.norm(dim=-1)
        return norms / norms.diagonal()[:, None]

    def _mask(self) -> torch.Tensor:
        m = torch.zeros(self.n_layers, dtype=F64)
        m[self.layers] = 1
        return m

    def _make(self, u: torch.Tensor, strategy: str) -> Schedule:
        """Schedule from stacked amplitudes u [k, L]."""
        shift = torch.einsum("ijl,jl->i", self.G, u)
        units = torch.stack([s.P[:-1, :, 0] for s in self.surrogates])  # [k, L, H]
        scales = torch.stack([_scale_of(s) for s in self.surrogates])  # [k, L]
        meta = dict(self.surrogates[0].meta)
        meta = {key: meta[key] for key in ("model_name", "n_layers", "d_model") if key in meta}
        readouts = [s.meta.get("readout", {"kind": "concept"}) for s in self.surrogates]
        rd = None
        if all(r.get("kind") == "concept" for r in readouts):
            rd = torch.stack([s.P[-1, :, 0] for s in self.surrogates])
            rd = rd[0] if self.single else rd
        meta.update(
            readout=readouts[0] if self.single else readouts,
            strategy=strategy,
            target=self.target.tolist() if not self.single else float(self.target[0]),
            predicted_shift=shift.tolist() if not self.single else float(shift[0]),
            allowed_layers=self.layers,
        )
        if self.single:
            return Schedule(u[0], units[0], scales[0], meta, rd)
        return Schedule(u, units, scales, meta, rd)

    # ----------------------------------------------------------------- schedules
    def apply(self, model, *, positions: str = "generated"):
        """Context manager: the minimum-energy schedule as live hooks (`Schedule.apply`)."""
        return self.schedule.apply(model, positions=positions)

    @property
    def schedule(self) -> Schedule:
        """The minimum-energy schedule: least-norm u with G u = target on the allowed layers."""
        k, L = len(self.surrogates), self.n_layers
        m = self._mask()
        Gm = (self.G * m).reshape(k, k * L)  # [k, kL], disallowed layers zeroed
        if self.single:
            h = Gm[0]
            hh = h @ h
            if hh == 0:
                raise InputError("surrogate gains are zero on every allowed layer: no schedule")
            u = self.target[0] * h / hh
        else:
            u = torch.linalg.pinv(Gm) @ self.target
        u = (u.reshape(k, L) * m).contiguous()
        return self._make(u, "llv")

    def baseline(self, kind: str, *, seed: int | None = None) -> Schedule:
        """Heuristic schedules sized (under the surrogate) to hit the target.

        kind: "uniform" (equal amplitude on every allowed layer), "last" (the last allowed
        layer), "single:<l>" (layer l), "random" (one allowed layer drawn with `seed`).
        """
        L = self.n_layers
        if kind == "uniform":
            pattern = self._mask()
        elif kind == "last":
            pattern = torch.zeros(L, dtype=F64)
            pattern[self.layers[-1]] = 1
        elif kind == "random":
            rng = np.random.default_rng(self.seed if seed is None else seed)
            pick = int(rng.choice(self.layers))
            pattern = torch.zeros(L, dtype=F64)
            pattern[pick] = 1
            kind = f"random:{pick}"
        elif kind.startswith("single:"):
            try:
                layer = int(kind.split(":", 1)[1])
            except ValueError:
                raise InputError(f"kind: expected 'single:<layer>', got {kind!r}") from None
            if layer not in self.layers:
                raise LayerError(f"kind: layer {layer} is not among the allowed {self.layers}")
            pattern = torch.zeros(L, dtype=F64)
            pattern[layer] = 1
        else:
            raise InputError(
                f"kind: expected 'uniform', 'last', 'random' or 'single:<l>', got {kind!r}"
            )
        Gw = torch.einsum("ijl,l->ij", self.G, pattern)  # [k, k]
        if torch.linalg.matrix_rank(Gw) < Gw.shape[0]:
            raise InputError(
                f"baseline {kind!r}: the surrogate predicts no (or degenerate) effect from that "
                "layer pattern; it cannot reach the target"
            )
        a = torch.linalg.solve(Gw, self.target)  # [k]
        return self._make(a[:, None] * pattern[None], kind)


def _scale_of(s) -> torch.Tensor:
    """scale_l used by a surrogate: B[l] = scale_l * Abar_l[:, 0], stored in its metadata."""
    sc = s.meta.get("scale")
    if sc is None:
        raise InputError("surrogate: metadata lacks 'scale' (refit with this steerlin version)")
    return torch.as_tensor(sc, dtype=F64)[: s.n_layers]


def surrogate_cross_gains(si, sj) -> Float[torch.Tensor, " L"]:
    """Gains of readout i per unit injection along concept j, from surrogate i's model.

    The injection b^j_l is projected onto surrogate i's basis at layer l and propagated by
    its reduced dynamics: h^{ij}_l = c_i^T A_{L-1} ... A_{l+1} A_l P_l^T b^j_l. Exact when b^j_l
    lies in span(P^i_l); otherwise it keeps only the part the basis sees (measure with
    `steerlin.evaluate.cross_gains` for the exact first-order value).
    """
    bj = sj.P[:-1, :, 0] * _scale_of(sj)[:, None]  # [L, H]
    r = torch.einsum("lhd,lh->ld", si.P[:-1], bj)  # P^i_l^T b^j_l  [L, d]
    B = torch.einsum("lij,lj->li", si.A, r)  # [L, d]
    return gains_from_reduced(si.A, B, si.c)


__all__ = ["Controller", "Schedule", "surrogate_cross_gains"]
