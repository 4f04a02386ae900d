"""`scoring`: the one protocol that evaluate, bench/quality.py and the training curve share."""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from toy_run import CITIES, RES, toy_run

from neighbourhoods import scoring
from neighbourhoods.cli import main
from neighbourhoods.core.prepared import load_split
from neighbourhoods.metrics.features import load_space
from neighbourhoods.models import runs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    return toy_run(tmp_path_factory)


@pytest.fixture(scope="module")
def bench():
    """bench/quality.py, imported from its file (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench_run(toy):
    """A copy of the toy run under its own name, so scoring it leaves the shared run's eval alone."""
    copy = toy.ws.run_dir("tiny-bench")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(toy.run_dir, copy, ignore=shutil.ignore_patterns("eval"))
    yield copy
    shutil.rmtree(copy, ignore_errors=True)


def evaluate_json(command: str, capsys) -> dict:
    """Run a printed `neighbourhoods evaluate ...` command through the CLI; its JSON."""
    args = shlex.split(command)
    assert args[:2] == ["neighbourhoods", "evaluate"]
    capsys.readouterr()
    assert main(args[1:] + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- which cities, which seeds ------------------------------------------------------------------
def test_samples_are_spread_over_cities_like_the_held_out_photos():
    assert scoring.allocate(np.array([10, 30, 0, 60]), 7).tolist() == [1, 2, 0, 4]
    assert scoring.allocate(np.array([1, 1, 1]), 10).sum() == 10


def test_cities_without_a_class_of_their_own_sample_the_shared_class():
    lut = scoring.class_of_label(["A", "B", "tiny"], ["A", "B", "(any city)"])
    assert lut.tolist() == [0, 1, 2, 2]     # the last slot: photos with no label
    assert scoring.class_of_label(["A", "gone"], ["A", "B"]).tolist() == [0, -1, -1]


def test_a_citys_samples_are_its_first_listings_with_cities_in_class_order():
    classes, seeds = scoring.sample_plan(np.array([1, 1, 0, -1, 1, 1, 2]), 3, n=6, seed=100)
    assert classes.tolist() == [0, 1, 1, 1, 1, 2]     # held-out photos of no class are left out
    assert seeds.tolist() == [100, 100, 101, 102, 103, 100]


# --- the served path ----------------------------------------------------------------------------
def test_real_photos_at_a_size_are_their_files_cropped_to_fill(toy):
    from PIL import Image

    from neighbourhoods.core import catalog
    from neighbourhoods.thumbnails.upscalers import cover_box

    holdout = load_split(toy.ws, RES, "holdout")
    photos = scoring.real_photos_at(toy.ws, holdout.photo_ids[:3], (40, 30), progress=False)
    assert photos.shape == (3, 30, 40, 3) and photos.dtype == np.uint8
    con = catalog.connect(toy.ws.catalog_path)
    path = con.execute("SELECT path FROM photos WHERE id = ?", (int(holdout.photo_ids[0]),)).fetchone()[0]
    con.close()
    with Image.open(path) as im:
        im = im.convert("RGB")
        expected = np.asarray(im.resize((40, 30), Image.LANCZOS, box=cover_box(im.size, (40, 30))))
    assert np.array_equal(photos[0], expected)


def test_served_thumbnails_are_what_generate_writes(toy, tmp_path):
    from PIL import Image

    from neighbourhoods.generate import GenerateConfig, generate

    out = tmp_path / "gen"
    manifest = generate(toy.ws.root, toy.run, out, GenerateConfig(n=2, size=(40, 30), upscale="lanczos",
                                                                  novelty=False, cities=[CITIES[0]]), progress=False)
    gen = runs.load_generator(toy.run_dir)
    files = manifest["cities"][CITIES[0]]["files"]
    match = gen.city_map.resolve(CITIES[0])            # a city of its own class: its seeds are the seeds
    samples = runs.sample(gen, [match.class_index] * 2, [match.seed(f["seed"]) for f in files])
    thumbs, name = scoring.served_thumbnails(toy.ws, RES, samples, (40, 30), "lanczos", "jpg", progress=False)
    assert name == "lanczos"
    for f, t in zip(files, thumbs):
        assert np.array_equal(np.asarray(Image.open(out / f["file"]).convert("RGB")), t)


def test_served_size_features_of_real_photos_are_cached_per_workspace(toy):
    space = load_space("inception")
    ids = load_split(toy.ws, RES, "holdout").photo_ids[:4]
    first = scoring.served_real_features(toy.ws, ids, (40, 30), space, progress=False)
    assert (toy.ws.embeddings_dir / "eval-inception-served-40x30.npz").is_file()
    assert np.array_equal(scoring.served_real_features(toy.ws, ids, (40, 30), space, progress=False), first)


# --- options that make it cheap -----------------------------------------------------------------
def test_switched_off_parts_are_not_computed(toy):
    gen = runs.load_generator(toy.run_dir)
    cfg = scoring.ScoringConfig(n=8, kid_subsets=5, fid=False, precision_recall=False, per_city=False, floor=False,
                                novelty_spaces=())
    figures = scoring.score(toy.ws, RES, gen.model, gen.class_names, gen.city_map, cfg, progress=False).figures
    assert figures["quality"]["kid"]["mean"] is not None
    assert figures["quality"]["fid"] is None and figures["quality"]["precision"] is None
    assert figures["per_city"] == [] and figures["real_vs_real_floor"] is None and figures["novelty"] is None
    assert list(figures["feature_protocol"]) == ["inception"]


# --- the training curve's estimate --------------------------------------------------------------
def test_training_score_is_the_kid_evaluate_reports_against_training_photos_at_the_same_n_and_seed(toy):
    gen = runs.load_generator(toy.run_dir)
    estimate = scoring.training_score(toy.ws, RES, gen.model, gen.class_names, gen.city_map, n=8, seed=3)
    evaluation = scoring.score_run(toy.ws, toy.run, scoring.ScoringConfig(n=8, seed=3, against="train",
                                                                         novelty_spaces=()),
                                   progress=False, write=False)
    assert estimate["quality"]["kid"] == evaluation["quality"]["kid"]
    assert estimate["quality"]["kid"]["mean"] > 0 and estimate["novelty"] is None
    held_out = scoring.score_run(toy.ws, toy.run, scoring.ScoringConfig(n=8, seed=3, novelty_spaces=()),
                                 progress=False, write=False)
    assert held_out["quality"]["kid"] != estimate["quality"]["kid"]   # the held-out photos judge only the final pick


def test_a_run_with_kid_every_logs_the_training_score_in_its_metrics(toy, monkeypatch):
    from neighbourhoods.train import TrainConfig, train
    from neighbourhoods.train import loop as train_loop

    monkeypatch.setattr(train_loop, "KID_IMAGES", 8)   # the recipe's 300 samples cost a minute on one core
    run = train(toy.ws, TrainConfig(model="dcgan", res=RES, batch=8, kimg=0.016, min_city_photos=5, run="kid-curve",
                                    model_kwargs={"ngf": 8, "ndf": 8, "z_dim": 16, "g_embed": 4, "d_embed": 2},
                                    kid_every=16, tick_every=8, snapshot_every=16, num_workers=0,
                                    progress=False))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "kid_train" not in lines[0] and lines[-1]["kid_train"] > 0 and lines[-1]["kid_train_std"] >= 0
    gen = runs.load_generator(run)   # the same number as the one scoring function gives these weights
    assert gen.snapshot == "best" and gen.images_seen == 16
    again = scoring.training_score(toy.ws, RES, gen.model, gen.class_names, gen.city_map, n=8)
    assert lines[-1]["kid_train"] == pytest.approx(again["quality"]["kid"]["mean"])


def test_training_score_restores_the_models_train_mode(toy):
    gen = runs.load_generator(toy.run_dir)
    gen.model.train()
    assert scoring.training_score(toy.ws, RES, gen.model, gen.class_names, n=8) is not None
    assert gen.model.training


def test_training_score_needs_no_held_out_photos(toy, tmp_path):
    from neighbourhoods.demo.toytown import draw_toytown
    from neighbourhoods.ingest import ingest

    photos, labels = draw_toytown(tmp_path / "t", cities=("Pinecrest",), per_city=6)
    ingest(photos, tmp_path / "ws", labels=labels, res=[RES], holdout_min=1000, workers=1, progress=False)
    gen = runs.load_generator(toy.run_dir)
    assert scoring.training_score(tmp_path / "ws", RES, gen.model, gen.class_names, n=8)["quality"]["kid"]["mean"] > 0




# --- one protocol: evaluate reproduces the benchmark ---------------------------------------------
def test_evaluate_reproduces_the_bench_figures_exactly(toy, bench, bench_run, tmp_path, capsys):
    config = scoring.ScoringConfig(n=8, min_city_holdout=3)
    figures = bench.score_run(toy.ws.root, bench_run, list(CITIES), tmp_path / "grid.png", config)
    result = evaluate_json(figures["evaluate_command"], capsys)
    q = result["quality"]
    assert (figures["fid"], figures["kid_mean"], figures["kid_std"], figures["precision"], figures["recall"]) == \
        (q["fid"], q["kid"]["mean"], q["kid"]["std"], q["precision"], q["recall"])
    assert figures["within_city_diversity"] == q["within_city_diversity"] is not None
    assert [(c["city"], c["kid_mean"], c["diversity"]) for c in figures["per_city"]] == \
        [(c["city"], c["kid"]["mean"], c["diversity"]) for c in result["per_city"]]
    assert figures["real_vs_real_floor"] == result["real_vs_real_floor"]
    assert figures["novelty"] == result["novelty"]


def test_evaluate_at_the_served_size_reproduces_the_bench_thumbnail_figures_exactly(toy, bench, bench_run, tmp_path,
                                                                                      capsys):
    config = scoring.ScoringConfig(n=8, min_city_holdout=3, upscale="lanczos")
    served = bench.score_run(toy.ws.root, bench_run, list(CITIES), tmp_path / "grid.png", config,
                             served=(40, 30))["served"]
    assert "--size 40x30" in served["evaluate_command"]
    result = evaluate_json(served["evaluate_command"], capsys)
    assert result["scored_at"] == served["scored_at"] == "40x30 thumbnails (lanczos, jpg)"
    q = result["quality"]
    assert (served["fid"], served["kid_mean"], served["precision"], served["recall"]) == \
        (q["fid"], q["kid"]["mean"], q["precision"], q["recall"])
    assert served["real_vs_real_floor"] == result["real_vs_real_floor"]
    assert [c["kid_mean"] for c in served["per_city"]] == [c["kid"]["mean"] for c in result["per_city"]]
    # the set as served, beside (evaluate also scores its novelty, which the bench's served scoring leaves out)
    gated = {k: v for k, v in result["gated"].items() if not k.startswith("memorised")}
    assert served["gated"] == gated and served["gated"]["replaced"] >= 0
