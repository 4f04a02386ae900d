"""Where torch runs: the device, the arithmetic, and the processes torchrun started.

Shared by the verbs that run networks (train, cluster, the feature spaces): torchrun sets
WORLD_SIZE/RANK/LOCAL_RANK and each process joins the group (gloo on CPU, nccl on CUDA);
`Dist.main` (rank 0) is the one that writes shared results.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

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

    @contextlib.contextmanager
    def main_holds(self, enter: Callable[[], contextlib.AbstractContextManager]):
        """Rank 0 alone enters `enter()` (the workspace lock) on behalf of every process; a refusal
        there (a busy workspace, say) reaches every process, which all raise it, instead of
        leaving the others waiting at the next barrier."""
        with contextlib.ExitStack() as stack:
            error = None
            if self.main:
                try:
                    stack.enter_context(enter())
                except NeighbourhoodsError as e:
                    error = str(e)
            error = self.send(error)
            if error:
                raise NeighbourhoodsError(error)
            yield

    def send(self, obj):
        """Rank 0's `obj` to every process (pickled; rank 0 passes the object, the others None)."""
        if self.world <= 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str, timeout_s: float | None = None) -> Dist:
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
    # timeout: how long a barrier waits for the slowest process (a long shard of photos, say)
    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group(backend=backend, **kwargs)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def pick_device(device: str, dd: Dist | None = None) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:N") checked; under torchrun each process takes cuda:LOCAL_RANK."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NeighbourhoodsError(f"--device {device} asked for, but torch sees no CUDA GPU here")
        return torch.device("cuda", dd.local_rank) if dd is not None and dd.world > 1 else torch.device(device)
    if device != "cpu":
        raise NeighbourhoodsError(f"unknown --device {device!r}: use cpu or cuda")
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
