"""Distributed fitting: 2 gloo processes on a tiny model give the single-process surrogate."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

from steerlin.errors import InputError  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from conftest import make_gemma_like, random_prompts

    from steerlin import ConceptDirections, Surrogate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make_gemma_like()
        prompts = random_prompts(model, 16, seed=3)
        dirs = ConceptDirections.fit(model, prompts, [i % 2 for i in range(16)])
        ops = random_prompts(model, 9, seed=4)
        for basis in ("krylov", "pod"):
            s = Surrogate.fit(model, ops, dirs, d=6, basis=basis, distributed=True)
            if rank == 0:
                s.save(os.path.join(out_dir, f"{basis}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    from conftest import make_gemma_like, random_prompts

    from steerlin import ConceptDirections, Surrogate

    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    model = make_gemma_like()
    prompts = random_prompts(model, 16, seed=3)
    dirs = ConceptDirections.fit(model, prompts, [i % 2 for i in range(16)])
    ops = random_prompts(model, 9, seed=4)
    for basis in ("krylov", "pod"):
        one = Surrogate.fit(model, ops, dirs, d=6, basis=basis)
        two = Surrogate.load(tmp_path / f"{basis}.safetensors")
        # only float64 summation order differs between the two
        for name in ("gains", "gains_paper", "A", "B", "c"):
            a, b = getattr(one, name), getattr(two, name)
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-9 * a.abs().max()), name
        assert two.meta["n_prompts"] == 9


def test_distributed_without_group_is_a_clear_error():
    from conftest import make_gpt2_like, random_prompts

    from steerlin import ConceptDirections, Surrogate

    model = make_gpt2_like()
    prompts = random_prompts(model, 6)
    dirs = ConceptDirections.fit(model, prompts, [0, 1] * 3)
    with pytest.raises(InputError, match="process group"):
        Surrogate.fit(model, prompts, dirs, d=4, distributed=True)
