"""Training: run folders, both models, exact resume, crash safety, 4:3, and the run API.

Everything trains tiny networks for a few steps on toy town, so the file runs in seconds.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from toy_run import make_toy_workspace

from neighbourhoods import train as train_mod
from neighbourhoods.cli import main
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import Resolution
from neighbourhoods.core.workspace import open_workspace
from neighbourhoods.models import runs
from neighbourhoods.train import TrainConfig, train
from neighbourhoods.train import data as train_data
from neighbourhoods.train import ema as train_ema
from neighbourhoods.train import loop as train_loop
from neighbourhoods.train import loss as train_loss
from neighbourhoods.train.data import class_map
from neighbourhoods.train.ema import ema_beta

TINY = {
    "dcgan": {"ngf": 8, "ndf": 8, "z_dim": 16, "g_embed": 4, "d_embed": 2},
    # feature_min_side 0: tiny runs keep D's feature net at their own 32 px (the recipe's 128 px costs 16x)
    "projected": {"z_dim": 16, "g_max_channels": 16, "g_min_channels": 8, "d_head_width": 8, "feature_min_side": 0},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy_ws(tmp_path_factory) -> Path:
    return make_toy_workspace(tmp_path_factory.mktemp("toy"))


def tiny(model="dcgan", **overrides) -> TrainConfig:
    """A config for a few steps: batch 8, checkpoints every 2 steps, quiet."""
    cfg = TrainConfig(model=model, res=(32, 32), batch=8, kimg=0.032, min_city_photos=5, model_kwargs=TINY[model],
                      snapshot_every=16, sample_every=16, tick_every=8, num_workers=1,
                      progress=False)
    return replace(cfg, **overrides)


def weights(run_dir: Path, net="G") -> dict[str, torch.Tensor]:
    folder, _ = runs.latest_checkpoint(run_dir)
    return load_file(str(folder / f"{net}.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the run folder --------------------------------------------------------------------------------
def test_run_folder_follows_the_interface(toy_ws):
    run = train(toy_ws, tiny(run="layout"))
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "dcgan" and config["res"] == [32, 32] and config["z_dim"] == 16
    assert config["class_names"] == ["Harborview", "Pinecrest", "Sunvale", "(any city)"]
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest == {"dir": "0000000032", "images_seen": 32}
    assert sorted(p.name for p in (run / "checkpoints" / "0000000032").iterdir()) == sorted(runs.CHECKPOINT_FILES)
    state = torch.load(run / "checkpoints" / "0000000032" / "state.pt", weights_only=True)
    assert state["images_seen"] == 32 and {"opt_g", "opt_d", "rng", "sampler", "augment", "ema"} <= state.keys()
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "progress-0000000000.png", "progress-0000000016.png", "progress-0000000032.png"]
    lines = metrics(run)
    assert [m["images_seen"] for m in lines] == [8, 16, 24, 32]
    assert {"images_seen", "time_s", "loss_g", "loss_d", "images_per_s"} <= lines[0].keys()
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())


def test_sample_grid_has_a_row_per_city_and_a_column_per_seed(toy_ws):
    from PIL import Image

    run = train(toy_ws, tiny(run="grid", kimg=0.008))
    grid = Image.open(run / "samples" / "progress-0000000008.png")
    assert grid.height == 4 * (32 + 2)                   # 4 classes, 2 px gaps
    assert grid.width > 8 * (32 + 2)                     # 8 seeds plus the name margin


def test_first_grid_is_the_same_seeds_every_run(toy_ws):
    a = train(toy_ws, tiny(run="seeds-a", kimg=0.008))
    b = train(toy_ws, tiny(run="seeds-b", kimg=0.008))
    assert (a / "samples" / "progress-0000000008.png").read_bytes() == (b / "samples" / "progress-0000000008.png").read_bytes()


# --- both models learn -----------------------------------------------------------------------------
@pytest.mark.parametrize("model, res", [("dcgan", (32, 32)), ("projected", (48, 64))])
def test_model_trains_and_its_loss_moves(toy_ws, model, res):
    run = train(toy_ws, tiny(model, run=f"moves-{model}", res=res))
    lines = metrics(run)
    losses_d = [m["loss_d"] for m in lines]
    losses_g = [m["loss_g"] for m in lines]
    assert all(math.isfinite(x) for x in losses_d + losses_g)
    assert max(losses_d) - min(losses_d) > 1e-3 and max(losses_g) - min(losses_g) > 1e-3
    first = load_file(str(run / "checkpoints" / "0000000000" / "G.safetensors"))
    final = weights(run)
    # every weight moved, but the city's gains of the base map's BatchNorm: the default model keeps
    # the city out of it (g_cond_from 1), so they see a zero embedding (the layout of the weights
    # stays that of g_cond_from 0, which runs written before the option have)
    unused = {"fc_norm.gain.weight", "fc_norm.bias.weight"} if model == "projected" else set()
    assert all(not torch.equal(first[k], final[k]) for k in final if k.endswith("weight") and k not in unused)
    assert all(torch.equal(first[k], final[k]) for k in unused)
    gen = runs.load_generator(run)                       # and what it saved samples at its resolution
    assert runs.sample(gen, [0, 1], [0, 1]).shape == (2, *res, 3)


def test_a_time_budget_stops_training_and_saves(toy_ws):
    run = train(toy_ws, tiny(run="budget", kimg=None, minutes=0.002))
    folder, images_seen = runs.latest_checkpoint(run)
    assert images_seen > 0 and images_seen % 8 == 0
    assert (run / "samples" / f"progress-{images_seen:010d}.png").is_file()


def test_the_gpu_scale_rule_sets_batch_rates_and_ema_and_dry_run_prints_it(toy_ws, capsys, monkeypatch):
    from neighbourhoods.train.config import resolve_config
    from neighbourhoods.train.scale import GPU_BATCH, MAX_LR

    one = resolve_config(TrainConfig(device="cuda"))
    assert (one.batch, one.lr_g, one.lr_d, one.ema_kimg) == (GPU_BATCH, pytest.approx(1e-3 * math.sqrt(2)),
                                                             pytest.approx(1e-3 * math.sqrt(2)), 20.0)
    cpu = resolve_config(TrainConfig())                                                # the measured CPU recipe
    assert (cpu.batch, cpu.lr_g, cpu.ema_kimg) == (32, 1e-3, 10.0)
    monkeypatch.setenv("WORLD_SIZE", "8")     # torchrun's count (or set by hand, to plan a run)
    eight = resolve_config(TrainConfig(device="cuda", gpu_hours=16, kimg=None))
    assert (eight.batch, eight.lr_g, eight.ema_kimg, eight.minutes, eight.kimg) == (512, MAX_LR, 160.0, 120.0, None)
    mine = resolve_config(TrainConfig(device="cuda", batch=128, lr_g=5e-4))           # what the user sets stays
    assert (mine.batch, mine.lr_g, mine.lr_d, mine.ema_kimg) == (128, 5e-4, pytest.approx(2e-3), 40.0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["train", "-w", str(toy_ws), "--res", "32x32", "--device", "cuda", "--gpu-hours", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "batch 256 = 64 per GPU x 4 GPU(s)" in out and "ema_kimg 80" in out
    assert "budget: 2 GPU-hours = 30 minutes per process" in out and '"batch": 256' in out
    monkeypatch.setenv("WORLD_SIZE", "many")
    with pytest.raises(NeighbourhoodsError, match="not a process count"):
        resolve_config(TrainConfig(device="cuda"))


# --- the rate schedule -----------------------------------------------------------------------------
def test_the_cosine_schedule_ends_at_a_quarter_of_the_rates_and_its_plan_is_written_in():
    from neighbourhoods.train import schedule

    assert schedule.lr_factor("constant", 10 ** 9) == 1.0
    assert schedule.lr_factor("cosine", 500) == 1.0                     # a time budget not planned yet
    assert schedule.lr_factor("cosine:1", 0) == 1.0
    assert schedule.lr_factor("cosine:1", 500) == pytest.approx((1 + schedule.LR_FLOOR) / 2)
    assert schedule.lr_factor("cosine:1", 1000) == schedule.lr_factor("cosine:1", 5000) == schedule.LR_FLOOR
    assert schedule.planned("cosine", 150) == "cosine:150" and schedule.planned("cosine:20", 150) == "cosine:20"
    assert schedule.planned("constant", 150) == "constant" and schedule.planned("cosine", None) == "cosine"
    assert schedule.planned_images(3000, 1000, 10.0, 100.0) == 3000 + 200 * 100
    for bad in ("linear", "cosine:0", "cosine:x", "constant:5", "cosine:inf", "cosine:-3"):
        with pytest.raises(NeighbourhoodsError, match="--lr-schedule"):
            schedule.parse(bad)


def test_a_cosine_run_plans_for_its_kimg_and_its_rates_follow_the_schedule(toy_ws, capsys):
    from neighbourhoods.train import schedule

    run = train(toy_ws, tiny(run="cosine", lr_schedule="cosine", kimg=0.032))
    config = json.loads((run / "config.json").read_text())
    assert config["lr_schedule"] == "cosine:0.032"
    _, state = runs.load_checkpoint(runs.latest_checkpoint(run)[0])
    for opt, base in (("opt_g", config["lr_g"]), ("opt_d", config["lr_d"])):   # the last step ran at 24 images
        assert state[opt]["param_groups"][0]["lr"] == pytest.approx(base * schedule.lr_factor("cosine:0.032", 24))
    assert main(["train", "-w", str(toy_ws), "--res", "32x32", "--kimg", "150", "--lr-schedule", "cosine",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "learning rates: cosine over 150 kimg, G 0.001 -> 0.00025" in out and '"lr_schedule": "cosine:150"' in out
    assert main(["train", "-w", str(toy_ws), "--lr-schedule", "linear", "--dry-run"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_time_budgeted_cosine_run_plans_by_its_rate_and_a_resume_keeps_the_plan(toy_ws, monkeypatch):
    from neighbourhoods.train import schedule

    monkeypatch.setattr(schedule, "PLAN_AFTER", 8)
    run = train(toy_ws, tiny(run="cosine-time", lr_schedule="cosine", kimg=0.032, minutes=60))
    # an hour at this rate buys far more than --kimg: the plan is --kimg, written into the run's schedule
    assert json.loads((run / "config.json").read_text())["lr_schedule"] == "cosine:0.032"
    train(toy_ws, tiny(run="cosine-time", lr_schedule="cosine", kimg=0.048, minutes=60, resume=True))
    assert json.loads((run / "config.json").read_text())["lr_schedule"] == "cosine:0.032"


def test_default_model_is_projected():
    assert TrainConfig().model == "projected"


# --- exact resume ----------------------------------------------------------------------------------
class Killed(BaseException):
    """Stands in for kill -9: nothing after it runs, no cleanup saves anything."""


def resume_config(model="dcgan", **overrides) -> TrainConfig:
    # augmentation, flips, a short EMA and a rate schedule exercise every piece of state that resume restores
    return tiny(model, augment="color,translation,cutout", mirror=True, ema_kimg=0.01, lr_schedule="cosine:0.04",
                **overrides)


@pytest.mark.parametrize("model", ["dcgan", "projected"])
def test_resume_after_stop_matches_an_uninterrupted_run(toy_ws, model):
    whole = train(toy_ws, resume_config(model, run=f"whole-{model}", kimg=0.032))
    part = train(toy_ws, resume_config(model, run=f"part-{model}", kimg=0.016))
    part = train(toy_ws, resume_config(model, run=f"part-{model}", kimg=0.032, resume=True))
    for net in ("G", "G_ema", "D"):
        assert_same_weights(weights(whole, net), weights(part, net))


def test_resume_after_kill_matches_an_uninterrupted_run(toy_ws, monkeypatch):
    whole = train(toy_ws, resume_config(run="whole-k", kimg=0.040))
    steps = {"n": 0}
    real_update = train_loop.update_ema

    def dying_update(*args):
        real_update(*args)
        steps["n"] += 1
        if steps["n"] == 3:          # after the 3rd step: the last checkpoint is at 16 images
            raise Killed

    monkeypatch.setattr(train_loop, "update_ema", dying_update)
    with pytest.raises(Killed):
        train(toy_ws, resume_config(run="killed", kimg=0.040))
    monkeypatch.undo()
    run = toy_ws / "runs" / "killed"
    assert runs.latest_checkpoint(run)[1] == 16
    train(toy_ws, resume_config(run="killed", kimg=0.040, resume=True))
    for net in ("G", "G_ema", "D"):
        assert_same_weights(weights(whole, net), weights(run, net))
    assert [m["images_seen"] for m in metrics(run)] == [8, 16, 24, 32, 40]   # the lost steps' lines are not doubled


def test_kill_during_checkpoint_write_keeps_the_last_good_one(toy_ws, monkeypatch):
    calls = {"n": 0}
    real_save = torch.save

    def torn_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:          # the checkpoint at 16 images: write half a file, then die
            Path(path).write_bytes(b"PK\x03\x04 torn")
            raise Killed
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(Killed):
        train(toy_ws, tiny(run="torn"))
    monkeypatch.undo()
    run = toy_ws / "runs" / "torn"
    folder, images_seen = runs.latest_checkpoint(run)
    assert images_seen == 0
    runs.load_generator(run)         # the last good checkpoint still loads
    train(toy_ws, tiny(run="torn", resume=True))
    assert runs.latest_checkpoint(run)[1] == 32
    assert not list((run / "checkpoints").glob(".tmp-*"))


KILL_SCRIPT = """
import os, sys, time, torch
import safetensors.torch as st
from neighbourhoods import train as t
torch.set_num_threads(1)
real_save = st.save_file
def slow_save(tensors, path, *a, **k):
    real_save(tensors, path, *a, **k)
    if "0000000016" in path:            # mid-checkpoint at 16 images: tell the test, then wait to be killed
        open(sys.argv[2], "w").close()
        time.sleep(60)
st.save_file = slow_save
t.train(sys.argv[1], t.TrainConfig(**eval(sys.argv[3])))
"""


def test_kill_9_during_a_checkpoint_write_leaves_a_resumable_run(toy_ws, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    ready = tmp_path / "ready"
    cfg = dict(model="dcgan", res=(32, 32), batch=8, kimg=0.032, min_city_photos=5, model_kwargs=TINY["dcgan"],
               snapshot_every=16, sample_every=16, tick_every=8, run="kill9", progress=False)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(toy_ws), str(ready), repr(cfg)])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "training never reached the checkpoint"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    run = toy_ws / "runs" / "kill9"
    assert list((run / "checkpoints").glob(".tmp-0000000016-*"))      # it died with a half-written folder
    assert runs.latest_checkpoint(run)[1] == 0                          # yet the last good one is intact
    runs.load_generator(run)
    train(toy_ws, TrainConfig(**cfg, resume=True))
    assert runs.latest_checkpoint(run)[1] == 32
    assert not list((run / "checkpoints").glob(".tmp-*"))


# --- broken checkpoints give clear errors ----------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(toy_ws) -> Path:
    return train(toy_ws, tiny(run="finished", kimg=0.016))


def _copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ws" / "runs" / "copy"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda ck: (ck / "G_ema.safetensors").write_bytes(b"\x00" * 10), "G_ema.safetensors is corrupt"),
    (lambda ck: (ck / "G_ema.safetensors").unlink(), "missing G_ema.safetensors"),
    (lambda ck: (ck.parent / "latest.json").write_text("{not json"), "latest.json is corrupt"),
    (lambda ck: (ck.parent / "latest.json").unlink(), "latest.json is missing"),
])
def test_damaged_checkpoint_fails_to_load_with_a_clear_error(finished_run, tmp_path, damage, message):
    run = _copy_run(finished_run, tmp_path)
    damage(run / "checkpoints" / "0000000016")
    with pytest.raises(NeighbourhoodsError, match=message):
        runs.load_generator(run)


@pytest.mark.parametrize("file", ["state.pt", "D.safetensors"])
def test_resume_from_a_torn_checkpoint_fails_with_a_clear_error(toy_ws, finished_run, file):
    run = toy_ws / "runs" / f"torn-{file}"
    shutil.copytree(finished_run, run)
    path = run / "checkpoints" / "0000000016" / file
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(NeighbourhoodsError, match=f"{file} is corrupt"):
        train(toy_ws, tiny(run=run.name, resume=True))


def test_starting_an_existing_run_without_resume_is_refused(toy_ws, finished_run):
    with pytest.raises(NeighbourhoodsError, match="already exists.*--resume"):
        train(toy_ws, tiny(run="finished"))


def test_resuming_a_run_that_does_not_exist_is_refused(toy_ws):
    with pytest.raises(NeighbourhoodsError, match="nothing to resume"):
        train(toy_ws, tiny(run="never-started", resume=True))


# --- non-finite losses -----------------------------------------------------------------------------
def test_non_finite_loss_rolls_back_to_the_last_checkpoint(toy_ws, monkeypatch, capsys):
    calls = {"n": 0}
    real_loss = train_loss.d_loss

    def flaky_loss(*args):
        calls["n"] += 1
        loss = real_loss(*args)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_loss, "d_loss", flaky_loss)
    run = train(toy_ws, tiny(run="nan-once", progress=True))
    out = capsys.readouterr().out
    assert "non-finite loss" in out and "rolled back to the checkpoint at 16 images" in out
    assert runs.latest_checkpoint(run)[1] == 32
    assert all(torch.isfinite(t).all() for t in weights(run).values())
    state = torch.load(runs.latest_checkpoint(run)[0] / "state.pt", weights_only=True)
    assert state["rollbacks"] == 1


def test_repeated_non_finite_losses_stop_with_an_error(toy_ws, monkeypatch):
    monkeypatch.setattr(train_loss, "d_loss", lambda *args: torch.tensor(float("inf"), requires_grad=True))
    with pytest.raises(NeighbourhoodsError, match="non-finite loss.*giving up"):
        train(toy_ws, tiny(run="nan-always"))


# --- devices ---------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(toy_ws):
    with pytest.raises(NeighbourhoodsError, match="no CUDA GPU"):
        train(toy_ws, tiny(run="cuda", device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trains_on_a_gpu_with_mixed_precision(toy_ws, amp):
    run = train(toy_ws, tiny("projected", run=f"cuda-{amp}", device="cuda", amp=amp, res=(48, 64)))
    assert all(math.isfinite(m["loss_d"]) and math.isfinite(m["loss_g"]) for m in metrics(run))
    gen = runs.load_generator(run, device="cuda")
    assert runs.sample(gen, [0], [0]).shape == (1, 48, 64, 3)


# --- 4:3 and the run API ---------------------------------------------------------------------------
def test_four_by_three_trains_and_samples_end_to_end(toy_ws):
    run = train(toy_ws, tiny(run="wide", res=(48, 64), kimg=0.016))
    gen = runs.load_generator(run)
    assert gen.res == (48, 64) and gen.images_seen == 16
    images = runs.sample(gen, [gen.class_index("Sunvale")] * 2, [1, 2])
    assert images.shape == (2, 48, 64, 3) and images.dtype == np.uint8
    from PIL import Image
    assert Image.open(run / "samples" / "progress-0000000016.png").height == 4 * (48 + 2)


def test_sample_depends_only_on_class_and_seed(finished_run):
    gen = runs.load_generator(finished_run)
    together = runs.sample(gen, [0, 1, 2, 3], [10, 11, 12, 13], batch_size=4)
    alone = np.concatenate([runs.sample(gen, [c], [s]) for c, s in zip([0, 1, 2, 3], [10, 11, 12, 13])])
    assert np.abs(together.astype(int) - alone.astype(int)).max() <= 1   # float reassociation at most
    assert not np.array_equal(together[0], together[1])


def test_unknown_city_names_close_matches(finished_run):
    gen = runs.load_generator(finished_run)
    assert gen.class_index("sunvale") == gen.class_names.index("Sunvale")
    with pytest.raises(NeighbourhoodsError, match="close matches: Sunvale"):
        gen.class_index("Sunvalle")


def test_resolve_run_names_the_runs_there_are(toy_ws, finished_run):
    ws = open_workspace(toy_ws)
    assert runs.resolve_run(ws, "finished") == finished_run.resolve()
    assert runs.resolve_run(ws, str(finished_run)) == finished_run.resolve()
    with pytest.raises(NeighbourhoodsError, match="no training run 'nope'.*finished"):
        runs.resolve_run(ws, "nope")


# --- pieces ----------------------------------------------------------------------------------------
def test_small_cities_share_the_any_city_class():
    names = ["Big", "Small", "Mid", "Empty"]
    labels = np.array([0] * 10 + [1] * 2 + [2] * 5 + [-1])
    class_names, classes, merged = class_map(names, labels, min_city_photos=5)
    assert class_names == ["Big", "Mid", "(any city)"]
    assert merged == ["Small"]
    assert classes.tolist() == [0] * 10 + [2] * 2 + [1] * 5 + [2]


def test_every_city_large_enough_means_no_any_city_class():
    class_names, classes, _ = class_map(["A", "B"], np.array([0, 0, 1, 1]), min_city_photos=2)
    assert class_names == ["A", "B"] and classes.tolist() == [0, 0, 1, 1]


def test_ema_half_life_ramps_up_with_images_seen():
    cfg = TrainConfig(batch=64, ema_kimg=10.0)
    # at 20k images the half-life is 1k images (5%), not 10k: the EMA forgets the random init
    assert ema_beta(cfg, 20_000) == pytest.approx(0.5 ** (64 / 1000))
    assert ema_beta(cfg, 10_000_000) == pytest.approx(0.5 ** (64 / 10_000))
    assert ema_beta(replace(cfg, ema_kimg=0.0), 20_000) == 0.0


def test_standing_statistics_make_eval_samples_match_batch_statistics():
    from neighbourhoods.models.dcgan import Generator

    torch.manual_seed(0)
    G = Generator(3, (32, 32), z_dim=16, embed_dim=4, ngf=8)
    with torch.no_grad():   # a few "training" batches from another distribution leave G's running stats stale
        for _ in range(3):
            G(torch.randn(64, 16) * 3 + 1, torch.zeros(64, dtype=torch.long))
    z, labels = torch.randn(512, 16), torch.randint(0, 3, (512,))
    with torch.no_grad():
        batch_stats = G.train()(z, labels)
        stale = G.eval()(z, labels)
    rng = torch.get_rng_state()
    train_ema.standing_bn_stats(G, np.ones(3) / 3, images=512, batch=64, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)                  # the run's RNG stream is untouched
    with torch.no_grad():
        standing = G(z, labels)
    assert not G.training
    assert (standing - batch_stats).abs().mean() < 0.5 * (stale - batch_stats).abs().mean()


def test_data_order_is_a_function_of_images_seen():
    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    reader = train_data.BatchReader(images, np.arange(10), np.zeros(10, dtype=np.int64), seed=3, mirror=False,
                                   rank=0, world=1, workers=0)
    epoch = torch.cat([reader.get(p, 5)[0] for p in (0, 5)])
    assert len({bytes(x.numpy()) for x in epoch}) == 10                     # every photo once per epoch
    assert torch.equal(reader.get(5, 5)[0], epoch[5:])                      # same position, same batch
    halves = [train_data.BatchReader(images, np.arange(10), np.zeros(10, dtype=np.int64), seed=3, mirror=False,
                                    rank=r, world=2, workers=0).get(0, 4)[0] for r in (0, 1)]
    assert torch.equal(torch.stack([halves[0][0], halves[1][0], halves[0][1], halves[1][1]]), epoch[:4])


# --- CLI -------------------------------------------------------------------------------------------
def test_cli_trains_and_resumes(toy_ws, capsys):
    args = ["train", "--workspace", str(toy_ws), "--res", "32x32", "--model", "dcgan", "--kimg", "0.008",
            "--batch", "8", "--run", "cli", "--min-city-photos", "5", "--no-upscaler",
            "--model-kwargs", json.dumps(TINY["dcgan"])]
    assert main(args) == 0
    assert main(args[:-2] + ["--kimg", "0.016", "--resume"] + args[-2:]) == 0
    assert runs.latest_checkpoint(toy_ws / "runs" / "cli")[1] == 16


def test_cli_reports_user_errors_in_one_line(toy_ws, capsys):
    assert main(["train", "--workspace", str(toy_ws), "--res", "40x40", "--model", "dcgan", "--kimg", "0.008"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no prepared data at 40x40") and err.count("\n") == 1


# --- real photos -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_trains_on_real_listing_photos_at_four_by_three(shared_data, tmp_path):
    """70 socal exteriors from each of 3 cities (linked, not copied) -> ingest at 48x64 -> a few dcgan steps -> samples."""
    import csv
    import os

    from neighbourhoods.ingest import ingest

    rows = list(csv.DictReader(open(shared_data / "socal" / "listings.csv")))
    top = {"San Diego, CA", "Lancaster, CA", "Palmdale, CA"}
    picked = [r for city in sorted(top) for r in [r for r in rows if r["city"] == city][:70]]
    photos = tmp_path / "photos"
    photos.mkdir()
    for r in picked:
        os.symlink(shared_data / "socal" / "images" / r["file"], photos / r["file"])
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["file", "city"]] + [[r["file"], r["city"]] for r in picked])
    ws = tmp_path / "ws"
    ingest(photos, ws, labels=labels, res=[(48, 64)], workers=1, progress=False)
    run = train(ws, tiny(run="real", res=(48, 64), min_city_photos=20))
    gen = runs.load_generator(run)
    assert set(gen.class_names) >= top
    images = runs.sample(gen, [gen.class_index("San Diego, CA")] * 3, [0, 1, 2])
    assert images.shape == (3, 48, 64, 3) and images.std() > 0


# --- mode seeking (MSGAN) --------------------------------------------------------------------------
def test_mode_seeking_pairs_each_fake_with_one_of_the_same_city():
    paired = train_loss.paired(torch.tensor([3, 1, 4, 1, 5, 9, 2]))
    assert paired.tolist() == [3, 1, 4, 3, 1, 4, 2]   # i and i + N/2 share a city; an odd last one stays


def test_mode_seeking_loss_is_large_when_two_latents_give_one_image():
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    distinct = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    collapsed = distinct[:1].expand(8, -1, -1, -1)
    assert train_loss.mode_seeking_loss(collapsed, z) > 1000 * train_loss.mode_seeking_loss(distinct, z)


def test_mode_seeking_term_alone_makes_one_citys_samples_differ_more():
    from neighbourhoods.models import build_generator
    torch.manual_seed(0)
    G = build_generator("projected", 2, (32, 32), **TINY["projected"])
    opt = torch.optim.Adam(G.parameters(), lr=1e-3)
    z = torch.randn(16, G.z_dim, generator=torch.Generator().manual_seed(2))
    city = torch.zeros(16, dtype=torch.long)

    def spread() -> float:
        with torch.no_grad():
            return G(z, city).std(0).mean().item()

    before = spread()
    for _ in range(10):
        loss = train_loss.mode_seeking_loss(G(z, city), z)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert spread() > 1.5 * before


def test_structure_space_ignores_exposure_and_sees_layout():
    g = torch.Generator().manual_seed(3)
    house = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, scale_factor=4)   # blocks
    brighter = (house * 0.8 + 0.1) * torch.tensor([1.0, 0.95, 0.9])[None, :, None, None]   # exposure, white balance
    mirrored = house.flip(-1)                                                            # the same blocks, moved
    z = torch.randn(4, 8, generator=g)
    # as pixels, the brighter copy is a different image (cheap to buy); as structure, the same one
    exposure = train_loss.mode_seeking_loss(torch.cat([house, brighter]), z)
    layout = train_loss.mode_seeking_loss(torch.cat([house, mirrored]), z)
    assert exposure > 20 * layout   # a brighter copy of one house is still one house; a moved one is another


def test_g_cond_from_keeps_the_city_out_of_the_early_levels():
    from neighbourhoods.models import build_generator
    torch.manual_seed(0)
    G = build_generator("projected", 3, (32, 32), g_cond_from=2, **TINY["projected"]).eval()
    with torch.no_grad():   # the city's embeddings and BN gains nonzero, as after training
        for name, prm in G.named_parameters():
            if "embed" in name or ".gain." in name or ".bias." in name:
                prm.normal_(0, 0.5)
    levels = []
    hooks = [b.register_forward_hook(lambda m, i, o: levels.append(o)) for b in G.blocks]
    z = torch.randn(1, G.z_dim).expand(2, -1)
    with torch.no_grad():
        out = G(z, torch.tensor([0, 2]))
    for h in hooks:
        h.remove()
    assert torch.equal(levels[0][0], levels[0][1])           # level 1: the same for both cities
    assert not torch.allclose(levels[1][0], levels[1][1])    # level 2 on: the city styles it
    assert not torch.allclose(out[0], out[1])


def test_a_new_run_writes_the_recipes_builder_arguments_and_an_old_run_keeps_its_own(toy_ws):
    run = train(toy_ws, tiny("projected", run="cond-from", kimg=0.016))
    config = json.loads((run / "config.json").read_text())
    assert config["model_kwargs"]["g_cond_from"] == 1 and config["model_args"]["kwargs"]["g_cond_from"] == 1
    # a run from before the option: its config.json has no g_cond_from, and it resumes as it was built
    for block in (config["model_kwargs"], config["model_args"]["kwargs"]):
        del block["g_cond_from"], block["feature_min_side"]
    (run / "config.json").write_text(json.dumps(config))
    result = train_mod.train_models(toy_ws, tiny("projected", run="cond-from", kimg=0.032, resume=True))
    assert result.G.cond_from == 0
    assert result.D.feature_scale == 1.0      # its D's feature net sees the images as they are, as it trained
    assert "g_cond_from" not in json.loads((run / "config.json").read_text())["model_kwargs"]
    assert runs.load_generator(run).model.cond_from == 0
    # the caller's value wins over the recipe's
    run = train(toy_ws, tiny("projected", run="cond-from-2", kimg=0.016, model_kwargs={**TINY["projected"], "g_cond_from": 2}))
    assert json.loads((run / "config.json").read_text())["model_kwargs"]["g_cond_from"] == 2
    # left out, D's feature net gets the recipe's minimum side (runs from before it: their own size)
    from neighbourhoods.train.config import resolve_run
    _, cfg, _ = resolve_run(open_workspace(toy_ws), TrainConfig(model="projected", run="recipe", kimg=1))
    assert cfg.model_kwargs == {"g_cond_from": 1, "feature_min_side": 96}
    # the city's level follows the size (1/8 of the shorter side): 12x16 at the website's 96x128
    _, cfg, _ = resolve_run(open_workspace(toy_ws), TrainConfig(model="projected", run="recipe", kimg=1,
                                                                res=Resolution(96, 128)))
    assert cfg.model_kwargs == {"g_cond_from": 2, "feature_min_side": 96}


def test_default_model_trains_with_mode_seeking_and_dcgan_without(toy_ws):
    assert train_mod.resolve_config(TrainConfig(model="projected")).mode_seeking > 0
    assert train_mod.resolve_config(TrainConfig(model="dcgan")).mode_seeking == 0
    with pytest.raises(NeighbourhoodsError, match="mode-seeking"):
        train_mod.resolve_config(TrainConfig(mode_seeking=-1.0))


def test_a_run_from_before_mode_seeking_resumes_without_it(toy_ws):
    run = train(toy_ws, tiny("projected", run="pre-ms", kimg=0.016))
    config = json.loads((run / "config.json").read_text())
    assert config["mode_seeking"] > 0
    del config["mode_seeking"]   # as written before the option existed
    (run / "config.json").write_text(json.dumps(config))
    train(toy_ws, tiny("projected", run="pre-ms", kimg=0.032, resume=True))
    assert json.loads((run / "config.json").read_text())["mode_seeking"] == 0.0


# --- what the loss logs ----------------------------------------------------------------------------
def test_every_term_of_the_loss_is_logged_per_tick_with_ds_logits(toy_ws):
    run = train(toy_ws, tiny("projected", run="terms", kimg=0.016))
    for line in metrics(run):
        assert {"loss_d", "loss_g", "d_real", "d_fake", "g_adv", "g_mode_seeking", "g_layout"} <= line.keys()
        assert all(math.isfinite(line[k]) for k in ("d_real", "d_fake", "g_adv", "g_mode_seeking", "g_layout"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/d_real", "train/d_fake", "train/g_mode_seeking", "train/g_layout"} <= set(events.Tags()["scalars"])


def test_gs_loss_is_the_sum_of_its_logged_terms_at_their_weights():
    from neighbourhoods.models import build

    torch.manual_seed(0)
    G, D = build("projected", 3, (32, 32), layouts=4, layout_dim=6, **TINY["projected"])
    loss = train_loss.GANLoss(G=G, G_train=G, D=D, D_train=D, kind="hinge", mode_seeking=0.5, layout_weight=2.0)
    z, labels = torch.randn(8, G.z_dim), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    fakes = loss.fakes(z=z, labels=labels)
    assert fakes.labels[4:].tolist() == fakes.labels[:4].tolist()          # pairs of one city ...
    assert torch.equal(fakes.layouts[4:], fakes.layouts[:4])               # ... drawn on one layout
    total, terms = loss.generator(fakes=fakes)
    expected = terms["g_adv"] + 0.5 * terms["g_mode_seeking"] + 2.0 * terms["g_layout"]
    assert torch.isclose(total.detach(), expected)
    _, d_terms = loss.discriminator(real=torch.rand(8, 3, 32, 32) * 2 - 1, labels=labels, fakes=fakes)
    assert set(d_terms) == {"d_real", "d_fake"}


# --- removed options ---------------------------------------------------------------------------------
def test_train_config_has_at_most_thirty_fields():
    from dataclasses import fields

    assert len(fields(TrainConfig)) <= 30


@pytest.mark.parametrize("flag", ["--spectral", "--instance-k", "--loss", "--mode-seeking-space", "--grid-rows"])
def test_a_removed_option_given_to_train_is_a_one_line_error_that_says_why(toy_ws, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--workspace", str(toy_ws), flag, "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} was removed: ") and "06f09c2" in err and err.count("\n") == 1


OLD_OFF = {"loss": "hinge", "betas": [0.0, 0.99], "spectral": 0.0, "lecam": 0.0, "feature_mmd": 0.0,
           "cond_start_kimg": 0.0, "cond_full_kimg": 0.0, "instance_k": 0, "mode_seeking_space": "structure",
           "city_init": "random", "d_blur_sigma": 0.0, "d_blur_kimg": 0.0, "any_city_p": 0.0, "ema_rampup": 0.05,
           "layout_weight": 1.0, "pair_layouts": True, "grow_fade_kimg": 10.0, "kid_images": 300, "grid_rows": 12,
           "grid_seeds": 8, "max_rollbacks": 3}
OLD_KWARGS = {"g_cond_bn": True, "d_batchnorm": True, "feature_res": 1.0, "d_mbstd": 0, "instances": 0,
              "instance_dim": 64}


def _as_written_before(run: Path, **changes) -> None:
    """Rewrite the run's config.json as a run of 06f09c2 wrote it: every removed option in it."""
    config = json.loads((run / "config.json").read_text())
    config.update({**OLD_OFF, **changes})
    for block in (config["model_kwargs"], config["model_args"]["kwargs"]):
        block.update(OLD_KWARGS)
    (run / "config.json").write_text(json.dumps(config))


def test_a_run_written_with_removed_options_at_their_off_values_loads_generates_serves_and_resumes(toy_ws, tmp_path):
    run = train(toy_ws, tiny("projected", run="old-off", kimg=0.016))
    _as_written_before(run)
    assert runs.load_generator(run).model.z_dim == 16
    assert main(["generate", "--workspace", str(toy_ws), "--run", "old-off", "--city", "Sunvale", "-n", "2",
                 "--size", "40x30", "--no-novelty-guard", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*/*.jpg"))) == 2
    from fastapi.testclient import TestClient

    from neighbourhoods.serve import ServeConfig, build, create_app

    with TestClient(create_app(build(toy_ws, "old-off", ServeConfig(), novelty=False))) as client:
        r = client.get("/thumbnail", params={"city": "Sunvale", "seed": 3, "size": "40x30"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/")
    train(toy_ws, tiny("projected", run="old-off", kimg=0.032, resume=True))
    assert runs.latest_checkpoint(run)[1] == 32


@pytest.mark.parametrize("changes, named", [({"spectral": 0.3}, "spectral"), ({"loss": "rpgan"}, "loss"),
                                             ({"mode_seeking_space": "features"}, "mode_seeking_space")])
def test_a_run_trained_with_a_removed_option_on_refuses_to_resume_in_one_line(toy_ws, changes, named):
    run = train(toy_ws, tiny("projected", run=f"old-on-{named}", kimg=0.008))
    _as_written_before(run, **changes)
    with pytest.raises(NeighbourhoodsError, match=f"trained with {named}=.*was removed.*06f09c2"):
        train(toy_ws, tiny("projected", run=f"old-on-{named}", kimg=0.016, resume=True))


def test_a_generator_built_with_a_removed_argument_on_is_a_one_line_error():
    from neighbourhoods.models import build_generator

    with pytest.raises(NeighbourhoodsError, match="instances=12 was removed"):
        build_generator("projected", 3, (32, 32), instances=12, **TINY["projected"])


# --- options: one declaration, resolved in one place -----------------------------------------------
def test_every_train_flag_comes_from_a_config_field_with_its_help():
    import argparse
    from dataclasses import fields

    from neighbourhoods.train.config import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    dests = {a.dest: a for a in parser._actions if a.dest != "help" and a.help != argparse.SUPPRESS}
    assert set(dests) == {f.name for f in fields(TrainConfig)}   # (removed options answer why, unlisted)
    for f in fields(TrainConfig):
        assert (f.metadata["flag_help"] or f.metadata["help"]) in dests[f.name].help.replace("%%", "%")
        assert dests[f.name].default is None           # an option left out is not passed on


def test_dry_run_prints_the_resolved_options_and_trains_nothing(toy_ws, capsys):
    args = ["train", "--workspace", str(toy_ws), "--res", "32x32", "--model", "dcgan", "--run", "dry", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    resolved = json.loads(out[out.index("{"):])
    assert resolved["model"] == "dcgan" and resolved["res"] == [32, 32] and resolved["run"] == "dry"
    assert resolved["lr_g"] == 2e-4 and resolved["batch"] == 64   # dcgan's recipe
    assert not (toy_ws / "runs" / "dry").exists()


def test_dry_run_of_a_resume_shows_the_runs_own_values(toy_ws, capsys):
    train(toy_ws, tiny(run="dry-resume", kimg=0.008))
    args = ["train", "--workspace", str(toy_ws), "--run", "dry-resume", "--resume", "--batch", "16", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "note: resuming with the run's own batch=8" in out
    assert json.loads(out[out.index("{"):])["batch"] == 8


def test_a_resolution_the_model_cannot_build_fails_before_any_data_is_read(toy_ws, capsys):
    assert main(["train", "--workspace", str(toy_ws), "--res", "40x40", "--kimg", "0.008", "--dry-run"]) == 0
    assert main(["train", "--workspace", str(toy_ws), "--res", "96x96", "--model", "dcgan", "--dry-run"]) == 0
    assert main(["train", "--workspace", str(toy_ws), "--res", "24x80", "--model", "dcgan", "--kimg", "0.008"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'dcgan' cannot train at 24x80: dcgan needs a base of 3-8 px") and err.count("\n") == 1


def test_a_bad_flag_value_is_a_usage_error_not_a_traceback(toy_ws, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--workspace", str(toy_ws), "--res", "64"])
    assert exit_info.value.code == 2
    assert "bad value '64' for --res" in capsys.readouterr().err


# --- speed defaults and the resolution the photos support -------------------------------------------
def test_mixed_precision_follows_the_device_and_the_cpu():
    from neighbourhoods.train import distributed

    cpu = torch.device("cpu")
    assert distributed.autocast_dtype("off", cpu) is None
    assert distributed.autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(NeighbourhoodsError, match="fp16 needs CUDA"):
        distributed.autocast_dtype("fp16", cpu)
    auto = distributed.autocast_dtype("auto", cpu)
    assert auto == (torch.bfloat16 if distributed.cpu_has_native_bf16() else None)
    assert distributed.autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_bf16_on_the_cpu_trains_and_resumes_exactly(toy_ws):
    whole = train(toy_ws, resume_config("projected", run="bf16-whole", amp="bf16"))
    train(toy_ws, resume_config("projected", run="bf16-part", amp="bf16", kimg=0.016))
    part = train(toy_ws, resume_config("projected", run="bf16-part", amp="bf16", resume=True))
    fp32 = train(toy_ws, resume_config("projected", run="fp32-whole", amp="off"))
    for net in ("G", "G_ema", "D"):
        assert_same_weights(weights(whole, net), weights(part, net))
    assert any(not torch.equal(weights(whole)[k], weights(fp32)[k]) for k in weights(whole))   # it did use bf16


def test_the_reader_thread_is_on_for_cuda_only(toy_ws, monkeypatch):
    seen = []
    real = train_data.BatchReader.__init__

    def spy(self, *args, **kwargs):
        seen.append(args[7])    # workers
        real(self, *args, **kwargs)

    monkeypatch.setattr(train_data.BatchReader, "__init__", spy)
    train(toy_ws, tiny(run="workers-default", num_workers=None))
    train(toy_ws, tiny(run="workers-2", num_workers=2))
    assert seen == [0, 2]


def test_supported_resolution_is_the_largest_of_the_photos_aspect_they_cover():
    from neighbourhoods.core.resolution import supported_resolution

    assert supported_resolution(128, 96) == (96, 128)       # socal: 4:3, nothing enlarged
    assert supported_resolution(640, 480) == (384, 512)
    assert supported_resolution(100, 100) == (64, 64)
    assert supported_resolution(96, 128) == (128, 96)       # portrait
    assert supported_resolution(130, 90) == (48, 64)        # 96 rows would need enlarging
    assert supported_resolution(12, 12) is None


def test_ingest_reports_the_supported_size_and_train_notes_a_run_far_below_it(tmp_path, capsys):
    from neighbourhoods.demo.toytown import draw_toytown
    from neighbourhoods.ingest import ingest

    photos, labels = draw_toytown(tmp_path / "town", cities=("Pinecrest", "Sunvale"), per_city=12)
    summary = ingest(photos, tmp_path / "ws", labels=labels, res=[(32, 32), (96, 128)], holdout_min=1000,
                     workers=1, progress=False)
    assert summary.photo_size == "128x96" and summary.supported_res == "96x128"
    assert "train at --res 96x128" in summary.describe()
    cfg = tiny(run="low", min_city_photos=5, progress=True)
    train(tmp_path / "ws", cfg)
    captured = capsys.readouterr()
    assert "the photos support 96x128" in captured.out + captured.err
