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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny nets gain nothing from a second thread, and on a shared machine its spin-waits cost 20x
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy_ws(tmp_path_factory) -> Path:
    return make_toy_workspace(tmp_path_factory.mktemp("toy"))


def tiny(model="dcgan", **overrides) -> TrainConfig:
    """A config for a few steps: batch 8, checkpoints every 2 steps, quiet."""
    cfg = TrainConfig(model=model, res=(32, 32), batch=8, kimg=0.032, min_city_photos=5, model_kwargs=TINY[model],
                      snapshot_every=16, sample_every=16, tick_every=8, grid_rows=4, grid_seeds=3,
                      bn_stat_images=16, num_workers=1, progress=False)
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
    assert grid.width > 3 * (32 + 2)                     # 3 seeds plus the name margin


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


def test_default_model_is_projected():
    assert TrainConfig().model == "projected"


# --- exact resume ----------------------------------------------------------------------------------
class Killed(BaseException):
    """Stands in for kill -9: nothing after it runs, no cleanup saves anything."""


def resume_config(model="dcgan", **overrides) -> TrainConfig:
    # augmentation, flips and a short EMA exercise every piece of state that resume restores
    return tiny(model, augment="color,translation,cutout", mirror=True, ema_kimg=0.01, **overrides)


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
               snapshot_every=16, sample_every=16, tick_every=8, bn_stat_images=16, run="kill9", progress=False)
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
        train(toy_ws, tiny(run="nan-always", max_rollbacks=2))


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
    cfg = TrainConfig(batch=64, ema_kimg=10.0, ema_rampup=0.05)
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
            "--batch", "8", "--run", "cli", "--min-city-photos", "5", "--model-kwargs", json.dumps(TINY["dcgan"])]
    assert main(args) == 0
    assert main(args[:-2] + ["--kimg", "0.016", "--resume"] + args[-2:]) == 0
    assert runs.latest_checkpoint(toy_ws / "runs" / "cli")[1] == 16


def test_cli_reports_user_errors_in_one_line(toy_ws, capsys):
    assert main(["train", "--workspace", str(toy_ws), "--res", "40x40", "--model", "dcgan", "--kimg", "0.008"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no prepared data at 40x40") and err.count("\n") == 1


def test_any_city_share_relabels_a_fixed_fraction_of_photos():
    images = np.zeros((1000, 2, 2, 3), dtype=np.uint8)
    reader = train_data.BatchReader(images, np.arange(1000), np.zeros(1000, dtype=np.int64), seed=0, mirror=False,
                                   rank=0, world=1, workers=0, any_class=7, any_p=0.25)
    labels = reader.get(0, 1000)[1]
    assert set(labels.tolist()) == {0, 7}
    assert 200 < int((labels == 7).sum()) < 300
    assert torch.equal(labels, reader.get(0, 1000)[1])      # the same photos every time at this position


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


# --- relativistic pairing (R3GAN's RpGAN) ---------------------------------------------------------
def test_relativistic_pairing_judges_each_fake_against_its_own_real():
    real = [torch.tensor([[3.0], [0.0]]), torch.tensor([[1.0], [-1.0]])]
    fake = [torch.tensor([[0.0], [3.0]]), torch.tensor([[-1.0], [1.0]])]
    swapped = [t.flip(0) for t in real]
    for loss in (train_loss.d_loss, lambda kind, r, f: train_loss.g_loss(kind, f, r)):
        # only the differences count: shifting every logit changes nothing ...
        assert torch.isclose(loss("rpgan", real, fake), loss("rpgan", [t + 5 for t in real], [t + 5 for t in fake]))
        # ... but which real a fake is paired with does, unlike the hinge loss
        assert not torch.isclose(loss("rpgan", real, fake), loss("rpgan", swapped, fake))
    assert torch.isclose(train_loss.d_loss("hinge", real, fake), train_loss.d_loss("hinge", swapped, fake))
    # G's loss falls as a fake overtakes its real
    assert train_loss.g_loss("rpgan", [real[0] + 1], [real[0]]) < train_loss.g_loss("rpgan", [real[0] - 1], [real[0]])


def test_the_default_model_trains_with_the_relativistic_loss(toy_ws):
    run = train(toy_ws, tiny("projected", run="rpgan", loss="rpgan"))
    lines = metrics(run)
    assert json.loads((run / "config.json").read_text())["loss"] == "rpgan"
    assert all(math.isfinite(m["loss_d"]) and math.isfinite(m["loss_g"]) for m in lines)
    first = load_file(str(run / "checkpoints" / "0000000000" / "G.safetensors"))
    assert not torch.equal(first["to_rgb.weight"], weights(run)["to_rgb.weight"])


def test_an_unknown_loss_is_refused_in_one_line(toy_ws):
    with pytest.raises(NeighbourhoodsError, match="unknown loss 'wgan': use bce, hinge, rpgan"):
        train(toy_ws, tiny("projected", run="wgan", loss="wgan"))


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
    exposure_px = train_loss.mode_seeking_loss(torch.cat([house, brighter]), z)
    exposure_st = train_loss.mode_seeking_loss(torch.cat([house, brighter]), z, "structure")
    layout_st = train_loss.mode_seeking_loss(torch.cat([house, mirrored]), z, "structure")
    assert exposure_st > 5 * exposure_px and exposure_st > 20 * layout_st


def test_feature_space_counts_what_the_features_see_in_units_of_the_batchs_spread():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(8, 16, generator=g)
    fake = torch.zeros(8, 3, 8, 8)   # the pixels do not matter in this space
    feats = torch.randn(8, 32, generator=g)
    same = torch.cat([feats[:4], feats[:4]])   # each pair one feature vector: two latents, one house
    assert train_loss.mode_seeking_loss(fake, z, "features", same) > 1000 * train_loss.mode_seeking_loss(fake, z, "features", feats)
    # scaling every feature leaves it (all but the small epsilon) unchanged: standardised over the batch
    scaled = train_loss.mode_seeking_loss(fake, z, "features", 10 * feats)
    assert torch.isclose(scaled, train_loss.mode_seeking_loss(fake, z, "features", feats), rtol=1e-2)
    with pytest.raises(ValueError, match="pooled features"):
        train_loss.mode_seeking_loss(fake, z, "features")
    # the gradient reaches the features (G, through D's frozen feature net, in training)
    feats.requires_grad_(True)
    train_loss.mode_seeking_loss(fake, z, "features", feats).backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


def test_structure_plus_features_is_the_sum_of_the_two_terms():
    g = torch.Generator().manual_seed(5)
    z, fake = torch.randn(8, 16, generator=g), torch.rand(8, 3, 16, 16, generator=g)
    feats = torch.randn(8, 32, generator=g)
    ms = train_loss.mode_seeking_loss
    both = ms(fake, z, "structure+features", feats)
    assert torch.isclose(both, ms(fake, z, "structure") + ms(fake, z, "features", feats))
    assert both > ms(fake, z, "structure")
    with pytest.raises(ValueError, match="pooled features"):
        ms(fake, z, "structure+features")


@pytest.mark.parametrize("space", ["features", "structure+features"])
def test_feature_space_mode_seeking_trains_the_default_model_and_needs_a_feature_net(toy_ws, space):
    run = train(toy_ws, tiny("projected", run="ms-" + space.replace("+", "-"), kimg=0.016, mode_seeking=0.5,
                             mode_seeking_space=space))
    assert json.loads((run / "config.json").read_text())["mode_seeking_space"] == space
    with pytest.raises(NeighbourhoodsError, match="no pretrained feature net"):
        train_mod.resolve_config(TrainConfig(model="dcgan", mode_seeking=0.5, mode_seeking_space=space))


def test_mode_seeking_space_is_a_run_field_checked_in_one_line(toy_ws):
    assert train_mod.resolve_config(TrainConfig()).mode_seeking_space in ("pixels", "structure")
    with pytest.raises(NeighbourhoodsError, match="mode-seeking-space"):
        train_mod.resolve_config(TrainConfig(mode_seeking_space="votes"))
    run = train(toy_ws, tiny("projected", run="ms-structure", kimg=0.016, mode_seeking_space="structure"))
    assert json.loads((run / "config.json").read_text())["mode_seeking_space"] == "structure"
    train(toy_ws, tiny("projected", run="ms-structure", kimg=0.032, resume=True))   # the run's value, not the default
    assert json.loads((run / "config.json").read_text())["mode_seeking_space"] == "structure"


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


def test_default_model_trains_with_mode_seeking_and_dcgan_without(toy_ws):
    assert train_mod.resolve_config(TrainConfig(model="projected")).mode_seeking > 0
    assert train_mod.resolve_config(TrainConfig(model="dcgan")).mode_seeking == 0
    with pytest.raises(NeighbourhoodsError, match="mode-seeking"):
        train_mod.resolve_config(TrainConfig(mode_seeking=-1.0))


def test_a_run_from_before_mode_seeking_resumes_without_it(toy_ws):
    run = train(toy_ws, tiny("projected", run="pre-ms", kimg=0.016))
    config = json.loads((run / "config.json").read_text())
    assert config["mode_seeking"] > 0
    del config["mode_seeking"], config["pair_layouts"]   # as written before the options existed
    (run / "config.json").write_text(json.dumps(config))
    train(toy_ws, tiny("projected", run="pre-ms", kimg=0.032, resume=True))
    assert json.loads((run / "config.json").read_text())["mode_seeking"] == 0.0


def resumes_exactly(ws, name: str, **options) -> tuple[Path, Path]:
    """A run with `options` trained whole and in two parts (the second resumed, so it takes the
    options from its config.json) ends bit-for-bit the same; returns (resumed run, run without)."""
    whole = train(ws, resume_config("projected", run=f"{name}-whole", kimg=0.032, **options))
    train(ws, resume_config("projected", run=f"{name}-part", kimg=0.016, **options))
    part = train(ws, resume_config("projected", run=f"{name}-part", kimg=0.032, resume=True))
    for net in ("G", "G_ema", "D"):
        assert_same_weights(weights(whole, net), weights(part, net))
    return part, train(ws, resume_config("projected", run=f"{name}-off", kimg=0.032))


# --- the spectral term (Durall et al. 2020) ---------------------------------------------------------
def test_radial_spectrum_is_flat_for_white_noise_and_falls_for_a_blurred_image():
    noise = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    flat = train_loss.radial_spectrum(noise)
    assert flat.shape == (32,) and flat.max() / flat.min() < 1.3
    blurred = train_loss.radial_spectrum(torch.nn.functional.avg_pool2d(noise, 3, 1, 1))
    assert blurred[-4:].mean() < 0.1 * blurred[:4].mean()                 # less power at fine detail
    assert train_loss.radial_spectrum(noise[:, :, :48]).shape == (24,)   # 4:3: up to the shorter side's Nyquist


def test_spectral_loss_is_zero_for_a_match_and_pulls_a_blurred_generator_back_to_detail():
    real = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = train_loss.radial_spectrum(real)
    assert train_loss.spectral_loss(real, target).item() == 0.0
    smooth = torch.nn.functional.avg_pool2d(real, 3, 1, 1).clone().requires_grad_(True)
    before = train_loss.spectral_loss(smooth, target)
    before.backward()
    with torch.no_grad():   # one step down its gradient restores fine detail, and the loss falls
        step = smooth - 50.0 * smooth.grad
    assert train_loss.spectral_loss(step, target) < before
    assert train_loss.radial_spectrum(step)[-4:].mean() > train_loss.radial_spectrum(smooth.detach())[-4:].mean()


def test_the_photos_spectrum_is_the_mean_over_all_rows_in_any_batching():
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    rows = np.array([0, 2, 3, 5, 7, 9])
    x = torch.from_numpy(images[rows]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(train_loss.photos_spectrum(images, rows, batch=4), train_loss.radial_spectrum(x), rtol=1e-5)


def test_the_spectral_term_is_off_by_default_checked_and_a_run_with_it_resumes_exactly(toy_ws):
    assert train_mod.resolve_config(TrainConfig(model="projected")).spectral == 0.0
    with pytest.raises(NeighbourhoodsError, match="--spectral must be >= 0"):
        train_mod.resolve_config(TrainConfig(spectral=-1.0))
    part, plain = resumes_exactly(toy_ws, "spectral", spectral=1.0)
    assert any(not torch.equal(a, b) for a, b in zip(weights(part, "G").values(), weights(plain, "G").values()))
    assert json.loads((part / "config.json").read_text())["spectral"] == 1.0


# --- LeCam regularisation (Tseng et al. 2021) -------------------------------------------------------
def test_lecam_pulls_reals_towards_the_fakes_anchor_and_moves_the_anchors():
    real, fake = [torch.full((4, 3), 2.0)], [torch.full((4, 3), -1.0)]
    anchors = [0.0, 0.0]
    first = train_loss.lecam_term(real, fake, anchors)
    assert first.item() == pytest.approx(2.0 ** 2 + 1.0 ** 2)           # (real - fake anchor)^2 + (fake - real anchor)^2
    assert anchors == pytest.approx([0.01 * 2.0, 0.01 * -1.0])          # EMA decay 0.99 towards this batch's means
    for _ in range(2000):
        train_loss.lecam_term(real, fake, anchors)
    assert anchors == pytest.approx([2.0, -1.0], abs=1e-6)
    # at the anchors the term is the squared gap between D's real and fake outputs, on both sides
    assert train_loss.lecam_term(real, fake, anchors).item() == pytest.approx(2 * 3.0 ** 2)


def test_a_run_with_lecam_resumes_exactly_and_its_anchors_are_saved(toy_ws):
    part, plain = resumes_exactly(toy_ws, "lecam", lecam=0.3)
    assert any(not torch.equal(a, b) for a, b in zip(weights(part, "D").values(), weights(plain, "D").values()))
    folder, _ = runs.latest_checkpoint(part)
    anchors = torch.load(folder / "state.pt", weights_only=True)["lecam_anchors"]
    assert len(anchors) == 2 and anchors[0] != 0.0 and anchors[1] != 0.0
    assert json.loads((part / "config.json").read_text())["lecam"] == 0.3
    with pytest.raises(NeighbourhoodsError, match="--lecam must be >= 0"):
        train_mod.resolve_config(TrainConfig(lecam=-0.1))


# --- the MMD of pooled pretrained features ---------------------------------------------------------
def test_feature_mmd_is_near_zero_for_one_distribution_and_large_for_a_collapsed_batch():
    gen = torch.Generator().manual_seed(0)
    real = torch.nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=1)
    same = torch.nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=1)
    collapsed = real[:1].repeat(64, 1) + 0.01 * torch.randn(64, 16, generator=gen)
    assert abs(train_loss.feature_mmd(same, real).item()) < 0.1
    assert train_loss.feature_mmd(collapsed, real).item() > 1.0
    assert train_loss.feature_mmd(real[:1], real).item() == 0.0          # one fake: no pair, no term


def test_feature_mmds_gradient_spreads_a_collapsed_batch_out():
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(32, 8, generator=gen)
    fake = (real[:1] + 0.05 * torch.randn(32, 8, generator=gen)).requires_grad_(True)
    spread = lambda x: torch.pdist(x).mean().item()   # noqa: E731
    before = spread(fake.detach())
    for _ in range(50):   # plain gradient descent on the term alone
        loss = train_loss.feature_mmd(fake, real)
        grad, = torch.autograd.grad(loss, fake)
        fake = (fake - 2.0 * grad).detach().requires_grad_(True)
    assert spread(fake.detach()) > 3 * before
    assert train_loss.feature_mmd(fake, real).item() < 0.5 * train_loss.feature_mmd(
        real[:1] + 0.05 * torch.randn(32, 8, generator=gen), real).item()


def test_the_discriminator_returns_the_instance_features_it_sees_at_no_extra_forward():
    from neighbourhoods.models import projected

    _, D = projected.build(3, (32, 32), **TINY["projected"])
    D.eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x = images.float().div(127.5).sub(1.0)
    labels = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        logits, pooled = D(x, labels, pooled=True)
        assert torch.equal(logits, D(x, labels))
    assert torch.allclose(pooled, projected.instance_features(images), atol=1e-6)


def test_feature_mmd_is_off_by_default_checked_and_a_run_with_it_resumes_exactly(toy_ws):
    assert train_mod.resolve_config(TrainConfig(model="projected")).feature_mmd == 0.0
    with pytest.raises(NeighbourhoodsError, match="--feature-mmd must be >= 0"):
        train_mod.resolve_config(TrainConfig(feature_mmd=-1.0))
    with pytest.raises(NeighbourhoodsError, match="no pretrained feature net"):
        train_mod.resolve_config(TrainConfig(model="dcgan", feature_mmd=1.0))
    part, plain = resumes_exactly(toy_ws, "mmd", feature_mmd=1.0)
    assert any(not torch.equal(a, b) for a, b in zip(weights(part, "G").values(), weights(plain, "G").values()))
    assert json.loads((part / "config.json").read_text())["feature_mmd"] == 1.0


# --- options: one declaration, resolved in one place -----------------------------------------------
def test_every_train_flag_comes_from_a_config_field_with_its_help():
    import argparse
    from dataclasses import fields

    from neighbourhoods.train.config import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    dests = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(dests) == {f.name for f in fields(TrainConfig)}
    for f in fields(TrainConfig):
        assert (f.metadata["flag_help"] or f.metadata["help"]) in dests[f.name].help.replace("%%", "%")
        assert dests[f.name].default is None           # an option left out is not passed on


def test_dry_run_prints_the_resolved_options_and_trains_nothing(toy_ws, capsys):
    args = ["train", "--workspace", str(toy_ws), "--res", "32x32", "--model", "dcgan", "--run", "dry", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    resolved = json.loads(out[out.index("{"):])
    assert resolved["model"] == "dcgan" and resolved["res"] == [32, 32] and resolved["run"] == "dry"
    assert resolved["loss"] == "bce" and resolved["lr_g"] == 2e-4 and resolved["batch"] == 64   # dcgan's recipe
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


# --- transitional conditioning ---------------------------------------------------------------------
def test_the_city_signal_fades_in_between_the_two_points():
    from neighbourhoods.models import cond_scale

    assert [cond_scale(2, 6, n) for n in (0, 2000, 4000, 6000, 9000)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert cond_scale(0, 0, 0) == 1.0                    # off: full strength from the first image


def test_an_unconditional_generator_ignores_the_city():
    from neighbourhoods.models import projected

    G = projected.Generator(3, (32, 32), z_dim=16, max_channels=16, min_channels=8).eval()
    for layer in G.modules():                            # give the city embedding some effect to remove
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=0.5)
    z = torch.randn(1, 16).repeat(3, 1)
    with torch.no_grad():
        assert not torch.allclose(G(z, torch.tensor([0, 1, 2]))[0], G(z, torch.tensor([0, 1, 2]))[1])
        G.cond_scale = 0.0
        out = G(z, torch.tensor([0, 1, 2]))
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[0], out[2])


def test_a_run_with_transitional_conditioning_resumes_exactly(toy_ws):
    fade = {"cond_start_kimg": 0.008, "cond_full_kimg": 0.024}
    whole = train(toy_ws, resume_config("projected", run="tc-whole", kimg=0.032, **fade))
    train(toy_ws, resume_config("projected", run="tc-part", kimg=0.016, **fade))
    part = train(toy_ws, resume_config("projected", run="tc-part", kimg=0.032, resume=True, **fade))
    for net in ("G", "G_ema", "D"):
        assert_same_weights(weights(whole, net), weights(part, net))
    assert runs.load_generator(part).model.cond_scale == 1.0


def test_a_run_stopped_mid_fade_samples_at_the_strength_it_trained_at(toy_ws):
    run = train(toy_ws, tiny("projected", run="tc-mid", kimg=0.016, cond_start_kimg=0.0, cond_full_kimg=0.032))
    assert runs.load_generator(run).model.cond_scale == 0.5


def test_transitional_conditioning_is_refused_for_a_model_without_it(toy_ws):
    with pytest.raises(NeighbourhoodsError, match="no transitional conditioning"):
        train_mod.resolve_config(TrainConfig(model="dcgan", cond_full_kimg=10.0))


# --- blur of D's input ------------------------------------------------------------------------------
def test_ds_input_blur_fades_out_and_keeps_what_it_blurs():
    from neighbourhoods.train.augment import gaussian_blur
    from neighbourhoods.train.loop import d_blur

    cfg = train_mod.resolve_config(TrainConfig(d_blur_sigma=2.0, d_blur_kimg=4.0))
    assert [d_blur(cfg, n) for n in (0, 1000, 2000, 4000, 9000)] == [2.0, 1.5, 1.0, 0.0, 0.0]
    assert d_blur(train_mod.resolve_config(TrainConfig()), 0) == 0.0        # off unless asked
    x = torch.rand(2, 3, 24, 32)
    assert gaussian_blur(x, 0.0) is x
    blurred = gaussian_blur(x, 1.5)
    assert blurred.shape == x.shape
    assert torch.allclose(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02)   # brightness kept
    assert blurred.std() < 0.6 * x.std()                                              # detail gone
    dot = torch.zeros(1, 1, 15, 15)
    dot[0, 0, 7, 7] = 1.0
    spread = gaussian_blur(dot, 1.0)[0, 0]
    assert spread.sum().item() == pytest.approx(1.0) and torch.equal(spread, spread.T)   # a symmetric kernel
    with pytest.raises(NeighbourhoodsError, match="d-blur"):
        train_mod.resolve_config(TrainConfig(d_blur_sigma=-1.0))
    with pytest.raises(NeighbourhoodsError, match="needs --d-blur-kimg"):
        train_mod.resolve_config(TrainConfig(d_blur_sigma=2.0))


def test_a_run_with_ds_input_blur_resumes_exactly_and_differs_from_one_without(toy_ws):
    blur = {"d_blur_sigma": 1.0, "d_blur_kimg": 0.024}
    whole = train(toy_ws, resume_config("projected", run="blur-whole", kimg=0.032, **blur))
    train(toy_ws, resume_config("projected", run="blur-part", kimg=0.016, **blur))
    part = train(toy_ws, resume_config("projected", run="blur-part", kimg=0.032, resume=True, **blur))
    plain = train(toy_ws, resume_config("projected", run="blur-off", kimg=0.032))
    for net in ("G", "G_ema", "D"):
        assert_same_weights(weights(whole, net), weights(part, net))
    assert any(not torch.equal(a, b) for a, b in zip(weights(whole, "G").values(), weights(plain, "G").values()))


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
