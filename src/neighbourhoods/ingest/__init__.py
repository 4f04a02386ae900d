"""`neighbourhoods ingest`: catalog a folder of listing photos and prepare training arrays.

Every input file gets one catalog row and ends kept, rejected (with a short, stable reason) or
duplicate; kept photos are resized into WS/prepared/<H>x<W>/images.npy. The run is built to be
killed at any moment and re-run:

1. discover: every file under PHOTOS is inserted as a 'pending' row in sorted-path order (so
   ids do not depend on timing); changed files go back to pending, vanished ones are removed;
2. decode: pending files are read, hashed, checked and resized in worker processes
   (decode.py); results
   are committed in small transactions together with their pixels (table `pixels`), so a
   kill loses at most the last second of work;
3. decide: duplicates, near-duplicates and the train/holdout split are set in one final,
   deterministic pass over the catalog, so the order workers finished in never matters;
4. write: labels.json and the prepared arrays, streamed in ascending id order, atomically.

Same inputs, same settings: byte-identical catalog and arrays, interrupted or not.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from neighbourhoods import models
from neighbourhoods.core import catalog
from neighbourhoods.core.errors import NeighbourhoodsError, check_free_space
from neighbourhoods.core.locks import writing_workspace
from neighbourhoods.core.resolution import res_name, supported_resolution
from neighbourhoods.core.workspace import atomic_path, atomic_write_json, open_workspace
from neighbourhoods.ingest.decode import DecodeSettings, decode_one
from neighbourhoods.ingest.labels import match_labels, read_labels
from neighbourhoods.ingest.shards import merge_shards, open_shard, store_shard
from neighbourhoods.nets.devices import Dist, init_distributed

PIXELS_SCHEMA = """
CREATE TABLE IF NOT EXISTS pixels (
    photo_id INTEGER NOT NULL,       -- catalog id
    res TEXT NOT NULL,               -- 'HxW'
    data BLOB NOT NULL,              -- uint8 H x W x 3, row-major RGB
    PRIMARY KEY (photo_id, res)
);
"""

COMMIT_EVERY_S = 1.0     # a kill loses at most about this much decoding work
COMMIT_EVERY_N = 64
WINDOW_BYTES = 256 << 20  # decoded pixels in flight between workers and the catalog, at most


@dataclass
class IngestSummary:
    workspace: str
    files: int = 0                    # input files, one catalog row each
    kept: int = 0
    duplicates: int = 0               # byte-identical copies of a kept photo
    near_duplicates: int = 0          # kept photos flagged as perceptually near-identical to another
    rejected: dict[str, int] = field(default_factory=dict)   # reason -> count
    labels: dict[str, int] = field(default_factory=dict)     # label -> kept photos
    unlabelled: int = 0               # kept photos with no label
    holdout: int = 0                  # kept photos in the holdout split
    new: int = 0                      # files first seen in this run
    changed: int = 0                  # files whose size or mtime changed since the last run
    removed: int = 0                  # catalog rows whose file is gone
    decoded: int = 0                  # files decoded in this run
    label_source: str = "folders"
    unmatched_labels: list[str] = field(default_factory=list)   # label entries naming no photo
    unlabelled_files: list[str] = field(default_factory=list)   # photos no entry names (all files)
    ambiguous_labels: list[str] = field(default_factory=list)
    malformed_label_rows: list[str] = field(default_factory=list)
    no_key_files: list[str] = field(default_factory=list)       # listings table: photos whose name gives no key
    label_key: str | None = None      # listings table: its key column (entries are listings, not files)
    key_pattern: str | None = None
    unreadable_paths: list[str] = field(default_factory=list)   # folders we may not list, dangling links
    prepared: list[str] = field(default_factory=list)           # resolutions written, 'HxW'
    photo_size: str | None = None     # median kept photo, 'WxH' (as image tools write it)
    supported_res: str | None = None  # the largest training resolution of that aspect it covers, 'HxW'
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"files": self.files, "kept": self.kept, "duplicates": self.duplicates,
                "near_duplicates": self.near_duplicates, "rejected": dict(sorted(self.rejected.items())),
                "labels": dict(sorted(self.labels.items())), "unlabelled": self.unlabelled,
                "holdout": self.holdout, "new": self.new, "changed": self.changed, "removed": self.removed,
                "decoded": self.decoded, "label_source": self.label_source,
                "unmatched_labels": len(self.unmatched_labels), "unlabelled_files": len(self.unlabelled_files),
                "ambiguous_labels": len(self.ambiguous_labels),
                "malformed_label_rows": len(self.malformed_label_rows), "no_key_files": len(self.no_key_files),
                "label_key": self.label_key, "key_pattern": self.key_pattern,
                "unreadable_paths": len(self.unreadable_paths),
                "prepared": self.prepared, "photo_size": self.photo_size, "supported_res": self.supported_res,
                "workspace": self.workspace, "seconds": round(self.seconds, 2)}

    def describe(self) -> str:
        def examples(items: list[str], n: int = 5) -> str:
            more = f", ... ({len(items) - n} more)" if len(items) > n else ""
            return ", ".join(catalog.shown(i) for i in items[:n]) + more   # odd file names print as \xNN

        rejected = sum(self.rejected.values())
        lines = [f"{self.files} files in {self.workspace} ({self.new} new, {self.changed} changed, "
                 f"{self.removed} removed; {self.decoded} decoded in {self.seconds:.1f} s)",
                 f"  kept        {self.kept} ({self.holdout} held out for evaluation, "
                 f"{self.near_duplicates} flagged near-duplicate)",
                 f"  duplicates  {self.duplicates} (byte-identical to a kept photo)",
                 f"  rejected    {rejected}" + (": " + ", ".join(f"{r} {n}" for r, n in sorted(self.rejected.items()))
                                                if rejected else "")]
        top = sorted(self.labels.items(), key=lambda kv: (-kv[1], kv[0]))
        source = self.label_source + (f" keyed by {self.label_key}" if self.label_key else "")
        lines.append(f"  labels      {len(self.labels)} from {source}"
                     + (": " + ", ".join(f"{k} {v}" for k, v in top[:8]) + (", ..." if len(top) > 8 else "") if top else ""))
        if self.unlabelled:
            lines.append(f"  unlabelled  {self.unlabelled} kept photos have no label")
        if self.unlabelled_files and self.label_source != "folders":
            lines.append(f"  no label entry for {len(self.unlabelled_files)} files: {examples(self.unlabelled_files)}")
        if self.no_key_files:
            lines.append(f"  {len(self.no_key_files)} file names give no {self.label_key} by --key-pattern "
                         f"{self.key_pattern!r}: {examples(self.no_key_files)}")
        if self.unmatched_labels and self.label_key:
            lines.append(f"  {len(self.unmatched_labels)} listings have no photo ({self.label_key} "
                         f"{examples(self.unmatched_labels)})")
        elif self.unmatched_labels:
            lines.append(f"  {len(self.unmatched_labels)} label entries name no photo: {examples(self.unmatched_labels)}")
        if self.ambiguous_labels:
            lines.append(f"  {len(self.ambiguous_labels)} photos match several label entries (left unlabelled): "
                         f"{examples(self.ambiguous_labels)}")
        if self.malformed_label_rows:
            lines.append(f"  {len(self.malformed_label_rows)} malformed label rows: {examples(self.malformed_label_rows, 3)}")
        if self.unreadable_paths:
            lines.append(f"  {len(self.unreadable_paths)} paths could not be listed or read (not in the catalog): "
                         f"{examples(self.unreadable_paths, 3)}")
        lines.append(f"  prepared    {', '.join(self.prepared)} (uint8 arrays in prepared/)")
        if self.supported_res:
            lines.append(f"  photo size  {self.photo_size} (median, W x H): train at --res {self.supported_res} for "
                         f"the website (its own aspect, nothing enlarged); 64x64 for quick runs")
        return "\n".join(lines)


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


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the main process, which stops the pool: one message, no tracebacks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_pool(method: str, workers: int):
    """A worker pool whose start a Ctrl-C cannot slip through.

    A SIGINT that lands while the main thread forks is raised inside CPython's at-fork hooks,
    which print it and drop it ("Exception ignored in _releaseLock"): the run went on and exited 0.
    Blocking SIGINT while the workers fork holds it pending; it is delivered on unblocking, so
    the KeyboardInterrupt arrives here, after the pool exists. (Workers inherit the blocked
    mask; they ignore SIGINT anyway.)
    """
    ctx = multiprocessing.get_context(method)
    if not hasattr(signal, "pthread_sigmask"):        # Windows: no fork, no hooks to race
        return ctx.Pool(workers, initializer=_ignore_sigint)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    pool = None
    try:
        pool = ctx.Pool(workers, initializer=_ignore_sigint)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)   # a Ctrl-C held meanwhile is raised here
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if pool is not None:
            pool.terminate()
        raise
    return pool


def _pending(con: sqlite3.Connection) -> list[tuple[int, str]]:
    return [(row[0], catalog.fs_path(row[1]))
            for row in con.execute("SELECT id, path FROM photos WHERE status = 'pending' ORDER BY id")]


def _decode_pending(pending: list[tuple[int, str]], store, settings: DecodeSettings, workers: int, progress: bool,
                    desc: str = "decoding") -> int:
    """Decode `pending` (id, path) photos, handing results to `store` in small batches."""
    tasks = [(pid, path, settings) for pid, path in pending]
    if not tasks:
        return 0
    bar = tqdm(total=len(tasks), unit="photo", desc=desc, disable=not progress, smoothing=0.1)
    batch: list[dict] = []
    last = time.monotonic()

    def consume(results) -> None:
        nonlocal batch, last
        for r in results:
            batch.append(r)
            bar.update(1)
            if len(batch) >= COMMIT_EVERY_N or time.monotonic() - last > COMMIT_EVERY_S:
                store(batch)
                batch, last = [], time.monotonic()
        if batch:
            store(batch)
            batch = []

    try:
        if workers <= 1 or len(tasks) < 8:
            consume(map(decode_one, tasks))
        else:
            # Feed the pool a window at a time: finished pixels wait in memory only until the next
            # commit, however many photos there are and however far the workers run ahead.
            per_photo = sum(h * w * 3 for h, w in settings.res) + 4096
            window = max(workers * 16, min(4096, WINDOW_BYTES // per_photo))
            chunk = max(1, min(16, window // (workers * 8)))
            # fork: workers start in milliseconds with the modules already imported
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with _start_pool(method, workers) as pool:
                for start in range(0, len(tasks), window):
                    consume(pool.imap_unordered(decode_one, tasks[start:start + window], chunksize=chunk))
    finally:
        bar.close()
    return len(tasks)


def _near_duplicates(ids: list[int], phashes: list[str], distance: int) -> dict[int, int]:
    """id -> lowest earlier id whose perceptual hash differs in fewer than `distance` bits.

    Pigeonhole indexing keeps this near-linear at 200k photos: split the 64 bits into `distance`
    bands; two hashes that differ in fewer than `distance` bits agree exactly on some band.
    """
    if distance <= 0 or not ids:
        return {}
    values = [int(h, 16) for h in phashes]
    bands = min(distance, 64)
    edges = [round(i * 64 / bands) for i in range(bands + 1)]
    index: list[dict[int, list[int]]] = [dict() for _ in range(bands)]
    found: dict[int, int] = {}
    for pos, value in enumerate(values):
        best = None
        keys = [(value >> edges[b]) & ((1 << (edges[b + 1] - edges[b])) - 1) for b in range(bands)]
        for b, key in enumerate(keys):
            for other in index[b].get(key, ()):
                if (best is None or other < best) and bin(value ^ values[other]).count("1") < distance:
                    best = other
        if best is not None:
            found[ids[pos]] = ids[best]
        for b, key in enumerate(keys):
            index[b].setdefault(key, []).append(pos)
    return found


def _holdout_value(sha256: str) -> float:
    return int(sha256[:16], 16) / 2.0 ** 64


def _decide(con: sqlite3.Connection, holdout: float, holdout_min: int, near_distance: int) -> None:
    """Duplicates, near-duplicates and splits from the catalog alone, in id order: deterministic."""
    rows = con.execute("SELECT id, sha256, phash, label, status, reason, duplicate_of, near_duplicate_of, split "
                       "FROM photos WHERE status IN ('kept', 'duplicate') ORDER BY id").fetchall()
    first_of: dict[str, int] = {}
    state: dict[int, list] = {}   # id -> [status, duplicate_of, reason, near_duplicate_of, split]
    kept = []
    for r in rows:
        original = first_of.setdefault(r["sha256"], r["id"])
        if original == r["id"]:
            state[r["id"]] = ["kept", None, None, None, None]
            kept.append(r)
        else:
            state[r["id"]] = ["duplicate", original, f"identical to {original}", None, None]
    near = _near_duplicates([r["id"] for r in kept], [r["phash"] for r in kept], near_distance)
    sizes = Counter(r["label"] for r in kept)
    values = {r["id"]: _holdout_value(r["sha256"]) for r in kept}
    lowest: dict[str | None, int] = {}
    for r in kept:
        best = lowest.get(r["label"])
        if best is None or (values[r["id"]], r["id"]) < (values[best], best):
            lowest[r["label"]] = r["id"]
    for r in kept:   # ascending id, so a near-duplicate's original is decided first
        pid = r["id"]
        original = near.get(pid)
        state[pid][3] = original
        if original is not None:
            # a near copy of a training photo in the holdout would flatter every metric
            state[pid][4] = state[original][4]
        else:
            eligible = holdout > 0 and sizes[r["label"]] >= holdout_min
            state[pid][4] = "holdout" if eligible and (values[pid] < holdout or pid == lowest[r["label"]]) else "train"
    with con:
        con.execute("UPDATE photos SET duplicate_of = NULL, near_duplicate_of = NULL, split = NULL "
                    "WHERE status NOT IN ('kept', 'duplicate') AND (duplicate_of IS NOT NULL OR "
                    "near_duplicate_of IS NOT NULL OR split IS NOT NULL)")
        updates = [(s[0], s[1], s[2], s[3], s[4], r["id"]) for r in rows for s in [state[r["id"]]]
                   if (r["status"], r["duplicate_of"], r["reason"], r["near_duplicate_of"], r["split"]) != tuple(s)]
        con.executemany("UPDATE photos SET status = ?, duplicate_of = ?, reason = ?, near_duplicate_of = ?, split = ? "
                        "WHERE id = ?", updates)


def _remove_stale_temporaries(folder: Path, names: tuple[str, ...]) -> None:
    """Temporary files of atomic writes a kill interrupted (atomic_path names them '.NAME.*')."""
    if folder.is_dir():
        for name in names:
            for stale in folder.glob(f".{name}.*"):
                stale.unlink(missing_ok=True)


def _write_prepared(con: sqlite3.Connection, ws, settings: DecodeSettings, progress: bool) -> list[str]:
    ids_sha = con.execute("SELECT id, sha256 FROM photos WHERE status = 'kept' ORDER BY id").fetchall()
    ids = np.array([r[0] for r in ids_sha], dtype=np.int64)
    written = []
    for res in settings.res:
        name = res_name(res)
        folder = ws.prepared_dir(res)
        fingerprint = hashlib.sha256(json.dumps([name, settings.fit, [tuple(r) for r in ids_sha]]).encode()).hexdigest()
        if (_meta_get(con, f"prepared:{name}") == fingerprint and (folder / "images.npy").is_file()
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
            _meta_set(con, f"prepared:{name}", fingerprint)
        written.append(name)
    return written


def _decode_share(workspace, settings: DecodeSettings, workers: int, dd: Dist) -> None:
    """A torchrun process other than rank 0: decode every world-th pending photo into its shard file."""
    kind, pending = dd.send(None)
    if kind == "error":
        raise NeighbourhoodsError(pending)
    root = open_workspace(workspace).root
    con = open_shard(root, dd.rank)
    try:
        _decode_pending(pending[dd.rank::dd.world], lambda batch: store_shard(con, batch), settings, workers,
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
        summary.decoded = _decode_pending(pending[::dd.world], lambda batch: _store(con, batch), settings, workers,
                                          progress, desc="decoding" + share)
        if dd.world > 1:
            dd.barrier()   # every share is in its shard file
            summary.decoded += merge_shards(con, ws.root)
        _decide(con, holdout, holdout_min, near_duplicate_distance)
        label_counts = Counter(r[0] for r in con.execute("SELECT label FROM photos WHERE status = 'kept'"))
        names = sorted(k for k in label_counts if k is not None)
        _remove_stale_temporaries(ws.root, ("labels.json",))
        atomic_write_json(ws.labels_path, {"names": names, "counts": {k: label_counts[k] for k in names}})
        summary.prepared = _write_prepared(con, ws, settings, progress)

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
