"""No two listings show the same house: within a city, served samples are near-duplicates of none before them.

Two samples of a city are one house when their features (the guard's space) are more alike
than the city's real photos are to one another in all but 1% of pairs (the 99th percentile of
same-city training photo pairs, as scoring's near-duplicate share counts in the Inception
space), or when their perceptual hashes differ in fewer than 6 bits (ingest's rule for photos).

Which samples count as "before" must not depend on which requests came first, or a URL would
change its bytes: the seeds of a city are cut into blocks of BLOCK (256 b .. 256 b + 255), and
seed s is compared with the served samples of the seeds before it in its block, in seed order
(a `Ledger`). A website's first 256 listings of a city, seeds 0..255, are therefore all
different houses; `generate` walks the seeds in that order, `serve` fills a block's ledger up to
the seed asked for (once per process), and `publish` ships the result as files.

NumPy and imagehash only: the ONNX replica gates with the same code.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

BLOCK = 256           # seeds kept mutually distinct within a city: 256 b .. 256 b + 255
PERCENTILE = 99.0     # same-city pairs above this percentile of real same-city pairs' similarity: one house
PHASH_BITS = 6        # ... or perceptual hashes differing in fewer bits than this
MIN_PHOTOS = 50       # a city's own training photos needed for its own threshold (else: all cities' pairs)
MAX_PHOTOS = 600      # photos per city whose pairs are counted (a fixed, evenly spaced subset above)


def phash(image: np.ndarray) -> int:
    """64-bit perceptual hash of an H x W x 3 uint8 image (imagehash.phash, as ingest hashes photos)."""
    import imagehash
    from PIL import Image

    return int(str(imagehash.phash(Image.fromarray(np.ascontiguousarray(image)))), 16)


def _pair_percentile(unit: np.ndarray, percentile: float) -> float:
    rows = np.linspace(0, len(unit) - 1, min(len(unit), MAX_PHOTOS)).round().astype(int)
    sims = unit[rows] @ unit[rows].T
    return float(np.percentile(sims[np.triu_indices(len(rows), k=1)], percentile))


@dataclass
class Distinct:
    """Per class: the cosine similarity above which two of its samples are one house."""
    thresholds: np.ndarray
    phash_bits: int = PHASH_BITS

    def duplicate(self, feature: np.ndarray, hash_: int, ledger: Ledger, cls: int) -> tuple[bool, float]:
        """(is `feature`/`hash_` one house with a sample already in `ledger`, its largest similarity there)."""
        kept = [f for f in ledger.features if f is not None]   # a seed with no sample (None) holds no house
        if not kept:
            return False, -1.0
        sims = np.stack(kept) @ feature
        close = any(h is not None and bin(hash_ ^ h).count("1") < self.phash_bits for h in ledger.hashes)
        return bool(close or sims.max() > self.thresholds[cls]), float(sims.max())

    def describe(self) -> str:
        return f"distinct listings: blocks of {BLOCK} seeds per city"


def calibrate_distinct(real: np.ndarray, real_classes: np.ndarray, num_classes: int,
                       percentile: float = PERCENTILE, min_photos: int = MIN_PHOTOS) -> Distinct:
    """Thresholds from the training photos' own same-city pairs (unit features `real`)."""
    own = {c: _pair_percentile(real[real_classes == c], percentile)
           for c in range(num_classes) if (real_classes == c).sum() >= max(min_photos, 2)}
    # a city with few photos: the median over cities that have enough (their pairs, not all photos'
    # pairs across cities, which are less alike than one city's)
    fallback = float(np.median(list(own.values()))) if own else _pair_percentile(real, percentile)
    return Distinct(thresholds=np.array([own.get(c, fallback) for c in range(num_classes)]))


@dataclass
class Ledger:
    """The served samples of one city's block of seeds, in seed order (`start` .. `start` + len - 1)."""
    start: int
    samples: list = field(default_factory=list)       # guard.Sample of each seed, in order (NoNovelSample: none)
    features: list = field(default_factory=list)      # their unit features
    hashes: list = field(default_factory=list)        # their perceptual hashes
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def next_seed(self) -> int:
        return self.start + len(self.samples)


class Ledgers:
    """The ledgers a process has filled, by (city, block); at most `capacity`, least recent dropped
    (a dropped block is filled again when asked for: the same samples, at the cost of rendering them)."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, int], Ledger] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, city: str, seed: int) -> Ledger:
        key = (city, int(seed) // BLOCK)
        with self._lock:
            ledger = self._items.get(key)
            if ledger is None:
                ledger = self._items[key] = Ledger(start=key[1] * BLOCK)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return ledger
