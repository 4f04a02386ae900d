"""Ingest shared by several processes (torchrun on machines sharing one collection): the same
catalog and arrays as one process, and a killed run's shard files are finished work."""

from __future__ import annotations

import os
import socket
import sqlite3
from pathlib import Path

import numpy as np
import torch.multiprocessing as mp

from neighbourhoods.core import catalog
from neighbourhoods.demo.toytown import draw_toytown
from neighbourhoods.ingest import ingest
from neighbourhoods.ingest.decode import DecodeSettings, decode_one
from neighbourhoods.ingest.shards import merge_shards, open_shard, shard_path, store_shard

COLUMNS = "id, path, bytes, sha256, phash, width, height, format, status, reason, label, duplicate_of, split"


def _rows(ws: Path) -> list[tuple]:
    con = sqlite3.connect(ws / "catalog.sqlite")
    try:
        return con.execute(f"SELECT {COLUMNS} FROM photos ORDER BY id").fetchall()
    finally:
        con.close()


def _worker(rank: int, photos: str, labels: str, ws: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    summary = ingest(photos, ws, labels=labels, res=[(32, 32), (48, 64)], workers=1, progress=False)
    assert (summary is None) == (rank == 1)            # rank 0 reports, the others return None
    if rank == 0:
        assert summary.decoded == summary.files


def test_two_processes_give_the_single_process_catalog_and_arrays(tmp_path):
    photos, labels = draw_toytown(tmp_path / "toy", per_city=8)
    ingest(photos, tmp_path / "alone", labels=labels, res=[(32, 32), (48, 64)], workers=1, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(str(photos), str(labels), str(tmp_path / "shared"), port), nprocs=2, join=True)

    assert _rows(tmp_path / "shared") == _rows(tmp_path / "alone")
    for res in ("32x32", "48x64"):
        for name in ("images.npy", "photo_ids.npy"):
            a = np.load(tmp_path / "alone" / "prepared" / res / name)
            b = np.load(tmp_path / "shared" / "prepared" / res / name)
            assert np.array_equal(a, b), (res, name)
    assert not list((tmp_path / "shared" / "shards").glob("*")), "merged shard files are removed"


def test_a_killed_runs_shard_is_merged_by_the_next_run(tmp_path):
    """A shard file left by a run killed before rank 0 merged it: the next ingest keeps that work."""
    photos, labels = draw_toytown(tmp_path / "toy", per_city=4)
    ws = tmp_path / "ws"
    ingest(photos, ws, labels=labels, res=[(32, 32)], workers=1, progress=False)
    expected = _rows(ws)
    settings = DecodeSettings(res=((32, 32),))
    con = catalog.connect(ws / "catalog.sqlite")
    with con:   # as if these two photos had not been decoded yet, and a rank-1 shard held them
        con.execute("UPDATE photos SET status = 'pending', sha256 = NULL WHERE id IN (2, 5)")
        con.execute("DELETE FROM pixels WHERE photo_id IN (2, 5)")
    paths = dict(con.execute("SELECT id, path FROM photos WHERE id IN (2, 5)").fetchall())
    shard = open_shard(ws, 1)
    store_shard(shard, [decode_one((pid, path, settings)) for pid, path in paths.items()])
    shard.close()
    con.close()
    summary = ingest(photos, ws, labels=labels, res=[(32, 32)], workers=1, progress=False)
    assert summary.decoded == 0, "the shard's photos were merged, not decoded again"
    assert _rows(ws) == expected and not shard_path(ws, 1).exists()


def test_merging_is_idempotent_and_skips_photos_no_longer_pending(tmp_path):
    photos, labels = draw_toytown(tmp_path / "toy", per_city=4)
    ws = tmp_path / "ws"
    ingest(photos, ws, labels=labels, res=[(32, 32)], workers=1, progress=False)
    con = catalog.connect(ws / "catalog.sqlite")
    path = con.execute("SELECT path FROM photos WHERE id = 3").fetchone()[0]
    shard = open_shard(ws, 2)
    store_shard(shard, [dict(decode_one((3, path, DecodeSettings(res=((32, 32),)))), status="rejected")])
    shard.close()
    assert merge_shards(con, ws) == 0                 # photo 3 is decided already: the stale shard row is ignored
    assert con.execute("SELECT status FROM photos WHERE id = 3").fetchone()[0] == "kept"
    assert merge_shards(con, ws) == 0 and not shard_path(ws, 2).exists()
    con.close()


def _failing_worker(rank: int, photos: str, ws: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    from neighbourhoods.core.errors import NeighbourhoodsError
    try:
        ingest(photos, ws, res=[(32, 32)], workers=1, progress=False)
    except NeighbourhoodsError as e:
        Path(ws + f".rank{rank}").write_text(str(e))


def test_an_error_on_rank_0_reaches_every_process_instead_of_a_hang(tmp_path):
    """Rank 0 finds no photos: the other process gets the same one-line error, not a barrier wait."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              "import torch.multiprocessing as mp; from test_ingest_shards import _failing_worker; "
              f"mp.spawn(_failing_worker, args=({str(empty)!r}, {str(tmp_path / 'ws')!r}, {port}), nprocs=2)")
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in (0, 1):
        assert "no files found" in (tmp_path / f"ws.rank{rank}").read_text()
