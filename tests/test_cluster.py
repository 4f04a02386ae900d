"""`cluster` and `select`: exteriors, interiors and floorplans separate; selection; resumable embeddings."""

from __future__ import annotations

import collections
import csv
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neighbourhoods.cli import main
from neighbourhoods.cluster import ClusterConfig, cluster
from neighbourhoods.cluster.embed import embed_photos, embeddings_dir, load_embeddings
from neighbourhoods.core import catalog
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.prepared import load_split
from neighbourhoods.core.workspace import open_workspace
from neighbourhoods.demo.toytown import draw_toytown
from neighbourhoods.ingest import ingest
from neighbourhoods.nets.efficientnet import (
    efficientnet_features,
    efficientnet_input,
    imagenet_probs_from_pooled,
    load_efficientnet_lite0,
)
from neighbourhoods.select import select, selected_paths

RES = 96  # toy-town photos are 128x96; 64 px is too small for the network to call rooms rooms


def _kinds(labels_csv: Path) -> dict[str, str]:
    with open(labels_csv, newline="") as f:
        return {row["file"]: row["kind"] for row in csv.DictReader(f)}


def _catalog(ws_path: Path, columns: str) -> list:
    con = catalog.connect(Path(ws_path) / "catalog.sqlite")
    try:
        return con.execute(f"SELECT {columns} FROM photos WHERE status = 'kept' ORDER BY id").fetchall()
    finally:
        con.close()


def _toy_workspace(root: Path, per_city: int = 10) -> tuple[Path, Path, Path]:
    photos, labels = draw_toytown(root / "toy", per_city=per_city)
    ws = root / "ws"
    ingest(photos, ws, labels=labels, progress=False, workers=1)
    return photos, labels, ws


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """Toy town (30 photos: 21 exteriors, 6 rooms, 3 floorplans), ingested and clustered once."""
    photos, labels, ws = _toy_workspace(tmp_path_factory.mktemp("clustered"))
    summary = cluster(ws, ClusterConfig(k=4, res=RES), progress=False)
    return ws, _kinds(labels), summary


def test_exteriors_interiors_and_floorplans_land_in_separate_clusters(clustered):
    ws, kinds, _ = clustered
    kinds_in = collections.defaultdict(set)
    for row in _catalog(ws, "path, cluster"):
        kinds_in[row["cluster"]].add(kinds[Path(row["path"]).name])
    assert all(len(k) == 1 for k in kinds_in.values()), dict(kinds_in)
    assert set().union(*kinds_in.values()) == {"exterior", "interior", "floorplan"}


def test_cluster_counts_cover_every_kept_photo_largest_first(clustered):
    ws, _, summary = clustered
    counts = [c.photos for c in summary.clusters]
    assert sum(counts) == len(_catalog(ws, "id")) == summary.photos
    assert counts == sorted(counts, reverse=True)


def test_auto_exteriors_selects_exactly_the_exterior_photos(clustered):
    ws, kinds, summary = clustered
    result = select(ws, auto="exteriors")
    chosen = {Path(p).name for p in selected_paths(ws)}
    assert chosen == {name for name, kind in kinds.items() if kind == "exterior"}
    assert result.selected == len(chosen)
    suggested = {c.cluster: c.suggestion for c in summary.clusters}
    assert {suggested[c] for c in result.clusters} == {"exteriors"}


def test_floorplans_are_suggested_as_documents_and_rooms_as_interiors(clustered):
    ws, kinds, summary = clustered
    kind_of_cluster = {row["cluster"]: kinds[Path(row["path"]).name] for row in _catalog(ws, "path, cluster")}
    expected = {"exterior": "exteriors", "interior": "interiors", "floorplan": "documents"}
    assert {c.cluster: c.suggestion for c in summary.clusters} == {
        c: expected[kind] for c, kind in kind_of_cluster.items()}


def test_select_by_number_marks_those_clusters_and_nothing_else(clustered):
    ws, _, summary = clustered
    smallest = summary.clusters[-1].cluster
    select(ws, clusters=[smallest])
    rows = _catalog(ws, "cluster, selected")
    assert {r["selected"] for r in rows if r["cluster"] == smallest} == {1}
    assert {r["selected"] for r in rows if r["cluster"] != smallest} == {0}


def test_select_list_prints_selected_paths_one_a_line(clustered, capsys):
    ws, kinds, _ = clustered
    assert main(["select", "--workspace", str(ws), "--auto", "exteriors"]) == 0
    capsys.readouterr()
    assert main(["select", "--workspace", str(ws), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(Path(p).name for p in lines) == sorted(n for n, k in kinds.items() if k == "exterior")
    assert all(Path(p).is_file() for p in lines)


def test_select_rejects_unknown_cluster_with_one_line_error(clustered, capsys):
    ws, _, _ = clustered
    assert main(["select", "--workspace", str(ws), "--clusters", "0,7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no cluster 7") and "Traceback" not in err


def test_contact_sheets_and_page_show_every_cluster(clustered):
    ws, _, summary = clustered
    page = (Path(ws) / "clusters" / "index.html").read_text()
    for c in summary.clusters:
        sheet = Path(ws) / "clusters" / c.sheet
        assert c.sheet in page and f"{c.photos} photos" in page
        with Image.open(sheet) as im:
            assert im.format == "PNG" and im.width > 0
    assert (Path(ws) / "clusters" / "clusters.json").is_file()


def test_cluster_cli_prints_a_table_with_suggestions(clustered, capsys):
    ws, _, _ = clustered
    assert main(["cluster", "--workspace", str(ws), "-k", "4", "--res", str(RES)]) == 0
    out = capsys.readouterr().out
    assert "suggestion" in out and "exteriors" in out and "0 embedded" in out


def test_embeddings_are_deterministic(clustered, tmp_path):
    ws, _, _ = clustered
    ids, first = load_embeddings(open_workspace(ws), "efficientnet_lite0", RES)
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy, ignore=shutil.ignore_patterns("embeddings"))
    summary = embed_photos(open_workspace(copy), res=RES, progress=False)
    ids2, second = load_embeddings(open_workspace(copy), "efficientnet_lite0", RES)
    assert summary.embedded == len(ids) and np.array_equal(ids, ids2)
    assert np.array_equal(first, second)


def test_embedding_run_killed_midway_resumes_where_it_stopped(clustered, tmp_path):
    """A real kill -9 after two stored chunks: whole chunks survive, the rerun embeds only the rest."""
    ws, _, _ = clustered
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy, ignore=shutil.ignore_patterns("embeddings"))
    script = (
        "import os, signal, sys\n"
        "from neighbourhoods.cluster.embed import embed_photos\n"
        "from neighbourhoods.core.workspace import open_workspace\n"
        "embed_photos(open_workspace(sys.argv[1]), res=int(sys.argv[2]), batch_size=8, chunk_batches=1,\n"
        "             progress=False, on_chunk=lambda done: done >= 16 and os.kill(os.getpid(), signal.SIGKILL))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(copy), str(RES)], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    folder = embeddings_dir(open_workspace(copy), "efficientnet_lite0", RES)
    assert len(list(folder.glob("chunk-*.npz"))) == 2

    resumed = embed_photos(open_workspace(copy), res=RES, batch_size=8, chunk_batches=1, progress=False)
    assert (resumed.reused, resumed.embedded) == (16, len(_catalog(copy, "id")) - 16)
    ids, uninterrupted = load_embeddings(open_workspace(ws), "efficientnet_lite0", RES)
    ids2, after_resume = load_embeddings(open_workspace(copy), "efficientnet_lite0", RES)
    assert np.array_equal(ids, ids2)
    np.testing.assert_allclose(after_resume, uninterrupted, rtol=2e-3, atol=1e-3)  # float16 storage


def test_new_photos_are_embedded_and_old_ones_reused(tmp_path):
    photos, labels, ws = _toy_workspace(tmp_path, per_city=4)
    first = embed_photos(open_workspace(ws), res=RES, progress=False)
    extra = tmp_path / "toy" / "photos" / "extra.jpg"
    Image.open(next(iter(sorted(photos.glob("*.jpg"))))).transpose(Image.FLIP_LEFT_RIGHT).save(extra)
    ingest(photos, ws, labels=labels, progress=False, workers=1)
    second = embed_photos(open_workspace(ws), res=RES, progress=False)
    assert (second.embedded, second.reused) == (1, first.embedded)


def test_select_refuses_photos_ingested_after_clustering(tmp_path):
    photos, labels, ws = _toy_workspace(tmp_path, per_city=4)
    cluster(ws, ClusterConfig(k=2, res=RES), progress=False)
    Image.new("RGB", (128, 96), (10, 200, 30)).save(photos / "new.jpg")
    ingest(photos, ws, labels=labels, progress=False, workers=1)
    with pytest.raises(NeighbourhoodsError, match="run `neighbourhoods cluster` again"):
        select(ws, auto="exteriors")


def test_training_data_refuses_photos_ingested_after_select(tmp_path):
    photos, labels, ws = _toy_workspace(tmp_path, per_city=4)
    cluster(ws, ClusterConfig(k=2, res=RES), progress=False)
    select(ws, clusters=[0])
    assert len(load_split(open_workspace(ws), (64, 64), split=None)) > 0
    Image.new("RGB", (128, 96), (10, 200, 30)).save(photos / "new.jpg")
    ingest(photos, ws, labels=labels, progress=False, workers=1)
    with pytest.raises(NeighbourhoodsError, match="ingested after the last `select`"):
        load_split(open_workspace(ws), (64, 64), split=None)


def test_select_before_cluster_says_what_to_run(tmp_path):
    _, _, ws = _toy_workspace(tmp_path, per_city=4)
    with pytest.raises(NeighbourhoodsError, match="neighbourhoods cluster"):
        select(ws, clusters=[0])


def test_stored_pooled_features_give_the_networks_own_class_probabilities():
    model = load_efficientnet_lite0()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        pooled, probs = efficientnet_features(model, images)
        direct = torch.softmax(model(efficientnet_input(images)), dim=1)
        from_half = imagenet_probs_from_pooled(model, pooled.half())  # as stored on disk
    assert pooled.shape == (2, 1280) and probs.shape == (2, 1000)
    torch.testing.assert_close(probs, direct, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(from_half, direct, atol=2e-3, rtol=0)


def test_resolution_must_be_a_multiple_of_32(clustered):
    ws, _, _ = clustered
    with pytest.raises(NeighbourhoodsError, match="multiple of 32"):
        cluster(ws, ClusterConfig(res=100), progress=False)


# --- real photos ----------------------------------------------------------------------------
HOUSES_SUBSET = 100  # houses (x 4 photos) in the end-to-end test: 30-60 s on 2 shared cores


@pytest.mark.slow
def test_houses_get_exactly_one_selected_photo_each(shared_data, tmp_path):
    """Each house in ../shared/data/houses has exactly one exterior among its 4 photos.

    A subset of houses (symlinked, not copied) at 128 px keeps the test short; bench/embed.py
    runs all 535 houses at every resolution.
    """
    subset = tmp_path / "photos"
    subset.mkdir()
    for house in range(1, HOUSES_SUBSET + 1):
        for n in range(1, 5):
            src = shared_data / "houses" / "images" / f"{house}_{n}.jpg"
            (subset / src.name).symlink_to(src)
    ws = tmp_path / "ws"
    ingest(subset, ws, progress=False)
    cluster(ws, ClusterConfig(k=4, res=128), progress=False)
    select(ws, auto="exteriors")
    rows = catalog.connect(ws / "catalog.sqlite").execute(
        "SELECT p.path, p.status, COALESCE(k.selected, p.selected) AS selected FROM photos p "
        "LEFT JOIN photos k ON k.id = p.duplicate_of").fetchall()
    per_house = collections.Counter()
    for path, status, chosen in rows:
        per_house[Path(path).stem.split("_")[0]] += int(chosen) if status in ("kept", "duplicate") else 0
    exactly_one = sum(1 for n in per_house.values() if n == 1)
    assert len(per_house) == HOUSES_SUBSET
    assert exactly_one >= 0.97 * HOUSES_SUBSET, collections.Counter(per_house.values())


# --- several processes (torchrun) ------------------------------------------------------------
def _shard_worker(rank: int, ws: str, port: int, out: str) -> None:
    import os

    # what torchrun sets for each process
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    summary = cluster(ws, ClusterConfig(k=4, res=RES, batch_size=4), progress=False)
    Path(out, f"rank{rank}.txt").write_text("none" if summary is None else str(summary.embed.embedded))


def test_two_processes_embed_disjoint_shares_and_give_the_single_process_result(tmp_path):
    import socket

    import torch.multiprocessing as mp

    _, _, ws = _toy_workspace(tmp_path)
    alone = tmp_path / "alone"
    shutil.copytree(ws, alone)
    single = cluster(alone, ClusterConfig(k=4, res=RES, batch_size=4), progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shard_worker, args=(str(ws), port, str(tmp_path)), nprocs=2, join=True)

    assert (tmp_path / "rank1.txt").read_text() == "none"            # rank 0 alone clusters and reports
    shares = {}                                                       # chunk -> the photo ids in it
    for path in sorted(embeddings_dir(open_workspace(ws), "efficientnet_lite0", RES).glob("chunk-*.npz")):
        with np.load(path) as z:
            shares[path.name] = set(z["ids"].tolist())
    assert len(shares) >= 2 and not set.intersection(*shares.values())   # disjoint: nothing embedded twice
    ids, sharded = load_embeddings(open_workspace(ws), "efficientnet_lite0", RES)
    ids1, one = load_embeddings(open_workspace(alone), "efficientnet_lite0", RES)
    assert np.array_equal(ids, ids1) and len(ids) == single.photos == 30
    cos = (sharded.astype(np.float32) * one.astype(np.float32)).sum(1) / (
        np.linalg.norm(sharded.astype(np.float32), axis=1) * np.linalg.norm(one.astype(np.float32), axis=1))
    assert cos.min() > 0.995                                          # batch makeup moves bf16 rounding only
    assert [tuple(r) for r in _catalog(ws, "id, cluster")] == [tuple(r) for r in _catalog(alone, "id, cluster")]
    assert (tmp_path / "rank0.txt").read_text() == "15"               # rank 0 embedded its half


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no GPU")
def test_cluster_on_a_missing_gpu_is_one_line(clustered, capsys):
    ws, _, _ = clustered
    assert main(["cluster", "-w", str(ws), "--res", str(RES), "--device", "cuda"]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err
