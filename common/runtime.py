"""Device choice, seeding and (optional) torch.distributed for every script (``docs/scale.md``).

A plain ``python SCRIPT.py`` runs one process on CUDA when present, else the CPU. Under
``torchrun`` (WORLD_SIZE > 1) every process joins a process group (NCCL on GPUs, gloo on CPUs)
and drives the GPU of its LOCAL_RANK; rank 0 alone writes files.
"""
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def setup(seed=0):
    """Pick the device, join the process group under torchrun, seed every generator."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launch_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        if world_size > 1:
            torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    seed_everything(seed)
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


def launch_rank():
    """This process's rank as torchrun set it (0 in a plain run), known before ``setup``."""
    return int(os.environ.get("RANK", "0"))


def derived_seed(*numbers):
    """A 63-bit seed that is a function of ``numbers`` (a seed, a step, a rank, a shard, ...) only."""
    state = np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def generator(seed, device="cpu"):
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def barrier(rt):
    """Wait for every rank (no-op in a single process)."""
    if rt.distributed:
        dist.barrier()


def teardown(rt):
    if rt.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(model, rt, parallel=False):
    """DistributedDataParallel under torchrun, DataParallel with ``--parallel``, else the model."""
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return data_parallel(model, parallel)


def data_parallel(model, parallel):
    """``torch.nn.DataParallel(model)`` when asked for and more than one GPU is visible."""
    if parallel and torch.cuda.device_count() > 1:
        return torch.nn.DataParallel(model)
    return model
