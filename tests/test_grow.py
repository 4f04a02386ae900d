"""Growing a run by an octave (train --grow-from): the smaller run's G below a new top block, the
grown run resumes exactly, and every impossible step is refused in one line."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from test_train import TINY as TINY_MODELS
from toy_run import make_toy_workspace

from neighbourhoods import models
from neighbourhoods.cli import main
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.models import runs
from neighbourhoods.train import TrainConfig, train
from neighbourhoods.train.config import GROW_FADE_KIMG

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny nets on one thread

TINY = TINY_MODELS["projected"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_toy_workspace(tmp_path_factory.mktemp("grow"), res=((32, 32), (64, 64), (48, 64), (96, 128)))


def tiny(**overrides) -> TrainConfig:
    cfg = TrainConfig(model="projected", res=(32, 32), batch=8, kimg=0.016, min_city_photos=5, model_kwargs=TINY,
                      snapshot_every=16, sample_every=16, tick_every=8, num_workers=0, progress=False, augment="color,translation,cutout",
                      mirror=True, ema_kimg=0.01)
    return replace(cfg, **overrides)


@pytest.fixture(scope="module")
def small(ws):
    return train(ws, tiny(run="small"))


def grown(**overrides) -> TrainConfig:
    return tiny(**{"res": (64, 64), "grow_from": "small", "model_kwargs": {}, **overrides})


def weights(run_dir, net="G"):
    folder, _ = runs.latest_checkpoint(run_dir)
    return load_file(str(folder / f"{net}.safetensors"))


def test_a_grown_generator_starts_as_the_smaller_one_enlarged():
    torch.manual_seed(0)
    small_kwargs = {**TINY, "g_cond_from": 1}
    G_small = models.build_generator("projected", 3, (24, 32), **small_kwargs).eval()
    kwargs = models.grown_kwargs("projected", (24, 32), small_kwargs)
    G = models.build_generator("projected", 3, (48, 64), **kwargs).eval()
    assert kwargs["g_channels"][:-1] == G_small.channels and len(G.blocks) == len(G_small.blocks) + 1
    models.load_grown("projected", G, G_small.state_dict())
    z, labels = torch.randn(4, 16), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        G.fade.fill_(0.0)
        start = G(z, labels)
        G.fade.fill_(1.0)
        end = G(z, labels)
        expected = torch.nn.functional.interpolate(G_small(z, labels), scale_factor=2.0, mode="nearest")
    assert torch.equal(start, expected)             # fade 0: the smaller run's houses, enlarged
    assert not torch.allclose(end, expected)        # fade 1: the new top block's own image


def test_weights_of_another_shape_do_not_load_into_a_grown_generator():
    G = models.build_generator("projected", 3, (48, 64), **models.grown_kwargs("projected", (24, 32), TINY))
    wrong = models.build_generator("projected", 3, (24, 32), **{**TINY, "g_max_channels": 32}).state_dict()
    with pytest.raises(ValueError):
        models.load_grown("projected", G, wrong)


def test_a_grown_run_trains_samples_and_says_what_it_grew(ws, small, capsys):
    run = train(ws, grown(run="grown", progress=True))
    captured = capsys.readouterr()   # one read: a second would come back empty
    out = captured.out + captured.err
    config = json.loads((run / "config.json").read_text())
    kwargs = config["model_args"]["kwargs"]
    assert config["grow_from"] == "small" and kwargs["g_grown"] is True
    assert kwargs["g_channels"][:-1] == runs.load_generator(small).model.channels
    gen = runs.load_generator(run)                   # config.json alone rebuilds the grown G
    assert gen.res == (64, 64) and runs.sample(gen, [0, 1], [3, 4]).shape == (2, 64, 64, 3)
    assert float(gen.model.fade) == pytest.approx(0.016 / GROW_FADE_KIMG)   # 16 of the fade's 10,000 images
    assert "growing run small to 64x64" in out
    # its first checkpoint is the smaller run's G_ema below the new block, not yet faded in
    start = load_file(str(run / "checkpoints" / f"{0:010d}" / "G_ema.safetensors"))
    small_ema = weights(small, "G_ema")
    assert float(start["fade"]) == 0.0
    for key in ("fc.weight", "blocks.0.convs.0.weight", "embed.weight"):
        assert torch.equal(start[key], small_ema[key])
    assert torch.equal(start["to_rgb_prev.weight"], small_ema["to_rgb.weight"])
    # the default recipe's layouts grow with it: the source's prior, not a new fit
    assert config["layouts"] == 16 and kwargs["layouts"] == 16
    for key in ("layouts.means", "layouts.chol", "layouts.cdf", "layout_in.1.weight"):
        assert torch.equal(start[key], small_ema[key])


def test_a_grown_run_keeps_its_sources_city_level_where_the_recipe_would_pick_another(ws):
    """48x64 -> 96x128: the recipe gives a new 96x128 run the city at level 2, a run grown from
    a 48x64 one (city at level 1) keeps level 1, its source's shape, without a clash."""
    train(ws, tiny(run="small-48", res=(48, 64)))
    from neighbourhoods.core.workspace import open_workspace
    from neighbourhoods.train.config import resolve_run
    _, cfg, _ = resolve_run(open_workspace(ws), tiny(run="grown-96", res=(96, 128), grow_from="small-48",
                                                     model_kwargs={}))
    assert cfg.model_kwargs["g_cond_from"] == 1 == models.recipe_kwargs("projected", (48, 64))["g_cond_from"]
    assert models.recipe_kwargs("projected", (96, 128))["g_cond_from"] == 2


def test_a_grown_run_keeps_its_sources_layouts(ws, small):
    with pytest.raises(NeighbourhoodsError, match=r"--layouts 0 differs from run 'small'.s \(16\)"):
        train(ws, grown(run="grown-nolayouts", layouts=0))


def test_a_grown_run_resumes_exactly(ws, small):
    whole = train(ws, grown(run="grown-whole", kimg=0.032))
    train(ws, grown(run="grown-part", kimg=0.016))
    part = train(ws, grown(run="grown-part", kimg=0.032, resume=True))
    for net in ("G", "G_ema", "D"):
        a, b = weights(whole, net), weights(part, net)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{net} {key} differs"


def test_a_run_stopped_mid_fade_samples_at_the_fade_it_trained_at(ws, small):
    run = train(ws, grown(run="grown-mid", kimg=0.008))
    assert float(runs.load_generator(run).model.fade) == pytest.approx(0.008 / GROW_FADE_KIMG)   # 8 of 10,000 images


@pytest.mark.parametrize("flags, message", [
    (["--res", "48x64"], "growing adds one octave, so use --res 64x64"),
    (["--res", "64x64", "--model", "dcgan"], "model 'dcgan' cannot be grown"),
    (["--res", "64x64", "--model-kwargs", '{"g_min_channels": 4}'], "differ from run 'small'"),
])
def test_an_impossible_step_is_refused_in_one_line(ws, small, capsys, flags, message):
    args = ["train", "-w", str(ws), "--grow-from", "small", "--kimg", "0.008", "--run", "refused", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (ws / "runs" / "refused" / "config.json").exists()   # nothing but the run lock written


def test_growing_a_missing_run_or_another_model_is_refused(ws, small):
    with pytest.raises(NeighbourhoodsError, match="no training run 'nowhere'"):
        train(ws, grown(run="r1", grow_from="nowhere"))
    dcgan = train(ws, TrainConfig(model="dcgan", res=(32, 32), batch=8, kimg=0.008, min_city_photos=5, run="dc",
                                  model_kwargs={"ngf": 8, "ndf": 8, "z_dim": 16, "g_embed": 4, "d_embed": 2},
                                  num_workers=0, progress=False))
    with pytest.raises(NeighbourhoodsError, match="it is a dcgan run and this one is projected"):
        train(ws, grown(run="r2", grow_from=str(dcgan)))


def test_a_source_trained_on_other_classes_is_refused(ws, small):
    # Tinyville (3 photos) has its own class at min_city_photos 2, and is pooled at 5
    train(ws, tiny(run="small-2", min_city_photos=2, kimg=0.008))
    with pytest.raises(NeighbourhoodsError, match="trained on other classes"):
        train(ws, grown(run="r3", grow_from="small-2"))


def test_a_run_stopped_mid_fade_exports_as_it_samples(ws, small, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from neighbourhoods.export import _onnx, _wrapper

    gen = runs.load_generator(train(ws, grown(run="grown-export", kimg=0.008)))   # fade 0.5: both images count
    z = runs.noise_for_seeds([0, 1, 2], gen.z_dim)
    labels = torch.tensor([0, 1, 2])
    path = tmp_path / "grown.onnx"
    _onnx(_wrapper(gen.model), (z, labels), path, ["z", "labels"], ["images"],
          {"z": {0: "n"}, "labels": {0: "n"}, "images": {0: "n"}})
    got = ort.InferenceSession(str(path)).run(None, {"z": z.numpy(), "labels": labels.numpy()})[0]
    eager = runs.sample(gen, [0, 1, 2], [0, 1, 2])
    assert abs(got.astype(int) - eager.astype(int)).max() <= 1


def test_a_run_laid_out_for_growing_grows_into_the_native_layout():
    native = models.build_generator("projected", 3, (96, 128))
    small = models.build_generator("projected", 3, (48, 64), g_grow_octaves=1)
    assert small.channels == native.channels[:-1]
    grown_G = models.build_generator("projected", 3, (96, 128),
                                     **models.grown_kwargs("projected", (48, 64), {"g_grow_octaves": 1}))
    assert grown_G.channels == native.channels
    assert [len(b.convs) for b in grown_G.blocks] == [len(b.convs) for b in native.blocks]
    # the default 48x64 run grows into a slimmer G than the native one
    slim = models.build_generator("projected", 3, (96, 128), **models.grown_kwargs("projected", (48, 64), {}))
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in native.parameters())
