"""The SQLite catalog: one row per input file, so every photo is accounted for.

Other stages read it through the helpers here; ingest owns writing the per-file columns,
cluster/select own `cluster` and `selected`.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from neighbourhoods.core.errors import NeighbourhoodsError

SCHEMA = """
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY,          -- stable: assigned in sorted-path order when first seen
    path TEXT NOT NULL UNIQUE,       -- absolute path of the input file
    bytes INTEGER,                   -- file size
    mtime_ns INTEGER,                -- with bytes: detects changed files on re-ingest
    sha256 TEXT,                     -- of the file's bytes
    phash TEXT,                      -- perceptual hash (hex), for near-duplicates
    width INTEGER,                   -- of the decoded image, after EXIF orientation
    height INTEGER,
    format TEXT,                     -- PIL format name (JPEG, PNG, ...)
    label TEXT,                      -- city (or other class); NULL when the labels name none
    status TEXT NOT NULL DEFAULT 'pending',  -- pending / kept / rejected / duplicate
    reason TEXT,                     -- why rejected, or which photo it duplicates
    duplicate_of INTEGER,            -- id of the byte-identical photo that is kept
    near_duplicate_of INTEGER,       -- id of a perceptually near-identical kept photo (flag only)
    split TEXT,                      -- train / holdout (kept photos only)
    selected INTEGER NOT NULL DEFAULT 1,  -- 1 = used for training (set by `select`)
    cluster INTEGER                  -- set by `cluster`
);
CREATE INDEX IF NOT EXISTS photos_sha256 ON photos(sha256);
CREATE INDEX IF NOT EXISTS photos_status ON photos(status);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating if needed) a catalog. WAL + synchronous=FULL: commits survive kill -9."""
    con = sqlite3.connect(str(path), timeout=60)
    con.row_factory = sqlite3.Row
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.executescript(SCHEMA)
    except sqlite3.DatabaseError as e:
        con.close()
        if is_damaged(e):
            raise damaged_error(path, e) from None
        raise
    return con


def db_path(path: str) -> str | bytes:
    """A file path as the catalog stores it. A name that is not valid UTF-8 (zip and Windows
    dumps) arrives from the OS with surrogate escapes, which SQLite text cannot hold: it is kept
    as the exact bytes on disk instead (a BLOB in the same column, still unique)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def fs_path(value: str | bytes) -> str:
    """A catalog path back as the OS path to open (the inverse of db_path)."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def shown(text: str | bytes) -> str:
    """A path fit to print: undecodable bytes as \\xNN escapes."""
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def connect_readonly(path: str | Path) -> sqlite3.Connection:
    """Open a catalog only to read it: what generate, serve, evaluate and report need, so they run
    from a workspace on a read-only file system (the normal way to deploy a finished model).

    SQLite opens a WAL database read-only only where it can create the -shm file beside it; on
    read-only media it is opened as immutable (nothing else may write it then, and nothing can).
    """
    path = Path(path)
    if not path.is_file():
        raise NeighbourhoodsError(f"no catalog at {path}: run `neighbourhoods ingest` first")
    for mode in ("mode=ro", "immutable=1"):
        con = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, timeout=60)
        con.row_factory = sqlite3.Row
        try:
            con.execute("SELECT COUNT(*) FROM photos WHERE id = 0").fetchone()
            return con
        except sqlite3.OperationalError:
            con.close()
            if mode == "immutable=1":
                raise
        except sqlite3.DatabaseError as e:
            con.close()
            if is_damaged(e):
                raise damaged_error(path, e) from None
            raise
    raise AssertionError("unreachable")


def is_damaged(e: BaseException) -> bool:
    """SQLite's words for a file that is not (or no longer) a whole database."""
    text = str(e).lower()
    return isinstance(e, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text
                                                     or "file is encrypted" in text)


def damaged_error(path, e: BaseException) -> NeighbourhoodsError:
    return NeighbourhoodsError(
        f"the catalog {path} is damaged ({e}): restore it from a backup, or move it aside and run "
        "the same `neighbourhoods ingest` again (then cluster and select)")


def read_meta(path: str | Path, key: str) -> str | None:
    """One value of a catalog's meta table, read-only; None where the catalog or key is missing."""
    try:
        con = connect_readonly(path)   # also on a read-only file system
        try:
            row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        finally:
            con.close()
    except (sqlite3.Error, NeighbourhoodsError):
        return None
    return row[0] if row else None


# What `cluster` suggests a cluster is, and so what `select --auto` takes.
SUGGESTIONS = ("exteriors", "interiors", "documents", "other")
