"""The steering-vectors habit in one call: a vector, layers, one coefficient, every position.

    with steerlin.steer(model, vector, layers=[6, 7], coefficient=4.0):
        model.generate("The movie was", max_new_tokens=20, do_sample=False, verbose=False)

adds `coefficient * v_l` to x_l at each chosen layer (x_l: the residual entering block l,
x_L the last block's output; `steerlin.interop` for how the other tools' layer numbers map
onto it) on every position of every forward while the context is open, like steering-vectors'
`SteeringVector.apply(model, multiplier=coefficient)` and repeng's
`ControlModel.set_control(vector, coefficient)`. The hooks go on exit and on any exception;
bad input raises `SteerlinError` naming the argument before any hook is placed.

`vector` is anything `Surrogate.fit(..., directions=)` takes: a tensor Float[H] (the same vector
at every layer in `layers`) or Float[L+1, H] (x_0..x_L), a dict {l: vector} in steerlin's x_l,
`steerlin.block_outputs({n: vector})` in the other tools' numbering, a steering-vectors
`SteeringVector`, a repeng `ControlVector`, a llama.cpp `.gguf` path, or `ConceptDirections`
(its raw class-mean differences `vectors`, steering-vectors' mean-difference vector).
Units are the vector's own: coefficient 1 adds the vector as given (steering-vectors: the
whole class-mean difference; repeng: a unit-norm direction, so the coefficient is the
injected norm). `Steering.injected_norms` reports what each layer receives, and
`Steering.relative_norms(model, prompts)` the same as a share of ‖x_l‖ there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .backend import Model, check_model
from .errors import InputError, LayerError
from .hooks import Positions, inject, parse_positions
from .validate import check_layers, check_number

#: steering-vectors and repeng steer every position; so does `steer` by default.
STEER_POSITIONS = "all"


@dataclass(frozen=True)
class Steering:
    """What `steer` is adding: `additions` {x_l: coefficient * v_l} (the model's dtype and
    device), the position policy, and where the vectors came from."""

    additions: dict[int, torch.Tensor]
    positions: object
    coefficient: float
    source: str

    @property
    def layers(self) -> list[int]:
        return sorted(self.additions)

    @property
    def injected_norms(self) -> dict[int, float]:
        """{x_l: ‖coefficient · v_l‖}: the raw norm each steered layer receives."""
        return {l: float(v.double().norm()) for l, v in sorted(self.additions.items())}

    def relative_norms(self, model: Model, prompts, *, batch_size: int = 16) -> dict[int, float]:
        """{x_l: ‖coefficient · v_l‖ / mean ‖x_l‖ over `prompts`}: steerlin's norm-relative
        amplitude u_l of this steering (0.1 = 10% of a typical residual norm there)."""
        from .trajectory import capture

        norms = capture(model, prompts, batch_size=batch_size).states.norm(dim=-1).mean(0)
        return {l: n / float(norms[l]) for l, n in self.injected_norms.items()}


def _vectors(model: Model, vector) -> tuple[dict[int, torch.Tensor], str, bool]:
    """{x_l: v_l}, a word for the source, and whether the input names its own layers."""
    from .directions import ConceptDirections
    from .interop import is_gguf_path, to_steerlin_layers

    L, H = model.cfg.n_layers, model.cfg.d_model
    if isinstance(vector, ConceptDirections):
        vector.check_for(model)
        return dict(enumerate(vector.vectors)), "ConceptDirections (class-mean differences)", False
    given, source = to_steerlin_layers(vector, L, H)
    own = (
        isinstance(vector, Mapping)
        or is_gguf_path(vector)
        or source in ("steering-vectors", "repeng")
    )
    return given, source, own


def _layers(layers, given: dict, own: bool, source: str, L: int) -> list[int]:
    if layers is None:
        if not own:
            raise InputError(
                f"layers: a {source} covers every layer, so say which to steer, e.g. layers=[6] "
                f"(steerlin's x_l: the input of block l, 0..{L}; the other tools' layer n is "
                "x_{n+1})"
            )
        return sorted(given)
    if hasattr(layers, "__index__") and not isinstance(layers, bool | torch.Tensor):
        layers = [layers]
    chosen = check_layers("layers", layers, L + 1)
    missing = [l for l in chosen if l not in given]
    if missing:
        raise LayerError(
            f"layers: {source} has no vector at x_l for l in {missing} (it has "
            f"{sorted(given)}; steerlin's x_l numbering, the other tools' n is x_(n+1))"
        )
    return chosen


@contextmanager
def steer(
    model: Model,
    vector,
    *,
    layers=None,
    coefficient: float = 1.0,
    positions: Positions = STEER_POSITIONS,
    lengths=None,
) -> Iterator[Steering]:
    """Add `coefficient * v_l` to x_l at `layers` while the context is open.

    Args:
        model: the model to steer (a HookedTransformer or TransformerBridge; not modified).
        vector: see the module docstring (tensor, dict, `block_outputs(...)`, SteeringVector,
            ControlVector, `.gguf` path, ConceptDirections).
        layers: steerlin's x_l indices to steer (0..L; an int or a list). Default: the layers
            the vector names (dict keys, a SteeringVector's / ControlVector's / GGUF's layers,
            mapped to x_l); required for a tensor or ConceptDirections, which cover every layer.
        coefficient: the multiplier (steering-vectors' `multiplier`, repeng's `coeff`), in the
            vector's own units.
        positions: "all" (default, as the peers), "last", "generated" or ("from", i): the
            position policies of `steerlin.inject`.
        lengths: real lengths of a right-padded batch (for "last" and "generated").

    Yields:
        A `Steering` (the additions, injected norms, source).
    """
    check_model(model)
    coefficient = check_number("coefficient", coefficient)
    parse_positions(positions)
    given, source, own = _vectors(model, vector)
    chosen = _layers(layers, given, own, source, model.cfg.n_layers)
    dev, dt = model.cfg.device, model.cfg.dtype
    additions = {l: (coefficient * given[l].to(torch.float64)).to(dev, dt) for l in chosen}
    with inject(model, additions, positions=positions, lengths=lengths):
        yield Steering(additions, positions, coefficient, source)


__all__ = ["STEER_POSITIONS", "Steering", "steer"]
