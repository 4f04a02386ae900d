"""Several processes under torchrun: who is who, the device each one uses, DDP wrapping.

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; each process trains on its share of every batch,
gradients averaged by DistributedDataParallel, and only rank 0 writes (`Dist.main`).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from neighbourhoods.core.errors import NeighbourhoodsError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False    # we called init_process_group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (gloo on CPU, nccl on CUDA)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def pick_device(config, dd: Dist) -> torch.device:
    if config.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NeighbourhoodsError("--device cuda asked for, but torch sees no CUDA GPU here")
        return torch.device("cuda", dd.local_rank) if dd.world > 1 else torch.device(config.device)
    if config.device != "cpu":
        raise NeighbourhoodsError(f"unknown --device {config.device!r}: use cpu or cuda")
    return torch.device("cpu")


def wrap_ddp(module: nn.Module, device: torch.device, dd: Dist) -> nn.Module:
    """`module` as DistributedDataParallel when there are several processes, else itself."""
    if dd.world <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    # No buffer sync: D runs twice (real, fake) before one backward; re-broadcasting BatchNorm
    # buffers in between would modify tensors autograd saved. (Renamed in torch 2.13.)
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(module, device_ids=ids, **no_sync)
