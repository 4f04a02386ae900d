"""`neighbourhoods train`: a city-conditioned GAN trained on the workspace's prepared photos.

The loop follows StyleGAN2-ADA's conventions: progress is counted in images shown (kimg), not
epochs; G_ema (an exponential moving average of G) is what samples and gets served; snapshots
of weights and of a fixed-seed sample grid are taken at image intervals; metrics go to
metrics.jsonl and TensorBoard. The run folder format is models/runs.py.

The package, in the order a step uses it:

    config.py       TrainConfig; CLI values, the model's recipe and a resumed run's values merged
    data.py         conditioning classes of the photos; batches in a resumable order
    loss.py         GANLoss: D's loss and G's loss (hinge/BCE, DiffAugment, mode seeking)
    augment.py      DiffAugment
    ema.py          G_ema and its BatchNorm statistics
    state.py        TrainState, Nets, and what a checkpoint holds of them
    rng.py          every random stream, captured and restored
    distributed.py  torchrun / DDP
    logs.py         messages, progress bar, metrics.jsonl, TensorBoard, sample grids
    loop.py         the loop

Scale: CPU by default; `device="cuda"` adds mixed precision; under `torchrun` (WORLD_SIZE > 1)
each process trains on its shard of every batch and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist

from neighbourhoods.core.locks import training_run
from neighbourhoods.core.workspace import Workspace, open_workspace
from neighbourhoods.train.config import TrainConfig, describe, resolve_config, resolve_run, run_name  # noqa: F401 (the API)
from neighbourhoods.train.distributed import init_distributed
from neighbourhoods.train.loop import TrainResult, training_loop


def train(workspace: Workspace | str | os.PathLike, config: TrainConfig) -> Path:
    """Train (or resume) a run as `config` says; returns the run folder."""
    return train_models(workspace, config).run_dir


def train_models(workspace: Workspace | str | os.PathLike, config: TrainConfig) -> TrainResult:
    """train(), returning this process's networks too (tests compare DDP ranks with it)."""
    ws = workspace if isinstance(workspace, Workspace) else open_workspace(workspace)
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(max(1, config.threads))
    dd = init_distributed(config.device)
    try:
        # rank 0 writes: it holds the workspace shared (no ingest meanwhile) and the run exclusively
        locks = training_run(ws.root, ws.run_dir(run_name(config))) if dd.main else contextlib.nullcontext()
        with locks:
            return training_loop(ws, config, dd)
    finally:
        torch.set_num_threads(threads)
        if dd.owns_group:
            dist.destroy_process_group()


def dry_run(workspace: Workspace | str | os.PathLike, config: TrainConfig) -> str:
    """The options a run would train with, resolved as `train` resolves them; trains nothing."""
    ws = workspace if isinstance(workspace, Workspace) else open_workspace(workspace)
    run_dir, cfg, notes = resolve_run(ws, config)
    return "\n".join([*notes, describe(cfg, run_dir)])
