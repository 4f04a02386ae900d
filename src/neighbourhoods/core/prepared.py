"""Prepared training data: the uint8 arrays ingest writes and training reads, writer and readers.

    WS/prepared/<H>x<W>/images.npy     uint8 N x H x W x 3 (RGB), np.load(mmap_mode="r")
    WS/prepared/<H>x<W>/photo_ids.npy  int64 N, catalog id of each row, ascending
    WS/labels.json                     {"names": [label, ...], "counts": {label: n}}

Rows cover every kept photo (status 'kept'); which rows train is decided later, from the
catalog's split and selected columns, so `select` never has to rewrite the arrays. Ingest
decodes each photo once into the catalog's `pixels` table (PIXELS_SCHEMA); write_prepared
streams the arrays from it.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from neighbourhoods.core import catalog
from neighbourhoods.core.errors import NeighbourhoodsError, check_free_space
from neighbourhoods.core.resolution import res_name
from neighbourhoods.core.workspace import Workspace, atomic_path, atomic_write_json

PIXELS_SCHEMA = """
CREATE TABLE IF NOT EXISTS pixels (
    photo_id INTEGER NOT NULL,       -- catalog id
    res TEXT NOT NULL,               -- 'HxW'
    data BLOB NOT NULL,              -- uint8 H x W x 3, row-major RGB
    PRIMARY KEY (photo_id, res)
);
"""


@dataclass
class PreparedSplit:
    images: np.ndarray       # memory-mapped N_all x H x W x 3 uint8: index it with `rows`
    rows: np.ndarray         # int64: rows of `images` in this split
    labels: np.ndarray       # int64 per row: index into label_names, -1 where the photo has no label
    photo_ids: np.ndarray    # int64 per row: catalog id
    label_names: list[str]   # the workspace's label vocabulary (labels.json order)

    def __len__(self) -> int:
        return len(self.rows)


# --- writing (ingest) ------------------------------------------------------------------------
def write_label_names(ws: Workspace, counts: dict[str, int]) -> None:
    """labels.json: the label vocabulary in the order of `counts` (ingest sorts it), kept photos per label."""
    _remove_stale_temporaries(ws.root, ("labels.json",))
    atomic_write_json(ws.labels_path, {"names": list(counts), "counts": counts})


def write_prepared(con: sqlite3.Connection, ws: Workspace, res_list, fit: str, progress: bool) -> list[str]:
    """The arrays at each (H, W) of `res_list` from the pixels of the catalog `con`'s kept photos;
    returns the resolutions written, 'HxW'.

    An array already written from the same photos (same ids, hashes and `fit`) is kept as it is.
    """
    ids_sha = con.execute("SELECT id, sha256 FROM photos WHERE status = 'kept' ORDER BY id").fetchall()
    ids = np.array([r[0] for r in ids_sha], dtype=np.int64)
    written = []
    for res in res_list:
        name = res_name(res)
        folder = ws.prepared_dir(res)
        fingerprint = hashlib.sha256(json.dumps([name, fit, [tuple(r) for r in ids_sha]]).encode()).hexdigest()
        stored = con.execute("SELECT value FROM meta WHERE key = ?", (f"prepared:{name}",)).fetchone()
        if (stored is not None and stored[0] == fingerprint and (folder / "images.npy").is_file()
                and (folder / "photo_ids.npy").is_file()):
            written.append(name)
            continue
        h, w = res
        _remove_stale_temporaries(folder, ("images.npy", "photo_ids.npy"))
        folder.mkdir(parents=True, exist_ok=True)
        check_free_space(folder, len(ids) * (h * w * 3 + 8) + (1 << 20), f"the {name} arrays")
        # Streamed with plain writes, not through a memory map: a mapped write dies by SIGBUS when
        # the disk fills (here it is an ENOSPC, reported), and mapped pages would count in the
        # process's memory, 2.7 GB for 217k photos at 64x64.
        with atomic_path(folder / "images.npy") as tmp, open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (len(ids), h, w, 3)})
            cursor = con.execute("SELECT p.id, x.data FROM photos p LEFT JOIN pixels x ON x.photo_id = p.id AND x.res = ? "
                                 "WHERE p.status = 'kept' ORDER BY p.id", (name,))
            for i, (pid, blob) in enumerate(tqdm(cursor, total=len(ids), unit="photo", desc=f"writing {name}",
                                                 disable=not progress)):
                if blob is None or pid != ids[i] or len(blob) != h * w * 3:
                    raise RuntimeError(f"catalog inconsistent: kept photo {pid} has no pixels at {name}")
                f.write(blob)
        with atomic_path(folder / "photo_ids.npy") as tmp:
            np.save(tmp, ids)
        with con:
            con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (f"prepared:{name}", fingerprint))
        written.append(name)
    return written


def _remove_stale_temporaries(folder: Path, names: tuple[str, ...]) -> None:
    """Temporary files of atomic writes a kill interrupted (atomic_path names them '.NAME.*')."""
    if folder.is_dir():
        for name in names:
            for stale in folder.glob(f".{name}.*"):
                stale.unlink(missing_ok=True)


# --- reading (train, evaluate, metrics) ------------------------------------------------------
def load_label_names(ws: Workspace) -> list[str]:
    if not ws.labels_path.is_file():
        raise NeighbourhoodsError(f"{ws.labels_path} is missing: run `neighbourhoods ingest` first")
    return list(json.loads(ws.labels_path.read_text())["names"])


def load_split(ws: Workspace, res: tuple[int, int], split: str | None = "train",
               selected_only: bool = True) -> PreparedSplit:
    """Rows of the prepared arrays at `res` in `split` ('train', 'holdout', or None for all)."""
    folder = ws.prepared_dir(res)
    if (folder / "images.npy").is_file() != (folder / "photo_ids.npy").is_file():
        # ingest renames the two into place one after the other; a kill in between leaves one
        raise NeighbourhoodsError(f"prepared data in {folder} is incomplete (interrupted ingest?): "
                                  "rerun `neighbourhoods ingest` to finish it")
    if not (folder / "images.npy").is_file():
        have = sorted(p.name for p in (ws.root / "prepared").glob("*x*")) if (ws.root / "prepared").is_dir() else []
        raise NeighbourhoodsError(
            f"no prepared data at {res_name(res)} in {ws.root} (have: {', '.join(have) or 'none'}); "
            f"run `neighbourhoods ingest ... --res {res_name(res)}`")
    images = np.load(folder / "images.npy", mmap_mode="r")
    all_ids = np.load(folder / "photo_ids.npy")
    if len(all_ids) != len(images):
        # ingest writes the two files one after the other; a kill in between leaves them apart
        raise NeighbourhoodsError(f"prepared data in {folder} is incomplete (interrupted ingest?): "
                                  "rerun `neighbourhoods ingest` to finish it")
    names = load_label_names(ws)
    index = {name: i for i, name in enumerate(names)}
    query = "SELECT id, label FROM photos WHERE status = 'kept'"
    args: list = []
    if split is not None:
        query += " AND split = ?"
        args.append(split)
    if selected_only:
        query += " AND selected = 1"
    con = catalog.connect_readonly(ws.catalog_path)
    try:
        if selected_only:
            _refuse_stale_selection(con)
        wanted = {row["id"]: index.get(row["label"], -1) for row in con.execute(query, args)}
    finally:
        con.close()
    rows = np.array([i for i, pid in enumerate(all_ids) if int(pid) in wanted], dtype=np.int64)
    photo_ids = all_ids[rows].astype(np.int64)
    labels = np.array([wanted[int(pid)] for pid in photo_ids], dtype=np.int64)
    return PreparedSplit(images, rows, labels, photo_ids, names)


def _refuse_stale_selection(con) -> None:
    """Photos ingested after `select` default to selected=1: training on them would silently mix
    interiors or floorplans back in, so refuse until cluster/select have seen them."""
    chosen = con.execute("SELECT value FROM meta WHERE key = 'selected_clusters'").fetchone()
    if chosen is None:
        return  # no selection made: every kept photo trains
    unclustered = con.execute(
        "SELECT COUNT(*) FROM photos WHERE status = 'kept' AND cluster IS NULL").fetchone()[0]
    if unclustered:
        raise NeighbourhoodsError(
            f"{unclustered} kept photos were ingested after the last `select`: run `neighbourhoods cluster` "
            f"and `neighbourhoods select` again so they are sorted before training")


def release_pages(images) -> None:
    """Drop the pages of a memory-mapped prepared array that this process has read so far.

    Read pages of a file mapping count in a process's resident memory until the kernel needs
    them: a pass over 217k photos at 64x64 would show 2.7 GB of "RSS" that is only page cache.
    MADV_DONTNEED on a read-only shared mapping drops them from this process (the page cache
    keeps them, a later read faults them back in for free). A no-op for in-memory arrays and
    where madvise is missing.
    """
    mm = getattr(images, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass
