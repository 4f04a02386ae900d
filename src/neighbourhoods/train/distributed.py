"""Several processes under torchrun: each trains on its share of every batch, gradients averaged
by DistributedDataParallel, and only rank 0 writes (`Dist.main`). Who is who, the device and
the arithmetic are nets/devices.py, shared with `cluster`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from neighbourhoods.nets.devices import (  # noqa: F401  (train's names for them)
    Dist,
    autocast_dtype,
    cpu_has_native_bf16,
    init_distributed,
    pick_device,
)


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
