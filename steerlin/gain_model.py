"""What a Controller reads from a Surrogate, built from measured per-layer gains
(`Controller.from_gains`): no reduced dynamics, only h_l and the directions."""

from __future__ import annotations

import torch

from .errors import InputError, ShapeError

F64 = torch.float64


class GainModel:
    """What a Controller reads from a Surrogate, built from measured gains (`from_gains`).

    gains: Float[L]; P: Float[L+1, H, 1] (unit_l per layer, then the concept readout
    direction); meta: scale_l, the class separation, label names and the readout kind.
    No reduced dynamics: cross-gains between concepts must come as `coupling=`.
    """

    def __init__(self, gains, P, meta):
        self.gains, self.P, self.meta = gains, P, meta
        self.n_layers = int(gains.shape[0])

    @classmethod
    def build(cls, gains, directions, readout="concept") -> GainModel:
        unit = getattr(directions, "unit", None)
        if unit is None or getattr(directions, "scale", None) is None:
            raise InputError(
                "directions: expected steerlin.ConceptDirections (unit, scale per layer), got "
                f"{type(directions).__name__}"
            )
        L = unit.shape[0] - 1
        h = torch.as_tensor(gains).detach().to("cpu", F64)
        if h.ndim != 1 or h.shape[0] != L:
            raise ShapeError(f"gains: expected shape [{L}] (one per layer), got {tuple(h.shape)}")
        if not torch.isfinite(h).all():
            raise InputError("gains: expected finite values, got NaN or inf")
        kind = readout if isinstance(readout, str) else getattr(readout, "kind", None)
        if kind == "concept":
            rd_dir = unit[-1].detach().to("cpu", F64)
            sep = float(rd_dir @ directions.vectors[-1].detach().to("cpu", F64))
            rd_meta = {"kind": "concept", "pos_token": None, "neg_token": None}
        elif kind == "logits" and not isinstance(readout, str):
            rd_dir = torch.zeros(unit.shape[1], dtype=F64)
            sep = directions.separation(readout)
            rd_meta = readout.to_meta()
        else:
            raise InputError(
                f"readout: expected 'concept' or a steerlin Readout, got {readout!r} (for a "
                "logit readout pass the Readout object, steerlin.readouts.make_readout)"
            )
        P = torch.cat([unit[:L].detach().to("cpu", F64), rd_dir[None]])[:, :, None]
        meta = {k: directions.meta[k] for k in ("model_name",) if k in directions.meta} | {
            "n_layers": L,
            "d_model": int(unit.shape[1]),
            "readout": rd_meta,
            "scale": directions.scale.detach().to("cpu", F64).tolist(),
            "separation": None
            if sep is None
            else {"value": sep, "readout": rd_meta["kind"], "split": "concept", "plus": "label 1"},
            "label_names": list(directions.meta.get("label_names", ["label 0", "label 1"])),
            "gains_source": "measured",
        }
        return cls(h, P, meta)


__all__ = ["GainModel"]
