"""Cosine similarity to a set of unit vectors, in memory-bounded blocks: what the novelty guard
and evaluate's nearest-photo search compute, with NumPy only (so an ONNX replica shares it)."""

from __future__ import annotations

import numpy as np

from neighbourhoods.core.errors import NeighbourhoodsError


def normalise(features: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Rows scaled to unit length; in_place reuses a float32 array's memory (217k x 1280 is 1.1 GB)."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    if in_place:
        features /= norms
        return features
    return features / norms


def nearest(train_unit: np.ndarray, query: np.ndarray, batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each query row: (highest cosine similarity to a train row, that train row's index).

    Queries go `batch` at a time; by default as many as keep the similarity block near 64 MB,
    so 217k training photos cost no more memory than 2k (1024 queries would be 0.9 GB there).
    """
    if len(train_unit) == 0:
        raise NeighbourhoodsError("no training photos to compare with")
    batch = batch or max(1, min(1024, (64 << 20) // (4 * len(train_unit))))
    query = normalise(query)
    sims = np.empty(len(query), dtype=np.float32)
    index = np.empty(len(query), dtype=np.int64)
    for start in range(0, len(query), batch):
        s = query[start:start + batch] @ train_unit.T
        index[start:start + batch] = s.argmax(axis=1)
        sims[start:start + batch] = s[np.arange(len(s)), index[start:start + batch]]
    return sims, index
