"""Shared fixtures. Real photos live in ../shared/data beside the checkout and are never committed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NEIGHBOURHOODS_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    # Under pytest-xdist each worker is one of as many processes as cores: one thread each (and in
    # the processes its tests start), or their threads spin-wait for each other's cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny nets gain nothing from a second thread, and on a shared machine its spin-waits cost 20x.
    A module that trains them uses it: pytestmark = pytest.mark.usefixtures("one_torch_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real listing photos), or skip with a clear message where it is absent."""
    if not (SHARED_DATA / "houses").is_dir() or not (SHARED_DATA / "socal").is_dir():
        pytest.skip(f"real photos not found at {SHARED_DATA} (set NEIGHBOURHOODS_SHARED_DATA); "
                    "skipping end-to-end test on real data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def served_run(tmp_path_factory):
    """(workspace, run name): toy town ingested at 48x64 and a tiny dcgan trained a few steps.

    Shared by the generate/serve/gallery tests (owned by `serve`); small so the session stays fast.
    """
    from neighbourhoods.demo.toytown import draw_toytown
    from neighbourhoods.ingest import ingest

    root = tmp_path_factory.mktemp("served")
    photos, labels = draw_toytown(root / "toytown", per_city=12)
    ws = root / "ws"
    # a holdout per city, so the novelty guard can calibrate its threshold
    ingest(photos, ws, labels=labels, res=[(48, 64)], holdout=0.25, holdout_min=4, workers=1, progress=False)
    return ws, _train_tiny_run(ws)


def _train_tiny_run(ws) -> str:
    from neighbourhoods.train import TrainConfig, train

    train(ws, TrainConfig(model="dcgan", res=(48, 64), run="tiny", kimg=0.016, batch=8, min_city_photos=1,
                          model_kwargs={"ngf": 16}, snapshot_every=10_000, sample_every=10_000,
                          num_workers=0, progress=False))
    return "tiny"
