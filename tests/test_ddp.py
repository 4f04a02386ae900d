"""Data-parallel training: two CPU processes (gloo) stay in sync, as under torchrun, and train
what one process does at the same total batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_train import TINY, make_toy_workspace

from neighbourhoods.models import runs
from neighbourhoods.train import TrainConfig, train_models
from neighbourhoods.train.data import BatchReader


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(**overrides) -> TrainConfig:
    """The run both sides train: 3 steps of batch 8 in total, whatever the number of processes."""
    values = dict(model="dcgan", res=(32, 32), batch=8, kimg=0.024, min_city_photos=5,
                  model_kwargs=TINY["dcgan"], augment="color,translation", mirror=True,
                  snapshot_every=16, sample_every=16, tick_every=8,                   num_workers=0, progress=False)
    return TrainConfig(**{**values, **overrides})


def _worker(rank: int, ws: str, out: str, port: int) -> None:
    # what torchrun sets for each process
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = train_models(ws, _config())
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


def test_the_ranks_together_read_what_one_process_reads():
    # every global batch, across an epoch boundary: the two ranks' shares are exactly the photos
    # (and flips, and classes) one process reads at the same total batch, none twice
    images = np.arange(10 * 4 * 4 * 3, dtype=np.uint8).reshape(10, 4, 4, 3)
    rows, classes = np.arange(10), np.arange(10) % 3
    one = BatchReader(images, rows, classes, seed=5, mirror=True, rank=0, world=1, workers=0)
    ranks = [BatchReader(images, rows, classes, seed=5, mirror=True, rank=r, world=2, workers=0) for r in (0, 1)]
    for position in range(0, 40, 8):
        x, labels, photos = one.get(position, 8)
        shares = [reader.get(position, 8) for reader in ranks]
        assert [len(share[2]) for share in shares] == [4, 4]
        for r, (rx, rlabels, rphotos) in enumerate(shares):    # rank r takes every 2nd image
            assert torch.equal(rx, x[r::2]) and torch.equal(rlabels, labels[r::2]) and torch.equal(rphotos, photos[r::2])


def test_two_processes_train_on_the_schedule_of_one_at_the_same_total_batch(tmp_path):
    # Not bit-equal by design: gloo has no SyncBatchNorm (each rank normalises its own half-batch)
    # and each rank draws its own noise and augmentation, so after 3 Adam steps the weights differ
    # by about what they moved. What must be equal: the start, the data (test above), the clock,
    # the checkpoints and the log; and every saved tensor, BatchNorm buffers included, is finite.
    ws = make_toy_workspace(tmp_path, res=((32, 32),))
    mp.spawn(_worker, args=(str(ws), str(tmp_path), _free_port()), nprocs=2, join=True)
    one = train_models(ws, _config(run="one"))
    ddp, one_dir = ws / "runs" / "dcgan-32x32", ws / "runs" / "one"
    assert one.images_seen == 24 and (tmp_path / "images-rank0.txt").read_text() == "24"
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == sorted(p.name for p in (one_dir / "checkpoints").iterdir())
    rows = [[json.loads(line)["images_seen"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (ddp, one_dir)]
    assert rows[0] == rows[1] and rows[0]
    for net in ("G", "D", "G_ema"):
        start = [load_file(str(run / "checkpoints" / "0000000000" / f"{net}.safetensors")) for run in (ddp, one_dir)]
        assert all(torch.equal(start[0][k], start[1][k]) for k in start[1])      # the same initial weights
        end = [load_file(str(runs.latest_checkpoint(run)[0] / f"{net}.safetensors")) for run in (ddp, one_dir)]
        assert end[0].keys() == end[1].keys()
        assert all(torch.isfinite(v.float()).all() for v in end[0].values())
        assert any(not torch.equal(end[0][k], start[0][k]) for k in end[0])     # both trained
