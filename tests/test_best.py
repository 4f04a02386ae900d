"""The run keeps its best: the training curve (KID against training photos every kid_every
images) picks a snapshot, kept beside the last; every verb uses it unless told --snapshot last;
resume stays exact with it."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from toy_run import make_toy_workspace

from neighbourhoods import scoring
from neighbourhoods.cli import main
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.models import runs
from neighbourhoods.train import TrainConfig, train
from neighbourhoods.train import loop as train_loop

TINY = {"ngf": 8, "ndf": 8, "z_dim": 16, "g_embed": 4, "d_embed": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy_ws(tmp_path_factory):
    return make_toy_workspace(tmp_path_factory.mktemp("best"), res=((32, 32),))


def tiny(**overrides) -> TrainConfig:
    cfg = TrainConfig(model="dcgan", res=(32, 32), batch=8, kimg=0.032, min_city_photos=5, model_kwargs=TINY,
                      snapshot_every=16, sample_every=16, tick_every=8, kid_every=8,                       num_workers=0, progress=False)
    return replace(cfg, **overrides)


def scripted(monkeypatch) -> None:
    """The training curve's KIDs scripted (0.5, 0.2, 0.3, 0.4 at 8, 16, 24, 32 images): the best is at 16."""
    kids = iter([0.5, 0.2, 0.3, 0.4])

    def fake_score(*args, **kwargs):
        return {"quality": {"kid": {"mean": next(kids), "std": 0.01}}}

    monkeypatch.setattr(scoring, "training_score", fake_score)


@pytest.fixture(scope="module")
def best_run(toy_ws):
    with pytest.MonkeyPatch.context() as mp:
        scripted(mp)
        return train(toy_ws, tiny(run="scripted"))


def test_the_lowest_kid_of_the_curve_is_kept_as_the_best_snapshot(best_run):
    best = runs.best_snapshot(best_run)
    assert best["images_seen"] == 16 and best["kid_train"] == 0.2
    assert [p.name for p in (best_run / "checkpoints").glob("best-*")] == ["best-0000000016.safetensors"]
    # the best is G_ema as it was at 16 images, with its standing BN statistics: the checkpoint's
    kept = load_file(str(best["path"]))
    at16 = load_file(str(best_run / "checkpoints" / "0000000016" / "G_ema.safetensors"))
    assert kept.keys() == at16.keys() and all(torch.equal(kept[k], at16[k]) for k in kept)
    lines = [json.loads(x) for x in (best_run / "metrics.jsonl").read_text().splitlines()]
    assert [(x["images_seen"], x["kid_train"], x["best_at"]) for x in lines] == [
        (8, 0.5, 8), (16, 0.2, 16), (24, 0.3, 16), (32, 0.4, 16)]


def test_loaders_use_the_best_unless_told_last(best_run):
    assert (runs.load_generator(best_run).images_seen, runs.load_generator(best_run).snapshot) == (16, "best")
    last = runs.load_generator(best_run, snapshot="last")
    assert (last.images_seen, last.snapshot) == (32, "last")
    with pytest.raises(NeighbourhoodsError, match="unknown snapshot"):
        runs.load_generator(best_run, snapshot="newest")
    kept = runs.load_generator(best_run, snapshot="16")    # a kept checkpoint by its images (bench/curve.py)
    assert (kept.images_seen, kept.snapshot) == (16, "16")
    with pytest.raises(NeighbourhoodsError, match="keeps no checkpoint at 24 images"):
        runs.load_generator(best_run, snapshot="24")


def test_every_verb_uses_the_best_snapshot(toy_ws, best_run, tmp_path, capsys):
    from neighbourhoods.export import export
    from neighbourhoods.generate import GenerateConfig, generate
    from neighbourhoods.report import build_report
    from neighbourhoods.serve import build

    ws = str(toy_ws)
    gen_cfg = GenerateConfig(n=1, cities=["Pinecrest"], size=(64, 48), upscale="bicubic", novelty=False)
    best = generate(ws, "scripted", tmp_path / "best", gen_cfg, progress=False)
    last = generate(ws, "scripted", tmp_path / "last", replace(gen_cfg, snapshot="last"), progress=False)
    assert (best["snapshot"], best["images_seen"], last["snapshot"], last["images_seen"]) == ("best", 16, "last", 32)
    assert best["model_fingerprint"] != last["model_fingerprint"]

    quick = scoring.ScoringConfig(n=8, against="train", fid=False, precision_recall=False, per_city=False,
                                  floor=False, novelty_spaces=())
    scored = scoring.score_run(ws, "scripted", quick, progress=False, write=False)
    assert (scored["snapshot"], scored["images_seen"]) == ("best", 16)
    assert scoring.score_run(ws, "scripted", quick, progress=False, write=False, snapshot="last")["images_seen"] == 32

    meta = export(ws, "scripted", tmp_path / "g.pt2")
    assert json.loads((tmp_path / "g.json").read_text())["images_seen"] == 16 and meta["path"]

    thumbs = build(ws, "scripted", novelty=False, upscale="bicubic")
    assert (thumbs.source.snapshot, thumbs.source.images_seen) == ("best", 16)
    assert build(ws, "scripted", novelty=False, upscale="bicubic", snapshot="last").source.images_seen == 32

    html = build_report(toy_ws_handle(toy_ws), "scripted")
    assert "best snapshot at 0.016 kimg" in html and "best snapshot (used by" in html

    # the CLI's --snapshot
    capsys.readouterr()
    assert main(["generate", "-w", ws, "--run", "scripted", "--city", "Pinecrest", "-n", "1", "--size", "64x48",
                 "--upscale", "bicubic", "--no-novelty-guard", "--out", str(tmp_path / "cli"), "--json",
                 "--snapshot", "last"]) == 0
    assert json.loads(capsys.readouterr().out)["images_seen"] == 32


def toy_ws_handle(path):
    from neighbourhoods.core.workspace import open_workspace
    return open_workspace(path)


def test_a_run_shorter_than_one_interval_keeps_no_best(toy_ws, monkeypatch):
    scripted(monkeypatch)
    run = train(toy_ws, tiny(run="short", kimg=0.016, kid_every=10_000))
    assert runs.best_snapshot(run) is None
    assert runs.load_generator(run).snapshot == "last"


def test_a_torn_best_json_is_a_one_line_error(toy_ws, best_run, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(best_run, copy)
    (copy / "checkpoints" / "best.json").write_text("{")
    with pytest.raises(NeighbourhoodsError, match="best.json is corrupt"):
        runs.load_generator(copy)
    assert runs.load_generator(copy, snapshot="last").images_seen == 32


def test_resume_with_the_training_curve_is_exact_and_keeps_the_same_best(toy_ws, monkeypatch):
    monkeypatch.setattr(train_loop, "KID_IMAGES", 8)    # the recipe's 300 samples cost a minute on one core
    whole = train(toy_ws, tiny(run="whole", kimg=0.040))
    train(toy_ws, tiny(run="part", kimg=0.016))
    part = train(toy_ws, tiny(run="part", kimg=0.040, resume=True))
    for net in ("G", "G_ema", "D"):
        a = load_file(str(runs.latest_checkpoint(whole)[0] / f"{net}.safetensors"))
        b = load_file(str(runs.latest_checkpoint(part)[0] / f"{net}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), net
    best_whole, best_part = runs.best_snapshot(whole), runs.best_snapshot(part)
    assert best_whole["images_seen"] == best_part["images_seen"]
    assert best_whole["kid_train"] == best_part["kid_train"]
    a, b = load_file(str(best_whole["path"])), load_file(str(best_part["path"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    def curve(run):
        return [(x["images_seen"], x["kid_train"]) for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert curve(whole) == curve(part) and len(curve(whole)) == 5
    # the logged curve is the one scoring function's KID against the training photos' fixed draw
    gen = runs.load_generator(whole, snapshot="last")
    again = scoring.training_score(toy_ws, (32, 32), gen.model, gen.class_names, gen.city_map, n=8)
    assert curve(whole)[-1][1] == pytest.approx(again["quality"]["kid"]["mean"])
    assert np.isfinite(best_whole["kid_train"])
