"""The novelty guard: a generated sample must never be a near-copy of a training photo.

A sample whose nearest training photo (metrics.novelty) is more similar than the memorisation
threshold is replaced by the sample of the next derived seed, so the replacement is as
deterministic as the original: a request's bytes depend only on (city, seed) and the weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.latents import MAX_SEED  # noqa: F401  (seeds: non-negative 63-bit integers)
from neighbourhoods.core.workspace import open_workspace
from neighbourhoods.thumbnails.source import Source


class NoNovelSample(NeighbourhoodsError):
    """Every derived seed gave a sample too close to a training photo (a memorising generator)."""


def check_seed(seed: int) -> int:
    if not (0 <= int(seed) <= MAX_SEED):
        raise NeighbourhoodsError(f"bad seed {seed}: expected an integer from 0 to {MAX_SEED}")
    return int(seed)


def derived_seed(seed: int, attempt: int) -> int:
    """The seed tried at `attempt` (0: the requested one) when the novelty guard rejects a sample."""
    if attempt == 0:
        return seed
    digest = hashlib.sha256(f"novelty-retry:{seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


@dataclass
class Guard:
    """Drops samples whose nearest training photo is more similar than `threshold`."""
    similarity: Callable[[np.ndarray], np.ndarray]   # N x H x W x 3 uint8 -> N max cosine similarities
    threshold: float                                 # memorisation threshold (similarity above it: a near-copy)
    max_attempts: int = 8                            # derived seeds tried before giving up
    label: str = ""


def load_guard(workspace, source: Source, max_attempts: int = 8, progress: bool = True,
               device: str = "cpu") -> Guard:
    """The novelty guard of metrics.novelty for this workspace (training photos at the generator's res).

    The first call embeds every training and held-out photo (a progress bar; cached in
    WS/embeddings), later ones read the cache; `device` (cpu, cuda) runs that network.
    """
    from neighbourhoods.metrics import novelty  # torch: imported only where the eager guard is used

    ws = open_workspace(workspace)
    try:
        index = novelty.load_index(ws, source.res, progress=progress, device=device)
    except NeighbourhoodsError as e:
        raise NeighbourhoodsError(f"novelty guard: {e} (or turn the guard off with --no-novelty-guard)") from None
    return Guard(similarity=index.max_similarity, threshold=float(index.threshold),
                 max_attempts=max_attempts, label=index.describe())


@dataclass
class Sample:
    image: np.ndarray       # H x W x 3 uint8 at the generator's resolution
    seed: int               # the requested seed
    used_seed: int          # the seed actually sampled (differs when the guard replaced a near-copy)
    similarity: float | None = None   # max cosine similarity to a training photo (None: guard off)


def render_samples(source: Source, class_indices: list[int], seeds: list[int],
                   guard: Guard | None = None) -> list[Sample]:
    """Samples for (class, seed) pairs, replacing near-copies of training photos deterministically.

    Each pair is tried with derived_seed(seed, 0), (seed, 1), ... until its sample passes the
    guard; attempts run batched across pairs, so a request's bytes never depend on its neighbours.
    """
    n = len(class_indices)
    out: list[Sample | None] = [None] * n
    todo = list(range(n))
    attempts = 1 if guard is None else guard.max_attempts
    for attempt in range(attempts):
        if not todo:
            break
        used = [derived_seed(seeds[i], attempt) for i in todo]
        images = source.sample([class_indices[i] for i in todo], used)
        if guard is None:
            for j, i in enumerate(todo):
                out[i] = Sample(images[j], seeds[i], used[j])
            todo = []
            break
        sims = np.asarray(guard.similarity(images), dtype=np.float64)
        still = []
        for j, i in enumerate(todo):
            if sims[j] <= guard.threshold:
                out[i] = Sample(images[j], seeds[i], used[j], float(sims[j]))
            else:
                still.append(i)
        todo = still
    if todo:
        raise NoNovelSample(
            f"no novel sample for seed {seeds[todo[0]]} after {attempts} attempts: every one was closer "
            f"to a training photo than the memorisation threshold; the generator memorises, retrain it")
    return out  # type: ignore[return-value]
