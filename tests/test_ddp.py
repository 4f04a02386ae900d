"""Data-parallel training: two CPU processes (gloo) stay in sync, as under torchrun."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_train import TINY, make_toy_workspace

from neighbourhoods.models import runs
from neighbourhoods.train import TrainConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, ws: str, out: str, port: int) -> None:
    # what torchrun sets for each process
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from neighbourhoods.train import train_models

    config = TrainConfig(model="dcgan", res=(32, 32), batch=8, kimg=0.024, min_city_photos=5,
                         model_kwargs=TINY["dcgan"], augment="color,translation", mirror=True,
                         snapshot_every=16, sample_every=16, tick_every=8, grid_rows=2, grid_seeds=2, bn_stat_images=8,
                         num_workers=0, progress=False)
    result = train_models(ws, config)
    for name in ("G", "D", "G_ema"):
        module = getattr(result, name)
        # the whole state: parameters and buffers (BatchNorm's running statistics drift per rank
        # unless the loop re-broadcasts rank 0's; a sampled or exported G reads them)
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()},
                  str(Path(out) / f"{name}-rank{rank}.safetensors"))
    (Path(out) / f"images-rank{rank}.txt").write_text(str(result.images_seen))


def test_two_processes_stay_in_sync(tmp_path):
    ws = make_toy_workspace(tmp_path, res=((32, 32),))
    mp.spawn(_worker, args=(str(ws), str(tmp_path), _free_port()), nprocs=2, join=True)
    for name in ("G", "D", "G_ema"):
        a = load_file(str(tmp_path / f"{name}-rank0.safetensors"))
        b = load_file(str(tmp_path / f"{name}-rank1.safetensors"))
        assert a.keys() == b.keys()
        assert any("running_mean" in key for key in a)         # the BatchNorm buffers are compared too
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs between ranks"
    assert (tmp_path / "images-rank0.txt").read_text() == (tmp_path / "images-rank1.txt").read_text() == "24"
    # rank 0 alone wrote the run, and what it saved is what both ranks hold
    run = ws / "runs" / "dcgan-32x32"
    assert runs.latest_checkpoint(run)[1] == 24
    saved = load_file(str(runs.latest_checkpoint(run)[0] / "G.safetensors"))
    a = load_file(str(tmp_path / "G-rank0.safetensors"))
    assert all(torch.equal(saved[k], a[k]) for k in a)
    # and it trained: the weights moved from the initial checkpoint
    first = load_file(str(run / "checkpoints" / "0000000000" / "G.safetensors"))
    assert any(not torch.equal(first[k], a[k]) for k in a)
