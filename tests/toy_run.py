"""Toy-town fixtures: a tiny trained run with a held-out split (test_evaluate, test_report), and
`make_toy_workspace` (test_train, test_cities).

The run is built once per test session under pytest's base temp folder (both test files call
`toy_run(tmp_path_factory)`): 3 cities x 12 photos at 32x32, a quarter held out, a DCGAN with
a few hundred parameters trained on 64 images. Its samples are grey blobs: far from the real
photos, which is what the tests check the metrics say.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from neighbourhoods.core.workspace import Workspace

RES = (32, 32)
CITIES = ("Pinecrest", "Sunvale", "Harborview")


@dataclass(frozen=True)
class ToyRun:
    root: Path
    ws: Workspace
    run: str

    @property
    def run_dir(self) -> Path:
        return self.ws.run_dir(self.run)


def toy_run(tmp_path_factory) -> ToyRun:
    from neighbourhoods.demo.toytown import draw_toytown
    from neighbourhoods.ingest import ingest
    from neighbourhoods.train import TrainConfig, train

    root = tmp_path_factory.getbasetemp() / "evaluate-toy-run"
    ws = root / "ws"
    done = root / "done"
    if not done.is_file():
        photos, labels = draw_toytown(root / "toytown", cities=CITIES, per_city=12, seed=0)
        ingest(photos, ws, labels=labels, res=[RES], holdout=0.25, holdout_min=10, workers=1, progress=False)
        train(ws, TrainConfig(model="dcgan", res=RES, batch=8, kimg=0.064, min_city_photos=5, run="tiny",
                              model_kwargs={"ngf": 8, "ndf": 8, "z_dim": 16, "g_embed": 4, "d_embed": 2},
                              snapshot_every=32, sample_every=16, tick_every=8,
                              num_workers=0, progress=False))
        done.write_text("ok")
    return ToyRun(root=root, ws=Workspace(ws), run="tiny")


def make_toy_workspace(root: Path, res=((32, 32), (48, 64))) -> Path:
    """Toy town (3 cities x 12 photos + 'Tinyville' with 3) ingested at `res`; no holdout."""
    from neighbourhoods.demo.toytown import draw_toytown
    from neighbourhoods.ingest import ingest

    photos, labels = draw_toytown(root / "toytown", cities=("Pinecrest", "Sunvale", "Harborview"), per_city=12)
    extra, extra_labels = draw_toytown(root / "tiny", cities=("Tinyville",), per_city=3, seed=1)
    for f in extra.iterdir():
        shutil.copy(f, photos / f"tiny-{f.name}")
    with open(labels, "a") as out:
        for line in extra_labels.read_text().splitlines()[1:]:
            out.write(f"tiny-{line}\n")
    ws = root / "ws"
    ingest(photos, ws, labels=labels, res=list(res), holdout_min=1000, workers=1, progress=False)
    return ws
