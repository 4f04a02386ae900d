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


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AMX or AVX512-BF16), where bf16 autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp` on `device`; None = train in fp32.

    bf16 on a CPU with native support: 1.3x the images/s of fp32 here (AMX, 2 cores, 64x64
    and 96x128 alike); where the CPU lacks it bf16 is emulated and slower, so auto stays fp32.
    """
    if amp == "off":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise NeighbourhoodsError("--amp fp16 needs CUDA: on a CPU use --amp bf16 or off")
        return torch.float16
    if amp == "bf16" or device.type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


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
