"""Prompts -> the last token's residual trajectory x_0..x_L (`capture`).

Each prompt's state is read at its own last real token of a right-padded batch
(`steerlin.tokens`), by the one full-model run `steerlin.measure.run_schedule` with no schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from .backend import Model, check_model
from .errors import NonFiniteError
from .measure import last_token_states
from .tokens import PromptsLike, iter_batches, pad_id, tokenize


@dataclass(frozen=True)
class Trajectory:
    """Last-token residual trajectory of a set of prompts.

    Attributes:
        states: Float[n, L+1, H], x_l at the last real token: `blocks.{l}.hook_resid_pre` for
            l = 0..L-1 and `blocks.{L-1}.hook_resid_post` for l = L.
        lengths: Int[n], tokens per prompt.
    """

    states: Float[torch.Tensor, "n Lp1 H"]
    lengths: Int[torch.Tensor, " n"]

    @property
    def norms(self) -> Float[torch.Tensor, "n Lp1"]:
        """‖x_l‖ per prompt and layer."""
        return self.states.norm(dim=-1)

    @property
    def n_layers(self) -> int:
        return self.states.shape[1] - 1

    def __len__(self) -> int:
        return self.states.shape[0]


def capture(
    model: Model,
    prompts: PromptsLike,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> Trajectory:
    """Run the prompts and keep only the last real token's residual at every layer.

    Only the L+1 needed hook points are read, and only one position of each, so memory is
    O(n · L · H) whatever the prompt lengths.
    """
    check_model(model)
    ids = tokenize(model, prompts)
    L, H = model.cfg.n_layers, model.cfg.d_model
    states = torch.empty(len(ids), L + 1, H, dtype=model.cfg.dtype)
    batches = list(iter_batches(ids, batch_size, pad=pad_id(model), device=model.cfg.device))
    for batch in tqdm(batches, desc="capture", disable=not progress, leave=False):
        x = last_token_states(model, batch, read=range(L + 1))  # [b, L+1, H]
        states[batch.index] = x.to("cpu", states.dtype)
    if not torch.isfinite(states).all():
        bad = (~torch.isfinite(states)).any(-1).any(0).nonzero().flatten().tolist()
        raise NonFiniteError(f"capture: non-finite residual states at layers {bad}")
    return Trajectory(states=states, lengths=torch.tensor([len(i) for i in ids]))


__all__ = ["capture", "Trajectory"]
