"""Instance conditioning (IC-GAN): the bank of photo features, its neighbour lists, and a run
that trains, resumes exactly and samples with it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import one_thread  # noqa: F401 (autouse: tiny nets run on one thread)
from toy_run import make_toy_workspace

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.models import runs
from neighbourhoods.models.projected import build_generator
from neighbourhoods.train import TrainConfig, train
from neighbourhoods.train.instances import build_instances, city_embeddings

TINY = {"z_dim": 16, "g_max_channels": 16, "g_min_channels": 8, "d_head_width": 8, "instance_dim": 8,
        "feature_min_side": 0}


@pytest.fixture(scope="module")
def toy_ws(tmp_path_factory) -> Path:
    return make_toy_workspace(tmp_path_factory.mktemp("toy-instances"), res=((32, 32),))


def config(**overrides) -> TrainConfig:
    cfg = TrainConfig(model="projected", res=(32, 32), batch=8, kimg=0.032, min_city_photos=5, model_kwargs=TINY,
                      instance_k=3, augment="color,translation,cutout", mirror=True, ema_kimg=0.01,
                      snapshot_every=16, sample_every=16, tick_every=8, grid_rows=4, grid_seeds=3,
                      bn_stat_images=16, progress=False)
    return replace(cfg, **overrides)


def test_bank_groups_rows_by_class_and_neighbours_stay_in_their_class():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    rows = np.arange(30)[::-1].copy()            # photo i is images[rows[i]]
    classes = np.array([2, 0, 1] * 9 + [1, 1, 0])
    inst = build_instances("projected", images, rows, classes, num_classes=4, k=4, dim=8)
    assert inst.features.shape == (30, 8)
    assert np.allclose(np.linalg.norm(inst.features, axis=1), 1, atol=1e-5)
    assert inst.count.tolist() == [10, 11, 9, 1]     # the empty class 3 still maps to one row
    for photo, c in enumerate(classes):
        row = inst.row_of[photo]
        assert inst.start[c] <= row < inst.start[c] + inst.count[c]
        assert inst.neighbours[row, 0] == row                      # itself first
        assert all(inst.start[c] <= n < inst.start[c] + inst.count[c] for n in inst.neighbours[row])
        assert len(set(inst.neighbours[row].tolist())) == 5       # k distinct neighbours, then it
    # the nearest neighbour is the most similar other row of the class
    r = inst.row_of[0]
    a, n = inst.start[classes[0]], inst.count[classes[0]]
    sims = inst.features[a:a + n] @ inst.features[r]
    sims[r - a] = -np.inf
    assert inst.neighbours[r, 1] == a + int(np.argmax(sims))


def test_a_sample_picks_its_instance_from_its_latent_within_its_city():
    G = build_generator(3, (32, 32), z_dim=16, g_max_channels=16, g_min_channels=8, instances=12, instance_dim=8)
    G.instances.features.copy_(torch.randn(12, 8))
    G.instances.start.copy_(torch.tensor([0, 5, 9]))
    G.instances.count.copy_(torch.tensor([5, 4, 3]))
    z = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4000) % 3
    rows = G.instances.pick(z, labels)
    for c, (a, n) in enumerate([(0, 5), (5, 4), (9, 3)]):
        picked = rows[labels == c]
        assert picked.min() == a and picked.max() == a + n - 1
        assert np.bincount(picked.numpy() - a).min() > 0.7 * len(picked) / n   # about uniform
    G.eval()
    with torch.no_grad():
        one = G(z[:4], labels[:4])
        assert torch.equal(one, G(z[:4], labels[:4], G.instances.pick(z[:4], labels[:4])))
        assert not torch.equal(one, G(z[:4], labels[:4], (G.instances.pick(z[:4], labels[:4]) + 1) % 12))


def test_an_instance_conditioned_run_resumes_exactly_and_samples_every_city(toy_ws):
    whole = train(toy_ws, config(run="ic-whole"))
    train(toy_ws, config(run="ic-part", kimg=0.016))
    part = train(toy_ws, config(run="ic-part", resume=True))
    for net in ("G", "G_ema", "D"):
        a = load_file(str(runs.latest_checkpoint(whole)[0] / f"{net}.safetensors"))
        b = load_file(str(runs.latest_checkpoint(part)[0] / f"{net}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{net}.{key} differs"
    gen = runs.load_generator(whole)
    assert gen.config["model_args"]["kwargs"]["instances"] == gen.config["train_photos"]
    bank = gen.model.instances
    assert bank.count.sum() == gen.config["train_photos"] and bank.features.abs().sum() > 0
    cities = gen.city_map.cities
    images = runs.sample(gen, [gen.class_index(c) for c in cities], list(range(len(cities))))
    assert images.shape == (len(cities), 32, 32, 3)


def test_instance_conditioning_is_refused_for_a_model_without_it(toy_ws):
    with pytest.raises(NeighbourhoodsError, match="no instance conditioning"):
        train(toy_ws, TrainConfig(model="dcgan", res=(32, 32), kimg=0.01, instance_k=3, progress=False))


def test_an_instance_conditioned_generator_exports_with_its_bank(toy_ws, tmp_path):
    from neighbourhoods.export import export
    from neighbourhoods.thumbnails.exported import load_exported
    from neighbourhoods.thumbnails.source import load_source

    run = train(toy_ws, config(run="ic-export", kimg=0.016))
    result = export(toy_ws, run.name, tmp_path / "g.pt2")
    assert result["max_abs_diff"] == 0
    exported = load_exported(tmp_path / "g.pt2")
    classes, seeds = [0, 1, 2, 0], [3, 4, 5, 6]
    # one sample per call, as serving draws them (bytes never depend on the batch)
    assert np.array_equal(exported.sample(classes, seeds, batch_size=1), load_source(toy_ws, run.name).sample(classes, seeds))


# --- city embeddings started from the photos' features (StyleGAN-XL) ----------------------------------
def test_city_embeddings_start_at_each_citys_mean_photo_feature():
    rng = np.random.default_rng(1)
    sky = np.zeros((8, 32, 32, 3), np.uint8)
    sky[..., 2] = 220                                          # classes 0 and 1: blue pictures
    grass = np.zeros((4, 32, 32, 3), np.uint8)
    grass[..., 1] = 180                                        # class 2: green ones
    noise = rng.integers(0, 40, (12, 32, 32, 3), dtype=np.uint8)
    images = np.concatenate([sky, grass]) + noise
    classes = np.array([0, 1] * 4 + [2] * 4)
    start = city_embeddings("projected", images, np.arange(12), classes, num_classes=4, dim=6)
    assert start.shape == (4, 6) and start.dtype == np.float32
    assert np.isclose(start[:3].std(), 1.0, atol=1e-5)        # the scale of nn.Embedding's own start
    assert np.all(start[3] == 0)                               # a class without photos: the mean photo
    alike, apart = np.linalg.norm(start[0] - start[1]), np.linalg.norm(start[0] - start[2])
    assert alike < 0.3 * apart                                 # two blue cities start near each other


def test_a_run_with_city_embeddings_from_features_starts_there_and_resumes_exactly(toy_ws):
    cfg = config(instance_k=0, city_init="features")
    whole = train(toy_ws, replace(cfg, run="ci-whole"))
    first = load_file(str(whole / "checkpoints" / "0000000000" / "G.safetensors"))["embed.weight"]
    random_start = load_file(str(train(toy_ws, config(instance_k=0, run="ci-random", kimg=0.008))
                                 / "checkpoints" / "0000000000" / "G.safetensors"))["embed.weight"]
    assert not torch.allclose(first, random_start)
    assert np.isclose(first.std().item(), 1.0, atol=0.2)
    train(toy_ws, replace(cfg, run="ci-part", kimg=0.016))
    part = train(toy_ws, replace(cfg, run="ci-part", resume=True))
    a = load_file(str(runs.latest_checkpoint(whole)[0] / "G.safetensors"))
    b = load_file(str(runs.latest_checkpoint(part)[0] / "G.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_city_embeddings_from_features_are_refused_where_they_cannot_apply(toy_ws):
    with pytest.raises(NeighbourhoodsError, match="no pretrained feature net"):
        train(toy_ws, TrainConfig(model="dcgan", res=(32, 32), kimg=0.01, city_init="features", progress=False))
    with pytest.raises(NeighbourhoodsError, match="unknown --city-init 'mean'"):
        train(toy_ws, config(city_init="mean"))
