"""`evaluate`: the verb over scoring.score_run: metrics against the held-out split, novelty, what it writes.

The protocol itself (cities, seeds, the served path, the training estimate, bench/quality.py
reproduced) is tests/test_scoring.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from toy_run import CITIES, RES, toy_run

from neighbourhoods import evaluate as ev
from neighbourhoods.cli import main
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.prepared import load_split
from neighbourhoods.metrics import novelty
from neighbourhoods.metrics.features import cache_path, load_space


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    return toy_run(tmp_path_factory)


@pytest.fixture(scope="module")
def evaluation(toy):
    return ev.evaluate(toy.ws, toy.run, ev.EvaluateConfig(n=12, kid_subsets=20, min_city_holdout=3), progress=False)


@pytest.fixture(scope="module")
def spaces():
    return {name: load_space(name) for name in ("inception", "efficientnet", "efficientnet-native")}


# --- the evaluation -----------------------------------------------------------------------------
def test_evaluation_compares_samples_with_every_held_out_photo(toy, evaluation):
    holdout = load_split(toy.ws, RES, "holdout")
    assert evaluation["n_holdout"] == len(holdout) > 0
    assert evaluation["n_generated"] == 12
    assert evaluation["n_train"] == len(load_split(toy.ws, RES, "train"))


def test_barely_trained_generator_scores_far_worse_than_the_real_vs_real_floor(evaluation):
    q, floor = evaluation["quality"], evaluation["real_vs_real_floor"]
    assert q["fid"] > 2 * floor["fid"]
    assert q["kid"]["mean"] > floor["kid"]["mean"] + 10 * (q["kid"]["std"] + floor["kid"]["std"])
    assert q["precision"] < floor["precision"]


def test_per_city_kid_covers_cities_with_enough_held_out_photos(toy, evaluation):
    holdout = load_split(toy.ws, RES, "holdout")
    counts = {name: int((holdout.labels == i).sum()) for i, name in enumerate(holdout.label_names)}
    expected = sorted(name for name, n in counts.items() if n >= 3)
    assert expected, "the toy run should hold out enough photos of some city"
    assert sorted(c["city"] for c in evaluation["per_city"]) == expected
    assert all(c["holdout"] == counts[c["city"]] for c in evaluation["per_city"])


def test_evaluation_is_written_into_the_run_folder(toy, evaluation):
    saved = json.loads((ev.eval_dir(toy.run_dir, evaluation["images_seen"]) / "metrics.json").read_text())
    assert saved["quality"] == evaluation["quality"]
    assert ev.latest_evaluation(toy.run_dir)["evaluated_at"] == evaluation["evaluated_at"]
    with np.load(ev.eval_dir(toy.run_dir, evaluation["images_seen"]) / "novelty.npz") as f:
        sims = f["inception_similarity"]
        assert np.all(np.diff(sims) <= 0), "novelty figure must list the most similar first"
        assert len(f["inception_all_similarity"]) == 12


def test_real_features_are_cached_per_workspace(toy, evaluation):
    for space in ("inception", "efficientnet"):
        with np.load(cache_path(toy.ws, space, RES)) as f:
            assert len(f["photo_ids"]) == len(load_split(toy.ws, RES, None))


def test_cli_evaluate_prints_json(toy, evaluation, capsys, tmp_path):
    run_copy = tmp_path / "run"   # a copy, so this evaluation does not replace the fixture's
    shutil.copytree(toy.run_dir, run_copy, ignore=shutil.ignore_patterns("eval"))
    assert main(["evaluate", "--workspace", str(toy.ws.root), "--run", str(run_copy), "--n", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_generated"] == 4 and "fid" in out["quality"]
    assert (run_copy / "eval").is_dir()


def test_evaluate_without_held_out_photos_is_a_clear_error(tmp_path, toy):
    from neighbourhoods.demo.toytown import draw_toytown
    from neighbourhoods.ingest import ingest

    photos, labels = draw_toytown(tmp_path / "t", cities=("Pinecrest",), per_city=6)
    ingest(photos, tmp_path / "ws", labels=labels, res=[RES], holdout_min=1000, workers=1, progress=False)
    with pytest.raises(NeighbourhoodsError, match="held-out photos"):
        ev.evaluate(tmp_path / "ws", str(toy.run_dir), ev.EvaluateConfig(n=8), progress=False)
    assert main(["evaluate", "--workspace", str(tmp_path / "ws"), "--run", "nope"]) == 2


# --- novelty ------------------------------------------------------------------------------------
def test_memorisation_rate_counts_samples_above_the_threshold():
    assert novelty.memorisation_rate(np.array([0.1, 0.95, 0.99, 0.5]), 0.9) == 0.5
    assert novelty.memorisation_threshold(np.linspace(0, 1, 101), 99.0) == pytest.approx(0.99)


@pytest.mark.parametrize("space", ["inception", "efficientnet", "efficientnet-native"])
def test_memorisation_rate_flags_copies_of_training_photos(toy, spaces, space):
    index = novelty.NoveltyIndex.build(toy.ws, RES, space=space, progress=False, extractor=spaces[space])
    train = load_split(toy.ws, RES, "train")
    copies = np.asarray(train.images[train.rows[:4]])
    rng = np.random.default_rng(0)
    # near-copies with faint pixel noise. Toy-town houses are so alike (held-out photos' nearest
    # similarity ~0.9) that at 32x32 noise of +-4 grey levels or a JPEG re-encode already moves
    # copies below the threshold: exact and almost exact copies are what this can promise here.
    noisy = np.clip(copies.astype(int) + rng.integers(-1, 2, copies.shape), 0, 255).astype(np.uint8)
    sims, ids = index.nearest(np.concatenate([copies, noisy]))
    assert novelty.memorisation_rate(sims, index.threshold) == 1.0
    assert ids[:4].tolist() == train.photo_ids[:4].tolist()     # each copy finds its own original
    assert index.is_copy(copies).all()


@pytest.mark.parametrize("space", ["inception", "efficientnet", "efficientnet-native"])
def test_new_photos_of_the_same_cities_are_rarely_flagged(toy, spaces, space, tmp_path):
    from PIL import Image

    from neighbourhoods.demo.toytown import draw_toytown

    index = novelty.NoveltyIndex.build(toy.ws, RES, space=space, progress=False, extractor=spaces[space])
    photos, _ = draw_toytown(tmp_path / "new", cities=CITIES, per_city=3, seed=7)   # houses never seen
    fresh = np.stack([np.asarray(Image.open(p).convert("RGB").resize((RES[1], RES[0]), Image.LANCZOS))
                      for p in sorted(photos.iterdir())])
    sims, _ = index.nearest(fresh)
    assert novelty.memorisation_rate(sims, index.threshold) <= 0.25
    assert np.median(sims) < index.threshold


def test_near_duplicate_held_out_photos_are_left_out_of_the_calibration(toy):
    train = load_split(toy.ws, RES, "train")
    holdout = load_split(toy.ws, RES, "holdout")
    assert novelty.independent_holdout(toy.ws, holdout.photo_ids, train.photo_ids).all()   # toy town has none


# --- the per-workspace feature cache --------------------------------------------------------------
def test_feature_cache_computes_only_new_or_changed_photos(tmp_path):
    from neighbourhoods.core.workspace import Workspace
    from neighbourhoods.metrics.features import DIMS, PROTOCOLS, FeatureSpace, photo_features

    calls = []

    def extract(images, progress=False, desc=""):   # a stand-in network: mean colour per photo
        calls.append(len(images))
        out = np.zeros((len(images), DIMS["efficientnet"]), np.float32)
        out[:, :3] = images.reshape(len(images), -1, 3).mean(1)
        return out

    space = FeatureSpace("efficientnet", DIMS["efficientnet"], PROTOCOLS["efficientnet"], extract)
    ws = Workspace(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    rows, ids = np.arange(6), np.arange(100, 106)
    first = photo_features(ws, (8, 8), images, rows, ids, space, progress=False, step=4)
    assert calls == [4, 2]
    again = photo_features(ws, (8, 8), images, rows, ids, space, progress=False)
    assert calls == [4, 2] and np.array_equal(first, again)
    images[3] = 255 - images[3]                      # photo 103 re-ingested with new pixels
    changed = photo_features(ws, (8, 8), images, rows, ids, space, progress=False)
    assert calls == [4, 2, 1]
    assert not np.allclose(changed[3], first[3]) and np.array_equal(np.delete(changed, 3, 0), np.delete(first, 3, 0))


# --- scored as served --------------------------------------------------------------------------
def test_evaluate_at_served_size_scores_thumbnails_against_photos_cropped_to_it(toy, evaluation):
    cfg = ev.EvaluateConfig(n=12, kid_subsets=20, min_city_holdout=3, size=(40, 30), upscale="lanczos")
    result = ev.evaluate(toy.ws, toy.run, cfg, progress=False)
    assert result["scored_at"] == "40x30 thumbnails (lanczos, jpg)"
    assert result["path"].endswith("metrics-40x30.json")        # beside the native evaluation, not over it
    native = evaluation   # the same samples, scored as they are
    assert Path(native["path"]).is_file() and native["scored_at"] == "32x32 samples"
    assert result["quality"]["kid"]["mean"] != native["quality"]["kid"]["mean"]
    assert result["quality"]["fid"] > 2 * result["real_vs_real_floor"]["fid"]   # grey blobs stay far from photos


def test_describe_prints_every_figure_of_the_evaluation(evaluation):
    text = ev.describe(evaluation)
    assert f"FID {evaluation['quality']['fid']:.2f}" in text
    assert "real-vs-real floor" in text and "memorised (inception)" in text and evaluation["path"] in text


def test_evaluate_scores_the_set_as_served_through_the_guard_beside_the_drawn_one(toy, evaluation):
    cfg = ev.EvaluateConfig(n=12, kid_subsets=20, min_city_holdout=3, gated=True, novelty_spaces=("inception",),
                            floor=False)
    result = ev.evaluate(toy.ws, toy.run, cfg, progress=False)
    drawn, served = result["quality"], result["gated"]
    # memorised, of the set as served: the drawn set's figure where nothing was replaced
    assert set(served["memorised"]) == {"inception"} and 0 <= served["memorised_any_space"] <= 1
    assert served["memorised_any_space"] == served["memorised"]["inception"]
    assert drawn["kid"] == evaluation["quality"]["kid"]          # the drawn set is the plain evaluation's
    assert served["replaced"] == round((1 - served["accepted_share"]) * 12) > 0   # grey blobs: the gate swaps some
    assert served["realism_quantile"] == 0.2 and "realism gate" in served["guard"]
    assert served["kid"] != drawn["kid"]
    assert all("accepted_share" in c["gated"] for c in result["per_city"])
    assert "as served (novelty guard, realism gate at quantile 0.2)" in ev.describe(result)
    # the sheet: per city (the 4 with most samples) held-out photos, drawn, served, rejected; 6 tiles a row
    from PIL import Image

    from neighbourhoods.scoring import SHEET_COLUMNS
    with Image.open(result["sheet"]) as sheet:
        assert result["sheet"].endswith("served.jpg") and sheet.format == "JPEG"
        h, w = RES        # the samples' own size (no --size)
        blocks, rest = divmod(sheet.height - 3, 4 * (h + 3))
        assert rest == 0 and 1 <= blocks <= 4 and sheet.width > SHEET_COLUMNS * (w + 3)
    assert f"sheet -> {result['sheet']}" in ev.describe(result)
    # toy town's grey blobs are one house to the listings rule too: it swaps samples with no realism gate
    cfg.realism_quantile = 0
    plain = ev.evaluate(toy.ws, toy.run, cfg, progress=False)["gated"]
    assert plain["below_gate"] == 0 and "realism gate" not in plain["guard"] and "distinct listings" in plain["guard"]
    assert plain["replaced"] > 0
