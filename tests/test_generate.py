"""`generate`: deterministic thumbnails per (city, seed), upscaling, novelty guard, export."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from neighbourhoods import cli
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import ThumbSize
from neighbourhoods.generate import GenerateConfig, generate
from neighbourhoods.thumbnails.guard import Guard, NoNovelSample, derived_seed, render_samples
from neighbourhoods.thumbnails.postprocess import thumbnail
from neighbourhoods.thumbnails.source import Source, load_source
from neighbourhoods.thumbnails.upscalers import NAMES, SRConfig, cover_box, get_upscaler
from neighbourhoods.upscale import train_sr


@pytest.fixture(scope="module")
def source(served_run):
    ws, run = served_run
    return load_source(ws, run)


def test_size_is_width_by_height():
    assert ThumbSize.parse("256x192") == (256, 192)


@pytest.mark.parametrize("text", ["", "256", "0x10", "2000x100", "-5x5", "1e3x5", "axb", "256x192x3"])
def test_bad_or_huge_sizes_are_refused(text):
    with pytest.raises(NeighbourhoodsError):
        ThumbSize.parse(text)


def test_same_city_and_seed_give_the_same_pixels_whatever_the_batch(source):
    alone = source.sample([1], [7])[0]
    batched = source.sample([0, 1, 2, 1], [3, 7, 9, 8])[1]
    assert np.array_equal(alone, batched)


def test_different_seeds_and_cities_give_different_images(source):
    imgs = source.sample([0, 0, 1], [1, 2, 1])
    assert not np.array_equal(imgs[0], imgs[1])
    assert not np.array_equal(imgs[0], imgs[2])


def test_cover_box_crops_the_centre_to_the_target_aspect():
    assert cover_box((64, 64), (256, 192)) == (0.0, 8.0, 64.0, 56.0)
    assert cover_box((64, 48), (100, 100)) == (8.0, 0.0, 56.0, 48.0)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "espcn"])
def test_every_resampling_upscaler_gives_the_exact_size(name):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    for size in [(256, 192), (100, 300), (32, 24)]:
        assert get_upscaler(name).resize(img, size).size == size


def test_thumbnail_bytes_are_reproducible_in_every_format(source):
    img = source.sample([0], [5])[0]
    for fmt, magic in [("jpg", b"\xff\xd8"), ("png", b"\x89PNG"), ("webp", b"RIFF")]:
        a, b = thumbnail(img, (256, 192), fmt), thumbnail(img, (256, 192), fmt)
        assert a == b and a.startswith(magic)
        assert Image.open(io.BytesIO(a)).size == (256, 192)


def _flagging_guard(source, flagged_seeds, max_attempts=8):
    """A guard that calls an image a near-copy when it equals the sample of a flagged seed."""
    flagged = {source.sample([c], [s])[0].tobytes() for c, s in flagged_seeds}
    return Guard(embed=lambda imgs: np.array([[1.0 if im.tobytes() in flagged else 0.1] for im in imgs]),
                 similarity=lambda f: f[:, 0], threshold=0.9, max_attempts=max_attempts)


def test_guard_replaces_a_near_copy_by_the_next_derived_seed(source):
    guard = _flagging_guard(source, [(0, 4)])
    out = render_samples(source, [0, 0], [3, 4], guard)
    assert out[0].used_seed == 3
    assert out[1].used_seed == derived_seed(4, 1) != 4
    assert (out[0].rejected, out[1].rejected) == ("", "near-copy")     # why the first attempt went
    assert np.array_equal(out[1].image, source.sample([0], [derived_seed(4, 1)])[0])
    again = render_samples(source, [0], [4], guard)[0]
    assert np.array_equal(again.image, out[1].image)


def test_guard_gives_up_with_a_clear_error_when_every_attempt_is_a_copy(source):
    guard = Guard(embed=lambda imgs: np.ones((len(imgs), 1)), similarity=lambda f: f[:, 0], threshold=0.5,
                  max_attempts=3)
    with pytest.raises(NoNovelSample, match="memorises"):
        render_samples(source, [0], [1], guard)


class _ScoredRealism:
    """A realism gate whose score of a sample is given per seed (feature column 1 carries it)."""
    quantile, thresholds = 0.2, np.array([0.5])

    def passes(self, features, classes):
        return features[:, 1], features[:, 1] >= 0.5


def _scoring_guard(source, realism_by_seed: dict, copies=(), max_attempts=4):
    """Novelty from `copies` (seeds that are near-copies), realism from `realism_by_seed` (default 1)."""
    images = {}

    def embed(imgs):
        rows = []
        for im in imgs:
            seed = images[im.tobytes()]
            rows.append([1.0 if seed in copies else 0.1, realism_by_seed.get(seed, 1.0)])
        return np.array(rows)

    def sample(classes, seeds):   # remembers which seed drew each image, for embed
        out = source.sample(classes, seeds)
        images.update({im.tobytes(): s for im, s in zip(out, seeds)})
        return out

    guard = Guard(embed=embed, similarity=lambda f: f[:, 0], threshold=0.9, max_attempts=max_attempts,
                  realism=_ScoredRealism())
    return Source(source.class_names, source.res, sample, source.fingerprint), guard


def test_realism_gate_replaces_an_unrealistic_sample_by_the_next_derived_seed(source):
    tracked, guard = _scoring_guard(source, {4: 0.1})
    out = render_samples(tracked, [0, 0], [3, 4], guard)
    assert [s.used_seed for s in out] == [3, derived_seed(4, 1)]
    assert all(s.passed for s in out) and out[1].realism == 1.0
    assert [s.rejected for s in out] == ["", "below the realism gate"]
    again = render_samples(tracked, [0], [4], guard)[0]     # alone: the same replacement
    assert again.used_seed == out[1].used_seed and np.array_equal(again.image, out[1].image)


def test_realism_gate_serves_the_most_realistic_novel_attempt_when_none_passes(source):
    seeds = [derived_seed(7, a) for a in range(4)]
    scores = dict(zip(seeds, [0.2, 0.4, 0.3, 0.1]))
    tracked, guard = _scoring_guard(source, scores, copies={seeds[1]})   # the most realistic one is a copy
    s = render_samples(tracked, [0], [7], guard)[0]
    assert not s.passed and s.used_seed == seeds[2] and s.realism == 0.3   # never the near-copy
    tracked, guard = _scoring_guard(source, scores, copies=set(seeds))
    with pytest.raises(NoNovelSample):
        render_samples(tracked, [0], [7], guard)


def test_realism_threshold_is_a_quantile_of_held_out_photos_and_small_cities_use_all_photos():
    from neighbourhoods.thumbnails.realism import calibrate

    rng = np.random.default_rng(0)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    centres = unit(rng.normal(size=(3, 32))) * 3
    real = unit(np.concatenate([centres[c] + rng.normal(size=(n, 32)) for c, n in [(0, 300), (1, 300), (2, 10)]]))
    real_classes = np.repeat([0, 1, 2], [300, 300, 10])
    holdout = unit(np.concatenate([centres[c] + rng.normal(size=(100, 32)) for c in (0, 1, 2)]))
    holdout_classes = np.repeat([0, 1, 2], 100)
    gate = calibrate(real, real_classes, holdout, holdout_classes, num_classes=3, quantile=0.2)
    assert list(gate.own) == [True, True, False] and len(gate.members[2]) == len(real)
    for c in (0, 1):   # a fifth of the city's own held-out photos would be turned away
        _, ok = gate.passes(holdout[holdout_classes == c], [c] * 100)
        assert 0.7 <= ok.mean() <= 0.9
    far = unit(rng.normal(size=(50, 32)))                  # off every city's cloud
    assert gate.passes(far, [0] * 50)[1].mean() < 0.2
    other = holdout[holdout_classes == 1]                  # another city's houses, judged as city 0's
    assert gate.passes(other, [0] * 100)[1].mean() < 0.2


def test_realism_gate_scores_as_the_metric_does_against_each_class_reference():
    # the gate keeps the all-photos reference between calls; the scores stay the metric's, exactly
    from neighbourhoods.metrics.scores import realism
    from neighbourhoods.thumbnails.realism import calibrate

    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 16)).astype(np.float32)
    real_classes = np.repeat([0, 1, -1], [120, 40, 40])     # class 1 and 2 are too small: all photos
    gate = calibrate(real, real_classes, real[:90], real_classes[:90], num_classes=3, min_photos=50, min_holdout=20)
    assert list(gate.own) == [True, False, False]
    samples = rng.normal(size=(30, 16)).astype(np.float32)
    classes = rng.integers(0, 3, 30)
    for _ in range(2):
        scores = gate.score(samples, classes)
        for c in range(3):
            rows = classes == c
            expected = realism(real[gate.members[c]], gate.radii[c], samples[rows])
            assert np.array_equal(scores[rows], expected)
    with pytest.raises(NeighbourhoodsError, match="NaN"):
        gate.score(np.full((1, 16), np.nan), [1])


def test_real_guard_replaces_a_copy_of_a_training_photo(served_run, source):
    from neighbourhoods.core.prepared import load_split
    from neighbourhoods.core.workspace import open_workspace
    from neighbourhoods.thumbnails.guard import load_guard

    ws, _ = served_run
    guard = load_guard(ws, source, realism_quantile=0)   # the novelty guard alone
    split = load_split(open_workspace(ws), source.res, "train")
    photo = np.asarray(split.images[split.rows[0]])

    def copying(classes, seeds):     # a generator that memorised: seed 4 gives back a training photo
        out = source.sample(classes, seeds)
        out[[s == 4 for s in seeds]] = photo
        return out

    memorising = Source(source.class_names, source.res, copying, source.fingerprint)
    assert guard.image_similarity(photo[None])[0] > guard.threshold
    s = render_samples(memorising, [0, 0], [4, 5], guard)
    assert s[0].used_seed == derived_seed(4, 1) and not np.array_equal(s[0].image, photo)
    assert s[0].similarity <= guard.threshold and s[1].used_seed == 5


def test_generate_all_cities_writes_a_folder_grid_and_manifest_per_city(served_run, tmp_path):
    ws, run = served_run
    manifest = generate(ws, run, tmp_path, GenerateConfig(n=3, seed=10, size=(128, 96), fmt="png",
                                                          all_cities=True, novelty=False), progress=False)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert len(manifest["cities"]) == len(load_source(ws, run).class_names)
    for city in manifest["cities"].values():
        assert [f["seed"] for f in city["files"]] == [10, 11, 12]
        for f in city["files"]:
            assert Image.open(tmp_path / f["file"]).size == (128, 96)
        assert Image.open(tmp_path / city["grid"]).width > 128 * 3


def test_generate_cli_is_deterministic_per_city_and_seed(served_run, tmp_path):
    ws, run = served_run
    city = load_source(ws, run).class_names[0]
    args = ["generate", "-w", str(ws), "--run", run, "--city", city, "-n", "2", "--seed", "5",
            "--format", "webp", "--no-novelty-guard"]
    assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert cli.main(args[:7] + ["-n", "1", "--seed", "6"] + args[11:] + ["--out", str(tmp_path / "b")]) == 0
    a = sorted((tmp_path / "a").rglob("000006.webp"))
    b = sorted((tmp_path / "b").rglob("000006.webp"))
    assert len(a) == len(b) == 1 and a[0].read_bytes() == b[0].read_bytes()


def test_generate_cli_names_close_matches_for_an_unknown_city(served_run, tmp_path, capsys):
    ws, run = served_run
    city = load_source(ws, run).class_names[0]
    code = cli.main(["generate", "-w", str(ws), "--run", run, "--city", city[:-1], "--out", str(tmp_path),
                     "--no-novelty-guard"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: unknown city") and city in err and "Traceback" not in err


def test_default_upscaler_without_sr_weights_is_the_best_weightless_one(tmp_path):
    from neighbourhoods.core import catalog

    catalog.connect(tmp_path / "catalog.sqlite").close()
    assert get_upscaler(None, workspace=tmp_path).name == "lanczos"
    with pytest.raises(NeighbourhoodsError, match="needs trained weights"):
        get_upscaler("espcn", workspace=tmp_path)


@pytest.mark.parametrize("hw", [(96, 128), (48, 64), (3, 5), (1, 1)])
def test_the_espcn_base_is_torchs_bicubic_upsampling(hw):
    """The residual's base is a fixed conv (fast in onnxruntime), equal to F.interpolate's bicubic."""
    import torch
    import torch.nn.functional as F

    from neighbourhoods.thumbnails.upscalers import build_sr

    model = build_sr(SRConfig(channels=8)).eval()
    torch.nn.init.zeros_(model.body[-2].weight)     # no residual: the output is the base alone
    torch.nn.init.zeros_(model.body[-2].bias)
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        got = model(x)
    want = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-5
    assert "bicubic" not in model.state_dict()      # derived, not saved: weight files are unchanged


def test_sr_upscaler_trains_on_photos_and_loads_from_safetensors(served_run, tmp_path):
    from neighbourhoods.core import catalog

    photos = served_run[0].parent / "toytown" / "photos"
    ws = tmp_path / "ws"      # its own workspace: the shared run keeps the weightless default
    ws.mkdir()
    catalog.connect(ws / "catalog.sqlite").close()
    meta = train_sr(ws, photos, SRConfig(steps=3, batch=4, channels=8), max_photos=8, progress=False)
    assert meta["n_photos"] == 8
    assert (ws / "upscale" / "espcn-x2.safetensors").is_file()
    up = get_upscaler("espcn", workspace=ws)
    assert get_upscaler(None, workspace=ws).name == "espcn"      # the measured best, once trained
    img = Image.open(next(iter(sorted(photos.iterdir())))).convert("RGB").resize((64, 48))
    out = up.resize(img, (256, 192))
    assert up.name == "espcn" and out.size == (256, 192)
    assert np.array_equal(np.asarray(out), np.asarray(up.resize(img, (256, 192))))


def test_export_gives_the_same_pixels_and_serves_without_model_code(served_run, tmp_path):
    from neighbourhoods.export import export
    from neighbourhoods.thumbnails.exported import load_exported

    ws, run = served_run
    result = export(ws, run, tmp_path / "g.pt2")
    assert result["max_abs_diff"] == 0
    exported = load_exported(tmp_path / "g.pt2")
    original = load_source(ws, run)
    assert exported.fingerprint == original.fingerprint
    # one image per call, as serving samples (CPU kernels differ with the batch size by a grey level)
    assert np.array_equal(exported.sample([2, 0], [11, 12], batch_size=1), original.sample([2, 0], [11, 12]))


def test_loading_a_tampered_export_is_a_clear_error(served_run, tmp_path):
    from neighbourhoods.export import export
    from neighbourhoods.thumbnails.exported import load_exported

    ws, run = served_run
    export(ws, run, tmp_path / "g.pt2")
    (tmp_path / "g.pt2").write_bytes(b"not a model")
    with pytest.raises(NeighbourhoodsError, match="cannot load"):
        load_exported(tmp_path / "g.pt2")


def test_source_from_a_missing_run_is_a_clear_error(served_run):
    ws, _ = served_run
    with pytest.raises(NeighbourhoodsError, match="no training run"):
        load_source(ws, "nope")


def test_source_is_a_plain_value(source):
    assert isinstance(source, Source) and source.res == (48, 64)


@pytest.mark.slow
def test_upscalers_restore_real_photos_better_than_nearest_neighbour(shared_data):
    def psnr(a, b):
        return 10 * np.log10(255.0 ** 2 / np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2))

    photos = sorted((shared_data / "socal" / "images").glob("*.jpg"))[:8]
    for name in [n for n in NAMES if n != "espcn"]:
        gains = []
        for p in photos:
            real = Image.open(p).convert("RGB").resize((128, 96), Image.LANCZOS)
            small = real.resize((64, 48), Image.LANCZOS)
            gains.append(psnr(get_upscaler(name).resize(small, (128, 96)), real)
                         - psnr(small.resize((128, 96), Image.NEAREST), real))
        assert np.mean(gains) > 0, name


def test_the_website_path_trains_the_workspace_upscaler_once_on_its_training_photos(tmp_path):
    from toy_run import make_toy_workspace

    from neighbourhoods.upscale import ensure_sr

    ws = make_toy_workspace(tmp_path, res=((32, 32),))
    assert get_upscaler(None, workspace=ws).name == "lanczos"
    meta = ensure_sr(ws, progress=False, steps=3)
    assert meta["n_photos"] == 39                      # every kept photo (no holdout in this workspace)
    assert get_upscaler(None, workspace=ws).name == "espcn"
    assert ensure_sr(ws, progress=False, steps=3) is None   # once per workspace


# --- distinct listings ----------------------------------------------------------------------------
def _house_guard(source, house_of_seed: dict, max_attempts=4, copies=()):
    """A guard whose feature of a sample is its 'house' (one-hot; default: a house of its own per seed)
    and whose distinct rule calls two samples of one house near-duplicates."""
    from neighbourhoods.thumbnails.distinct import Distinct

    drawn = {}

    def sample(classes, seeds):
        out = source.sample(classes, seeds)
        drawn.update({im.tobytes(): s for im, s in zip(out, seeds)})
        return out

    def embed(imgs):
        f = np.zeros((len(imgs), 4097))
        for row, im in enumerate(imgs):
            seed = drawn[im.tobytes()]
            f[row, house_of_seed.get(seed, seed % 4093 + 3)] = 1.0
            f[row, -1] = seed in copies      # the last column: a near-copy of a training photo
        return f

    guard = Guard(embed=embed, similarity=lambda f: f[:, -1], threshold=0.9, max_attempts=max_attempts,
                  distinct=Distinct(thresholds=np.array([0.9]), phash_bits=0))
    return Source(source.class_names, source.res, sample, source.fingerprint), guard


def test_a_citys_listings_are_distinct_and_a_seed_gives_the_same_sample_whatever_came_first(source):
    from neighbourhoods.core.cities import CityMatch
    from neighbourhoods.thumbnails.distinct import Ledgers
    from neighbourhoods.thumbnails.guard import render_listings

    tracked, guard = _house_guard(source, {2: 0, 5: 0})     # seeds 2 and 5 draw one house
    city = CityMatch(source.class_names[0], 0, source.class_names[0], False)
    in_order = render_listings(tracked, city, list(range(8)), guard, Ledgers())
    assert [s.used_seed for s in in_order][:5] == [0, 1, 2, 3, 4]
    assert in_order[5].used_seed == derived_seed(5, 1) and in_order[5].distinct      # the later one is replaced
    assert in_order[5].rejected == "one house with an earlier listing" and not in_order[4].rejected
    alone = render_listings(tracked, city, [5], guard, Ledgers())[0]                   # a fresh process, seed 5 first
    assert alone.used_seed == in_order[5].used_seed and np.array_equal(alone.image, in_order[5].image)
    # where no attempt is a house of its own, the least alike novel one is served, and says so
    every = {derived_seed(5, a): 0 for a in range(4)} | {2: 0}
    tracked, guard = _house_guard(source, every)
    last = render_listings(tracked, city, list(range(6)), guard, Ledgers())[5]
    assert not last.distinct
    # a seed whose every attempt is a near-copy has no sample; the seeds after it in its block still do
    tracked, guard = _house_guard(source, {}, copies={derived_seed(3, a) for a in range(4)})
    ledgers = Ledgers()
    with pytest.raises(NoNovelSample):
        render_listings(tracked, city, [3], guard, ledgers)
    assert [s.used_seed for s in render_listings(tracked, city, [4, 5], guard, ledgers)] == [4, 5]


def test_listings_asked_together_are_drawn_in_one_batch_per_block_and_match_one_at_a_time(source):
    from neighbourhoods.core.cities import CityMatch
    from neighbourhoods.thumbnails.distinct import BLOCK, Ledgers
    from neighbourhoods.thumbnails.guard import render_listings

    tracked, guard = _house_guard(source, {2: 0, 5: 0})
    batches = []
    sample = tracked.sample

    def counted(classes, seeds):
        batches.append(len(seeds))
        return sample(classes, seeds)

    tracked = Source(tracked.class_names, tracked.res, counted, tracked.fingerprint)
    city = CityMatch(source.class_names[0], 0, source.class_names[0], False)
    asked = [7, 3, 0, 40, BLOCK + 2]
    together = render_listings(tracked, city, asked, guard, Ledgers())
    # first attempts: seeds 0..40 in one batch, then BLOCK..BLOCK+2; 5's retries once (a house of 2's)
    assert batches == [41, guard.max_attempts - 1, 3]
    one_by_one = [render_listings(tracked, city, [s], guard, Ledgers())[0] for s in asked]
    assert [s.used_seed for s in together] == [s.used_seed for s in one_by_one]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(together, one_by_one))


def test_distinct_thresholds_come_from_each_citys_own_photo_pairs():
    from neighbourhoods.thumbnails.distinct import Distinct, Ledger, calibrate_distinct

    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)   # noqa: E731
    tight = unit(np.ones(16) + 0.1 * rng.normal(size=(100, 16)))     # a city of look-alike photos
    loose = unit(rng.normal(size=(100, 16)))
    few = unit(rng.normal(size=(5, 16)))
    gate = calibrate_distinct(np.concatenate([tight, loose, few]), np.repeat([0, 1, 2], [100, 100, 5]), 3)
    assert gate.thresholds[0] > gate.thresholds[1]
    assert gate.thresholds[2] == np.median(gate.thresholds[:2])     # too few photos: the cities' median
    ledger = Ledger(start=0, features=[tight[0]], hashes=[0b1111])
    assert Distinct(np.array([0.5]), phash_bits=6).duplicate(tight[1], 0xFFFF0000, ledger, 0)[0]   # by features
    assert Distinct(np.array([1.1]), phash_bits=6).duplicate(loose[1], 0b1110, ledger, 0)[0]       # by hash
    assert not Distinct(np.array([1.1]), phash_bits=6).duplicate(loose[1], 0xFFFF0000, ledger, 0)[0]
