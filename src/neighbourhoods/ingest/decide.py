"""Ingest's last pass over the catalog: duplicates, near-duplicates and the train/holdout split.

It reads only the catalog (hashes, labels, ids), in id order, so the result never depends on
the order in which workers finished, or on how many runs a kill split the ingest into.
"""

from __future__ import annotations

import sqlite3
from collections import Counter


def near_duplicates(ids: list[int], phashes: list[str], distance: int) -> dict[int, int]:
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


def decide(con: sqlite3.Connection, holdout: float, holdout_min: int, near_distance: int) -> None:
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
    near = near_duplicates([r["id"] for r in kept], [r["phash"] for r in kept], near_distance)
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
