"""`neighbourhoods ingest`: catalog a folder of listing photos and prepare training arrays.

Every input file gets one catalog row and ends kept, rejected (with a short, stable reason) or
duplicate; kept photos are resized into WS/prepared/<H>x<W>/images.npy. The run is built to be
killed at any moment and re-run:

1. discover (here): every file under PHOTOS is inserted as a 'pending' row in sorted-path order
   (so ids do not depend on timing); changed files go back to pending, vanished ones are removed;
2. decode: pending files are read, hashed, checked and resized in worker processes (pool.py,
   decode.py); results are committed in small transactions together with their pixels (table
   `pixels`), so a kill loses at most the last second of work;
3. decide (decide.py): duplicates, near-duplicates and the train/holdout split are set in one
   final, deterministic pass over the catalog, so the order workers finished in never matters;
4. write (core/prepared.py, beside the readers): labels.json and the prepared arrays, streamed
   in ascending id order, atomically.

Same inputs, same settings: byte-identical catalog and arrays, interrupted or not.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter
from pathlib import Path

import numpy as np

from neighbourhoods import models
from neighbourhoods.core import catalog
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.locks import writing_workspace
from neighbourhoods.core.prepared import PIXELS_SCHEMA, write_label_names, write_prepared
from neighbourhoods.core.resolution import supported_resolution
from neighbourhoods.core.workspace import open_workspace
from neighbourhoods.ingest.decide import decide
from neighbourhoods.ingest.decode import DecodeSettings
from neighbourhoods.ingest.labels import match_labels, read_labels
from neighbourhoods.ingest.pool import decode_pending
from neighbourhoods.ingest.shards import merge_shards, open_shard, store_shard
from neighbourhoods.ingest.summary import IngestSummary
from neighbourhoods.nets.devices import Dist, init_distributed


# --- the catalog side (main process) ----------------------------------------------------------
def _scan(root: Path, skip: set[Path], unreadable: list[str]) -> list[tuple[str, int, int]]:
    """Every regular file under root: (absolute path, bytes, mtime_ns), sorted by path.

    Symlinks are followed, each folder once (a link to a parent would loop forever); folders
    that cannot be listed are appended to `unreadable` for the summary.
    """
    found = []
    stack = [root]
    visited: set[tuple[int, int]] = set()
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in visited:
                continue
            visited.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(folder))
        except OSError:
            unreadable.append(str(folder))
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=True):
                    p = Path(entry.path)
                    if p not in skip:
                        st = entry.stat(follow_symlinks=True)
                        found.append((str(p), st.st_size, st.st_mtime_ns))
                elif entry.is_symlink():
                    unreadable.append(entry.path)   # dangling
            except OSError:
                unreadable.append(entry.path)   # a dangling link or a file we may not stat
    found.sort()
    return found


def _meta_get(con: sqlite3.Connection, key: str) -> str | None:
    row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def _meta_set(con: sqlite3.Connection, key: str, value: str) -> None:
    con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))


RESET_COLUMNS = ("status = 'pending', sha256 = NULL, phash = NULL, width = NULL, height = NULL, format = NULL, "
                 "reason = NULL, duplicate_of = NULL, near_duplicate_of = NULL, split = NULL")


def _discover(con: sqlite3.Connection, root: Path, files: list[tuple[str, int, int]],
              labels: dict[str, str | None], settings: DecodeSettings, summary: IngestSummary) -> None:
    """One transaction: new files become pending rows (ids in sorted-path order), changed files
    go back to pending, vanished files leave, labels are (re)applied."""
    with con:
        existing = {catalog.fs_path(row[0]): (row[1], row[2], row[3])
                    for row in con.execute("SELECT path, id, bytes, mtime_ns FROM photos")}
        if _meta_get(con, "decode_settings") != settings.key():
            # resolutions, fit or limits changed: every file must be decoded again
            con.execute(f"UPDATE photos SET {RESET_COLUMNS}")
            con.execute("DELETE FROM pixels")
            _meta_set(con, "decode_settings", settings.key())
        seen = set()
        next_id = max(int(_meta_get(con, "next_id") or 1),
                      (con.execute("SELECT MAX(id) FROM photos").fetchone()[0] or 0) + 1)
        for path, size, mtime_ns in files:
            seen.add(path)
            old = existing.get(path)
            if old is None:
                con.execute("INSERT INTO photos(id, path, bytes, mtime_ns) VALUES (?, ?, ?, ?)",
                            (next_id, catalog.db_path(path), size, mtime_ns))
                next_id += 1
                summary.new += 1
            elif (old[1], old[2]) != (size, mtime_ns):
                con.execute(f"UPDATE photos SET {RESET_COLUMNS}, cluster = NULL, bytes = ?, mtime_ns = ? WHERE id = ?",
                            (size, mtime_ns, old[0]))
                con.execute("DELETE FROM pixels WHERE photo_id = ?", (old[0],))
                summary.changed += 1
        gone = [existing[p][0] for p in existing if p not in seen]
        for photo_id in gone:
            con.execute("DELETE FROM photos WHERE id = ?", (photo_id,))
            con.execute("DELETE FROM pixels WHERE photo_id = ?", (photo_id,))
        summary.removed = len(gone)
        _meta_set(con, "next_id", str(next_id))
        root_prefix = str(root) + os.sep
        current = {row[0]: row[1] for row in con.execute("SELECT path, label FROM photos")}
        updates = []
        for stored, old_label in current.items():
            path = catalog.fs_path(stored)
            rel = Path(path[len(root_prefix):]).as_posix() if path.startswith(root_prefix) else path
            label = labels.get(rel)
            if label != old_label:
                updates.append((label, stored))
        con.executemany("UPDATE photos SET label = ? WHERE path = ?", updates)


def _store(con: sqlite3.Connection, results: list[dict]) -> None:
    with con:
        for r in results:
            con.execute("UPDATE photos SET bytes = COALESCE(?, bytes), sha256 = ?, phash = ?, width = ?, height = ?, "
                        "format = ?, status = ?, reason = ? WHERE id = ?",
                        (r["bytes"], r["sha256"], r["phash"], r["width"], r["height"], r["format"],
                         r["status"], r["reason"], r["id"]))
            con.executemany("INSERT OR REPLACE INTO pixels(photo_id, res, data) VALUES (?, ?, ?)",
                            [(r["id"], res, blob) for res, blob in r["pixels"].items()])


def _pending(con: sqlite3.Connection) -> list[tuple[int, str]]:
    return [(row[0], catalog.fs_path(row[1]))
            for row in con.execute("SELECT id, path FROM photos WHERE status = 'pending' ORDER BY id")]


def _decode_share(workspace, settings: DecodeSettings, workers: int, dd: Dist) -> None:
    """A torchrun process other than rank 0: decode every world-th pending photo into its shard file."""
    kind, pending = dd.send(None)
    if kind == "error":
        raise NeighbourhoodsError(pending)
    root = open_workspace(workspace).root
    con = open_shard(root, dd.rank)
    try:
        decode_pending(pending[dd.rank::dd.world], lambda batch: store_shard(con, batch), settings, workers,
                        progress=False)
    finally:
        con.close()
    dd.barrier()
    return None


def ingest(photos, workspace, labels=None, file_column: str = "file", label_column: str | list[str] = "city",
           key_column: str | None = None, key_pattern: str | None = None,
           res=((64, 64),), fit: str = "crop", min_side: int = 32, max_pixels: int = 100_000_000,
           holdout: float = 0.10, holdout_min: int = 20, near_duplicate_distance: int = 4,
           workers: int | None = None, progress: bool = True) -> IngestSummary:
    """Catalog every file under `photos` into `workspace` and prepare arrays at each of `res`.

    Safe to re-run and to kill: only new or changed files are decoded again, and the result is
    the same as one uninterrupted run. Holds the workspace lock (core/locks.py): a second
    ingest, or one while a run trains, is refused. Returns the summary (`.to_json()`, `.describe()`).

    Labels (labels.py): `labels` a CSV with `file_column` and `label_column` (several columns are
    joined: ["city", "state"] -> "Scottsdale, AZ"), or a listings table with `key_column` and
    photos named by that key (`key_pattern`, default '{key}_*'), or a dataset.json; None: folders.

    Under torchrun (WORLD_SIZE > 1: machines sharing one collection on shared storage) every
    process decodes a share of the photos and rank 0 writes the catalog (shards.py); rank 0
    returns the summary, the others None.
    """
    if not Path(photos).expanduser().is_dir():
        raise NeighbourhoodsError(f"photos folder {Path(photos).expanduser().resolve()} not found")
    if Path(workspace).expanduser().resolve() == Path(photos).expanduser().resolve():
        raise NeighbourhoodsError(f"the workspace cannot be the photos folder itself ({Path(photos).expanduser().resolve()}): "
                                  "give -w a folder of its own, e.g. beside it")
    table = read_labels(labels, file_column, label_column, key_column, key_pattern)   # bad labels: before any write
    dd = init_distributed("cpu", timeout_s=7 * 24 * 3600)   # decoding a share may take hours
    try:
        with dd.main_holds(lambda: writing_workspace(open_workspace(workspace, create=True).root, "ingest")):
            return _ingest_locked(photos, workspace, labels, table, res, fit, min_side, max_pixels,
                                  holdout, holdout_min, near_duplicate_distance, workers, progress, dd)
    finally:
        dd.close()


def _ingest_locked(photos, workspace, labels, table, res, fit, min_side, max_pixels,
                   holdout, holdout_min, near_duplicate_distance, workers, progress, dd: Dist) -> IngestSummary | None:
    started = time.monotonic()
    root = Path(photos).expanduser().resolve()   # a folder: ingest() checked before taking the lock
    if fit not in ("crop", "pad"):
        raise NeighbourhoodsError(f"fit must be 'crop' or 'pad', not {fit!r}")
    if not 0.0 <= holdout < 1.0:
        raise NeighbourhoodsError(f"holdout must be a fraction in [0, 1), not {holdout}")
    if min_side < 1 or max_pixels < 1:
        raise NeighbourhoodsError("min_side and max_pixels must be positive")
    res_list = tuple(dict.fromkeys(models.check_res(r) for r in res))   # before any file is touched
    if not res_list:
        raise NeighbourhoodsError("give at least one resolution (--res HxW)")
    settings = DecodeSettings(res=res_list, fit=fit, min_side=min_side, max_pixels=max_pixels)
    workers = workers or os.cpu_count() or 1
    if not dd.main:
        return _decode_share(workspace, settings, workers, dd)
    sent = []

    def send(pending: list[tuple[int, str]]) -> None:
        if dd.world > 1:
            dd.send(("ok", pending))
        sent.append(True)

    try:
        return _catalog_side(root, workspace, labels, table, settings, holdout, holdout_min, near_duplicate_distance,
                             workers, progress, dd, send, started)
    except NeighbourhoodsError as e:
        if dd.world > 1 and not sent:   # the other processes wait for the photo list: give them the error
            dd.send(("error", str(e)))
        raise


def _catalog_side(root: Path, workspace, labels, table, settings: DecodeSettings, holdout, holdout_min,
                  near_duplicate_distance, workers, progress, dd: Dist, send, started: float) -> IngestSummary:
    """Rank 0 (or the only process): discover, decode its share, merge the others', decide, write."""
    ws = open_workspace(workspace, create=True)
    skip = {Path(labels).expanduser().resolve()} if labels else set()
    skip |= {ws.catalog_path, Path(str(ws.catalog_path) + "-wal"), Path(str(ws.catalog_path) + "-shm")}
    unreadable: list[str] = []
    files = _scan(root, skip, unreadable)
    if ws.root == root or root in ws.root.parents:
        files = [f for f in files if not Path(f[0]).is_relative_to(ws.root)]   # never ingest our own output
    if not files:
        raise NeighbourhoodsError(f"no files found under {root}")
    rel_paths = [Path(f[0]).relative_to(root).as_posix() for f in files]
    match = match_labels(table, rel_paths, root)

    summary = IngestSummary(workspace=str(ws.root), label_source=table.source if table else "folders")
    con = catalog.connect(ws.catalog_path)
    try:
        con.executescript(PIXELS_SCHEMA)
        merge_shards(con, ws.root)   # a killed sharded run's finished work, before discovery checks the files
        previous_root = _meta_get(con, "photos_root")
        if previous_root is not None and previous_root != str(root):
            # a workspace mirrors one folder: ingesting another would remove every photo of the first
            raise NeighbourhoodsError(f"workspace {ws.root} catalogs {previous_root}, not {root}; "
                                      "use another --workspace (or put both folders under one)")
        with con:
            _meta_set(con, "photos_root", str(root))
        _discover(con, root, files, match.labels, settings, summary)
        pending = _pending(con)
        send(pending)
        share = f" (share 1 of {dd.world})" if dd.world > 1 else ""
        summary.decoded = decode_pending(pending[::dd.world], lambda batch: _store(con, batch), settings, workers,
                                          progress, desc="decoding" + share)
        if dd.world > 1:
            dd.barrier()   # every share is in its shard file
            summary.decoded += merge_shards(con, ws.root)
        decide(con, holdout, holdout_min, near_duplicate_distance)
        label_counts = Counter(r[0] for r in con.execute("SELECT label FROM photos WHERE status = 'kept'"))
        names = sorted(k for k in label_counts if k is not None)
        write_label_names(ws, {k: label_counts[k] for k in names})
        summary.prepared = write_prepared(con, ws, settings.res, settings.fit, progress)

        counts = Counter(r[0] for r in con.execute("SELECT status FROM photos"))
        summary.files = sum(counts.values())
        summary.kept, summary.duplicates = counts["kept"], counts["duplicate"]
        summary.rejected = dict(con.execute("SELECT reason, COUNT(*) FROM photos WHERE status = 'rejected' "
                                            "GROUP BY reason ORDER BY reason").fetchall())
        summary.near_duplicates = con.execute("SELECT COUNT(*) FROM photos WHERE status = 'kept' AND "
                                              "near_duplicate_of IS NOT NULL").fetchone()[0]
        summary.holdout = con.execute("SELECT COUNT(*) FROM photos WHERE split = 'holdout'").fetchone()[0]
        summary.labels = {k: label_counts[k] for k in names}
        summary.unlabelled = label_counts.get(None, 0)
        sizes = con.execute("SELECT width, height FROM photos WHERE status = 'kept' AND width > 0 AND height > 0").fetchall()
        if sizes:
            w, h = (int(np.median([r[i] for r in sizes])) for i in (0, 1))
            supported = supported_resolution(w, h)
            summary.photo_size, summary.supported_res = f"{w}x{h}", supported.name if supported else None
            with con:
                _meta_set(con, "supported_res", summary.supported_res or "")
    finally:
        con.close()
    summary.unmatched_labels, summary.unlabelled_files = match.unmatched, match.unlabelled
    summary.ambiguous_labels, summary.malformed_label_rows = match.ambiguous, match.malformed
    summary.no_key_files = match.no_key
    if table is not None:
        summary.label_key, summary.key_pattern = table.key_column, table.key_pattern
    summary.unreadable_paths = sorted(unreadable)
    summary.seconds = time.monotonic() - started
    return summary
