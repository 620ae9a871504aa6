"""Process-group, device and seeding helpers shared by training and evaluation.

Works the same under the ``deepspeed`` launcher, ``torchrun`` and a plain ``python`` start (one process):
the rank layout is read from the environment (RANK / LOCAL_RANK / WORLD_SIZE), the backend is NCCL when
CUDA is visible and gloo otherwise, and validation shards never duplicate a sample, so metrics reduced
over N processes equal the single-process ones.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def launched_by_mpi() -> bool:
    """True under mpirun-style launchers (DeepSpeed's openmpi/mpich/impi/mvapich), which set no RANK."""
    return "RANK" not in os.environ and any(v in os.environ for v in _MPI_RANK_VARS)


def fill_single_process_env(local_rank: int = 0) -> None:
    """Give a plain ``python train_read.py`` start the variables a launcher would have set (one process)."""
    if launched_by_mpi():
        return  # DeepSpeed discovers the layout from MPI
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def select_device(local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is visible (set as the current device), else the CPU."""
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def setup_distributed(local_rank_arg: int = 0, backend: Optional[str] = None) -> DistEnv:
    """Initialise the default process group through DeepSpeed (always, even for one process).

    The group is needed by DeepSpeed itself; with one process every collective is a no-op. ``backend``
    defaults to nccl on CUDA and gloo on the CPU (DeepSpeed's CPU accelerator would otherwise ask for
    oneCCL when it is installed).
    """
    mpi = launched_by_mpi()
    fill_single_process_env(local_rank_arg)
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", local_rank_arg)))
    device = select_device(local_rank)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    import deepspeed  # deferred: importing it probes accelerators and takes seconds

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=mpi)
    return DistEnv(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        device=device,
        backend=dist.get_backend(),
    )


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s value on every rank (identity without a group)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small float tensor over ranks (moved to the backend's device and back)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = values.detach().to(dev, torch.float64).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(values.device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Call with a per-rank seed: ranks must draw different data."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rank_seed(base: int, rank: int, epoch: int = 0) -> int:
    """A distinct, reproducible seed per (rank, epoch); resuming at an epoch re-creates its random stream."""
    return base + 1000 * rank + 1_000_003 * epoch


class ShardSampler(Sampler[int]):
    """Rank r takes items r, r+W, r+2W, ... of a fixed order; every item is seen by exactly one rank.

    All ranks iterate the same number of times (collectives inside forward, e.g. ZeRO-3 parameter
    gathers, need that): a shorter shard is topped up with repeats of its first item, and
    ``is_padding(i)`` tells the caller not to count them.
    """

    def __init__(self, num_items: int, rank: int, world_size: int, start: int = 0) -> None:
        all_indices = list(range(rank, num_items, world_size))
        length = -(-num_items // world_size) if num_items else 0
        pad = [all_indices[0] if all_indices else 0] * (length - len(all_indices))
        self.num_real = len(all_indices)
        self.start = min(max(start, 0), length)  # resume inside an epoch: skip the positions already consumed
        self.indices = (all_indices + pad)[self.start :]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def index_at(self, position: int) -> int:
        """Dataset index of the ``position``-th item this sampler yields."""
        return self.indices[position]

    def is_padding(self, position: int) -> bool:
        """Whether the ``position``-th yielded item is a repeat added only to even out the shards."""
        return self.start + position >= self.num_real
