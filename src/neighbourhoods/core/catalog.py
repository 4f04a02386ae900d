"""The SQLite catalog: one row per input file, so every photo is accounted for.

Other stages read it through the helpers here; ingest owns writing the per-file columns,
cluster/select own `cluster` and `selected`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

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
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.executescript(SCHEMA)
    return con


def read_meta(path: str | Path, key: str) -> str | None:
    """One value of a catalog's meta table, read-only; None where the catalog or key is missing."""
    try:
        con = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=60)
        try:
            row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return row[0] if row else None


# What `cluster` suggests a cluster is, and so what `select --auto` takes.
SUGGESTIONS = ("exteriors", "interiors", "documents", "other")
