"""Everything a training run holds between steps, and the checkpoint's view of it.

`TrainState` is the loop's counters, `Nets` the networks with their optimizers. A checkpoint
is the three networks' weights (safetensors, models/runs.py writes them) plus `state_dict`
(optimizers, grad scalers, counters, every RNG stream); `restore` puts a checkpoint back.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from neighbourhoods import models
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.models.runs import load_checkpoint, load_state_into
from neighbourhoods.train.config import EMA_RAMPUP
from neighbourhoods.train.distributed import Dist, wrap_ddp
from neighbourhoods.train.rng import capture_rng, restore_rng, seed_everything


@dataclass
class TrainState:
    images_seen: int = 0        # images shown to D so far, over all processes: the run's clock
    time_s: float = 0.0         # seconds spent in training steps (not snapshots), over all calls
    rollbacks: int = 0          # non-finite losses rolled back so far
    bn_calibrated_at: int = -1  # images_seen at which G_ema's BatchNorm statistics were last re-estimated
    best_kid: float = math.inf  # the training curve's lowest KID so far (train --kid-every) ...
    best_at: int = -1           # ... and the images_seen of that snapshot (checkpoints/best.json)


@dataclass
class Nets:
    G: nn.Module
    G_ema: nn.Module            # the moving average of G: what samples and gets served
    D: nn.Module
    G_train: nn.Module          # G, or G wrapped in DistributedDataParallel
    D_train: nn.Module          # likewise D
    d_params: list              # D's trainable parameters (not a frozen feature net)
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler

    def saved(self) -> dict[str, nn.Module]:
        """The networks a checkpoint holds, by file name."""
        return {"G": self.G, "G_ema": self.G_ema, "D": self.D}


def build_nets(cfg, num_classes: int, device: torch.device, dd: Dist, model_kwargs: dict | None = None) -> Nets:
    """The model's G and D (identical init on every rank), G_ema, and their optimizers;
    `model_kwargs` (default: the run's) are the builder's arguments."""
    seed_everything(cfg.seed)
    G, D = models.build(cfg.model, num_classes, tuple(cfg.res), **(cfg.model_kwargs if model_kwargs is None else model_kwargs))
    G_ema = copy.deepcopy(G)
    G.to(device).train()
    D.to(device).train()
    G_ema.to(device).eval().requires_grad_(False)
    d_params = [p for p in D.parameters() if p.requires_grad]   # a frozen feature net stays out
    betas = models.recipe(cfg.model)["betas"]
    fp16 = device.type == "cuda" and cfg.amp == "fp16"
    return Nets(G=G, G_ema=G_ema, D=D, G_train=wrap_ddp(G, device, dd), D_train=wrap_ddp(D, device, dd),
                d_params=d_params,
                opt_g=torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=betas),
                opt_d=torch.optim.Adam(d_params, lr=cfg.lr_d, betas=betas),
                scaler_g=torch.amp.GradScaler("cuda", enabled=fp16),
                scaler_d=torch.amp.GradScaler("cuda", enabled=fp16))


def state_dict(nets: Nets, state: TrainState, cfg, photos: int, dd: Dist) -> dict:
    """What state.pt holds. Collective under DDP: every rank must call it (RNGs are gathered)."""
    rng = capture_rng()
    if dd.world > 1:
        per_rank = [None] * dd.world
        dist.all_gather_object(per_rank, rng)
    else:
        per_rank = [rng]
    return {"format": 1, "images_seen": state.images_seen, "time_s": state.time_s, "rollbacks": state.rollbacks,
            "best": {"kid": state.best_kid, "images_seen": state.best_at},
            "opt_g": nets.opt_g.state_dict(), "opt_d": nets.opt_d.state_dict(),
            "scaler_g": nets.scaler_g.state_dict(), "scaler_d": nets.scaler_d.state_dict(),
            "ema": {"ema_kimg": cfg.ema_kimg, "ema_rampup": EMA_RAMPUP},
            "augment": {"policy": cfg.augment, "mirror": cfg.mirror},
            "sampler": {"seed": cfg.seed, "position": state.images_seen, "photos": photos, "world": dd.world},
            "rng": per_rank}


def restore(nets: Nets, state: TrainState, folder: Path, cfg, dd: Dist) -> dict:
    """Load the checkpoint in `folder` into `nets` and `state`; returns its state.pt dict."""
    weights, saved = load_checkpoint(folder)
    for key, module in nets.saved().items():
        load_state_into(module, weights[key], folder / f"{key}.safetensors")
    try:
        nets.opt_g.load_state_dict(saved["opt_g"])
        nets.opt_d.load_state_dict(saved["opt_d"])
        nets.scaler_g.load_state_dict(saved["scaler_g"])
        nets.scaler_d.load_state_dict(saved["scaler_d"])
        state.images_seen, state.time_s = int(saved["images_seen"]), float(saved["time_s"])
        state.rollbacks = int(saved["rollbacks"])
        best = saved.get("best", {"kid": math.inf, "images_seen": -1})   # checkpoints written before best snapshots
        state.best_kid, state.best_at = float(best["kid"]), int(best["images_seen"])
        rngs = saved["rng"]
    except (KeyError, ValueError, RuntimeError) as e:
        raise NeighbourhoodsError(f"{folder / 'state.pt'} does not fit this run ({e})") from None
    if len(rngs) == dd.world:
        restore_rng(rngs[dd.rank])
    else:   # a different process count cannot continue the same random streams
        seed_everything(cfg.seed + 1_000_003 * dd.rank + state.images_seen)
    return saved
