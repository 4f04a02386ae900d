"""The website's 4:3 path end to end on toy town: ingest reports the size, train at 48x64 (the
photos' own aspect), evaluate scores the served thumbnails, generate and serve answer 4:3."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from openapi_check import checked_client
from PIL import Image

from neighbourhoods.demo.toytown import draw_toytown
from neighbourhoods.evaluate import EvaluateConfig, evaluate
from neighbourhoods.generate import GenerateConfig, generate
from neighbourhoods.ingest import ingest
from neighbourhoods.serve import ServeConfig, build, create_app
from neighbourhoods.train import TrainConfig, train


@pytest.fixture(scope="module")
def website_run(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("website")
    photos, labels = draw_toytown(root / "town", cities=("Pinecrest", "Sunvale"), per_city=16)
    summary = ingest(photos, root / "ws", labels=labels, res=[(48, 64)], holdout=0.25, holdout_min=8, workers=1,
                     progress=False)
    run = train(root / "ws", TrainConfig(res=(48, 64), batch=8, kimg=0.032, min_city_photos=5, run="web",
                                         model_kwargs={"z_dim": 16, "g_max_channels": 16, "g_min_channels": 8,
                                                       "d_head_width": 8},
                                         snapshot_every=32, sample_every=32, tick_every=16,
                                         progress=False))
    yield root / "ws", run, summary
    torch.set_num_threads(before)


def test_the_4_3_path_end_to_end(website_run, tmp_path):
    ws, run, summary = website_run
    assert summary.photo_size == "128x96" and summary.supported_res == "96x128"
    result = evaluate(ws, run.name, EvaluateConfig(n=8, kid_subsets=10, min_city_holdout=2, size=(128, 96),
                                                   upscale="lanczos", novelty_spaces=()), progress=False)
    assert result["res"] == [48, 64] and result["scored_at"] == "128x96 thumbnails (lanczos, jpg)"
    manifest = generate(ws, run.name, tmp_path / "out", GenerateConfig(n=2, size=(256, 192), novelty=False,
                                                                       cities=["Sunvale"]), progress=False)
    first = manifest["cities"]["Sunvale"]["files"][0]["file"]
    assert Image.open(tmp_path / "out" / first).size == (256, 192)
    thumbs = build(ws, run.name, ServeConfig(max_batch=4, max_wait_ms=5), novelty=False)
    with checked_client(create_app(thumbs)) as client:
        r = client.get("/thumbnail", params={"city": "Pinecrest", "seed": 3, "size": "256x192"})
        assert r.status_code == 200
        img = np.asarray(Image.open(io.BytesIO(r.content)))
        assert img.shape == (192, 256, 3)
