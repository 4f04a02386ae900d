"""Ingest's decode shared by several processes: torchrun, one per machine, on shared storage.

Decoding (read, hash, check, resize) is ingest's heavy part and needs no catalog; the catalog is
one SQLite file, which must have one writer (SQLite's locks do not hold on network storage).
So under torchrun (WORLD_SIZE > 1) rank 0 alone takes the workspace lock, discovers the files
and sends every process the same list of pending photos; each decodes every world-th one. Rank
0 stores its results in the catalog as a single process does; rank r > 0 commits its results to
its own file

    WS/shards/decode-<r>.sqlite     results (one row per photo, the catalog's columns) + pixels

in small transactions, as the catalog is written. After the barrier rank 0 merges the shard
files into the catalog and deletes them; a run killed before that leaves them, and the next run
merges them first (finished work is kept), before discovery resets any photo changed since.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

RESULT_COLUMNS = ("bytes", "sha256", "phash", "width", "height", "format", "status", "reason")

SHARD_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY, bytes INTEGER, sha256 TEXT, phash TEXT, width INTEGER, height INTEGER,
    format TEXT, status TEXT NOT NULL, reason TEXT
);
CREATE TABLE IF NOT EXISTS pixels (
    photo_id INTEGER NOT NULL, res TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (photo_id, res)
);
"""


def shard_path(root: Path, rank: int) -> Path:
    return Path(root) / "shards" / f"decode-{rank}.sqlite"


def open_shard(root: Path, rank: int) -> sqlite3.Connection:
    path = shard_path(root, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=60)
    con.execute("PRAGMA synchronous=FULL")   # rollback journal, not WAL: WAL needs shared memory, one host
    con.executescript(SHARD_SCHEMA)
    return con


def store_shard(con: sqlite3.Connection, results: list[dict]) -> None:
    with con:
        con.executemany(f"INSERT OR REPLACE INTO results(id, {', '.join(RESULT_COLUMNS)}) "
                        f"VALUES (?, {', '.join('?' for _ in RESULT_COLUMNS)})",
                        [(r["id"], *(r[c] for c in RESULT_COLUMNS)) for r in results])
        con.executemany("INSERT OR REPLACE INTO pixels(photo_id, res, data) VALUES (?, ?, ?)",
                        [(r["id"], res, blob) for r in results for res, blob in r["pixels"].items()])


def merge_shards(con: sqlite3.Connection, root: Path) -> int:
    """Fold every shard file into the catalog `con` (photos still pending only) and delete it.

    Returns the photos merged. One transaction per shard: a kill mid-merge leaves the shard
    file, merged again next time (idempotent: the same rows, INSERT OR REPLACE).
    """
    folder = Path(root) / "shards"
    merged = 0
    for path in sorted(folder.glob("decode-*.sqlite")) if folder.is_dir() else []:
        con.execute("ATTACH DATABASE ? AS shard", (str(path),))
        try:
            with con:
                pending = "SELECT r.id FROM shard.results r JOIN photos p ON p.id = r.id WHERE p.status = 'pending'"
                con.execute(f"INSERT OR REPLACE INTO pixels(photo_id, res, data) "
                            f"SELECT photo_id, res, data FROM shard.pixels WHERE photo_id IN ({pending})")
                sets = ", ".join(f"{c} = COALESCE(r.{c}, photos.{c})" if c == "bytes" else f"{c} = r.{c}"
                                 for c in RESULT_COLUMNS)
                merged += con.execute(f"UPDATE photos SET {sets} FROM shard.results r "
                                      "WHERE photos.id = r.id AND photos.status = 'pending'").rowcount
        finally:
            con.execute("DETACH DATABASE shard")
        for leftover in (path, path.with_name(path.name + "-journal")):
            leftover.unlink(missing_ok=True)
    return merged
