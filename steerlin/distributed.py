"""Fit across processes: shard the operating prompts, all-reduce the sufficient statistics.

`Surrogate.fit(..., distributed=True)` inside an initialised `torch.distributed` process group
(gloo on CPU; nccl on GPU, for which `all_reduce_sum` moves each statistic to the rank's CUDA
device: only gloo has been run) gives every rank the same surrogate as one process would get on
all prompts (to float64 summation order, ~1e-12). Every statistic the fit needs is a sum over
prompts (the mean image of each basis column, the POD Gram matrix, the per-prompt gains and
readout rows), so one all-reduce per layer is all the communication.

    torchrun --nproc_per_node 2 my_fit.py      # my_fit.py calls
    torch.distributed.init_process_group("gloo")
    sur = Surrogate.fit(model, prompts, dirs, distributed=True)   # same prompts on every rank
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import InputError


def world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError(
            "distributed=True needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group('gloo'), e.g. under torchrun)"
        )
    return dist.get_rank(), dist.get_world_size()


def shard_prompts(prompts):
    """This rank's share of the prompts (every world_size-th, starting at the rank)."""
    rank, size = world()
    if isinstance(prompts, torch.Tensor):
        return prompts[rank::size]
    prompts = list(prompts)
    if len(prompts) < size:
        raise InputError(f"prompts: {len(prompts)} prompts cannot be sharded over {size} processes")
    return prompts[rank::size]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all ranks (float64, a new tensor on `t`'s device).

    gloo reduces CPU tensors; nccl reduces only CUDA tensors, so under nccl the sum travels on
    this rank's current CUDA device and comes back to `t`'s device.
    """
    out = t.detach().to(torch.float64).clone()
    if dist.get_backend() == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
        buf = out.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


__all__ = ["world", "shard_prompts", "all_reduce_sum"]
