"""Layouts from the photos: the prior fitted to the training photos' coarse layouts, G drawing on
it, and a run that trains, resumes exactly, samples every city and exports with it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from toy_run import make_toy_workspace

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.models import runs
from neighbourhoods.models.projected import build_generator
from neighbourhoods.train import TrainConfig, train
from neighbourhoods.train.layouts import fit_layouts
from neighbourhoods.train.loss import layout_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny nets on one thread

TINY = {"z_dim": 16, "g_max_channels": 16, "g_min_channels": 8, "d_head_width": 8, "layout_dim": 6,
        "feature_min_side": 0}


@pytest.fixture(scope="module")
def toy_ws(tmp_path_factory) -> Path:
    return make_toy_workspace(tmp_path_factory.mktemp("toy-layouts"), res=((32, 32),))


def config(**overrides) -> TrainConfig:
    """A tiny projected run drawn on a 3-component layout prior, with the recipe's mode seeking."""
    cfg = TrainConfig(model="projected", res=(32, 32), batch=8, kimg=0.032, min_city_photos=5, model_kwargs=TINY,
                      layouts=3, augment="color,translation,cutout", mirror=True, ema_kimg=0.01, snapshot_every=16,
                      sample_every=16, tick_every=8, progress=False)
    return replace(cfg, **overrides)


def two_kinds_of_photo(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: sky over a dark lawn; class 1: a dark frame, light below. 32x32 NHWC uint8."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 30, (n, 32, 32, 3), dtype=np.uint8)
    classes = np.arange(n) % 2
    images[classes == 0, :16, :, 2] += 200      # blue top half
    images[classes == 1, 16:] += 180            # light bottom half
    return images, classes


def test_the_prior_draws_layouts_like_each_citys_photos():
    images, classes = two_kinds_of_photo()
    fit = fit_layouts(images, np.arange(len(images)), classes, num_classes=3, size=(8, 8), components=4, dim=6)
    G = build_generator(3, (32, 32), z_dim=16, g_max_channels=16, g_min_channels=8, layouts=4, layout_dim=6)
    fit.load_into(G)
    z = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(2000) % 3
    layouts = G.layouts.sample(z, labels)
    assert layouts.shape == (2000, 3, 8, 8) and layouts.min() >= -1 and layouts.max() <= 1
    blue_top = (layouts[:, 2, :4] - layouts[:, 2, 4:]).mean(dim=(1, 2)) > 0.5
    light_bottom = layouts[:, :, 4:].mean(dim=(1, 2, 3)) > 0.0
    # a city draws its own photos' kind of layout (the smoothing towards all photos leaves a few of the other)
    assert blue_top[labels == 0].float().mean() > 0.8 and light_bottom[labels == 1].float().mean() > 0.8
    assert blue_top[labels == 1].float().mean() < 0.2
    # a class without photos draws from all photos' mixture: both kinds
    assert 0.25 < blue_top[labels == 2].float().mean() < 0.75
    # seeds differ within a city, and the same seed in two cities is not the same layout
    first = layouts[labels == 0]
    assert (first[:100] - first[100:200]).abs().mean() > 0.05
    same_seed = G.layouts.sample(z[:200], torch.ones(200, dtype=torch.long))
    assert (same_seed - G.layouts.sample(z[:200], torch.zeros(200, dtype=torch.long))).abs().mean() > 0.05


def test_g_draws_on_the_layout_it_is_given_and_by_default_on_its_seeds_own():
    images, classes = two_kinds_of_photo()
    torch.manual_seed(0)
    G = build_generator(2, (32, 32), z_dim=16, g_max_channels=16, g_min_channels=8, layouts=4, layout_dim=6)
    fit_layouts(images, np.arange(len(images)), classes, 2, (8, 8), 4, 6).load_into(G)
    G.eval()
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    with torch.no_grad():
        own = G.layouts.sample(z, labels)
        drawn = G(z, labels)
        assert torch.equal(drawn, G(z, labels, layouts=own))
        assert not torch.equal(drawn, G(z, labels, layouts=own.flip(0)))
        # at the start G's image is its layout enlarged, give or take what its top conv adds
        assert layout_loss(drawn, own) < 0.3 * layout_loss(drawn, own.flip(0))


def test_a_run_with_layouts_resumes_exactly_samples_every_city_and_exports(toy_ws, tmp_path):
    from neighbourhoods.export import export
    from neighbourhoods.thumbnails.exported import load_exported
    from neighbourhoods.thumbnails.source import load_source

    whole = train(toy_ws, config(run="lay-whole"))
    train(toy_ws, config(run="lay-part", kimg=0.016))
    part = train(toy_ws, config(run="lay-part", resume=True))
    for net in ("G", "G_ema", "D"):
        a = load_file(str(runs.latest_checkpoint(whole)[0] / f"{net}.safetensors"))
        b = load_file(str(runs.latest_checkpoint(part)[0] / f"{net}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{net}.{key} differs"
    gen = runs.load_generator(whole)
    assert gen.config["model_args"]["kwargs"]["layouts"] == 3
    assert gen.model.layouts.chol.abs().sum() > 0          # the fit was saved with the weights
    cities = gen.city_map.cities
    images = runs.sample(gen, [gen.class_index(c) for c in cities], list(range(len(cities))))
    assert images.shape == (len(cities), 32, 32, 3)
    result = export(toy_ws, whole.name, tmp_path / "g.pt2")
    assert result["max_abs_diff"] == 0
    classes, seeds = [0, 1, 2, 0], [3, 4, 5, 6]
    assert np.array_equal(load_exported(tmp_path / "g.pt2").sample(classes, seeds, batch_size=1),
                          load_source(toy_ws, whole.name).sample(classes, seeds))


def record_layouts(monkeypatch) -> list[torch.Tensor]:
    """The layouts each training step's fakes are checked against (G's loss), as they come."""
    from neighbourhoods.train.loss import GANLoss

    seen = []
    generator = GANLoss.generator

    def recording(self, *, fakes):
        seen.append(fakes.layouts.clone())
        return generator(self, fakes=fakes)

    monkeypatch.setattr(GANLoss, "generator", recording)
    return seen


def pairs_share(layouts: torch.Tensor) -> bool:
    half = layouts.shape[0] // 2
    return torch.equal(layouts[:half], layouts[half:])


@pytest.mark.parametrize("mode_seeking, paired", [(None, True), (0.0, False)])
def test_mode_seeking_pairs_share_a_layout(toy_ws, monkeypatch, mode_seeking, paired):
    seen = record_layouts(monkeypatch)
    train(toy_ws, config(run=f"lay-pair-{paired}", kimg=0.016, mode_seeking=mode_seeking))   # None: the recipe's 0.5
    assert seen and all(pairs_share(layouts) == paired for layouts in seen)


def test_a_run_from_before_paired_layouts_refuses_to_resume_in_one_line(toy_ws):
    run = train(toy_ws, config(run="lay-pre-pair", kimg=0.016))
    saved = json.loads((run / "config.json").read_text())
    saved["pair_layouts"] = False                    # as a run trained with --no-pair-layouts wrote it
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(NeighbourhoodsError, match="pair_layouts=False: --pair-layouts was removed"):
        train(toy_ws, config(run="lay-pre-pair", kimg=0.032, resume=True))


def test_layouts_are_refused_where_they_cannot_apply(toy_ws):
    with pytest.raises(NeighbourhoodsError, match="cannot draw on layouts"):
        train(toy_ws, TrainConfig(model="dcgan", res=(32, 32), kimg=0.01, layouts=4, progress=False))
    with pytest.raises(NeighbourhoodsError, match="--layouts must be >= 0"):
        train(toy_ws, config(layouts=-1))


def test_a_4_3_run_with_layouts_exports_to_an_onnx_replica(served_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from neighbourhoods.export import export_onnx

    ws, _ = served_run   # toy town at 48x64 with a holdout, which the replica's novelty guard calibrates on
    run = train(ws, config(run="layouts-onnx", res=(48, 64), kimg=0.016, min_city_photos=1))
    assert runs.load_generator(run).model.layouts.size == (6, 8)     # G's first upsampled level at 4:3
    result = export_onnx(ws, run.name, tmp_path / "g.onnx")
    assert result["max_abs_diff"] <= 1                       # pixels within 1/255 of the eager generator
