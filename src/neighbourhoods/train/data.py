"""What training reads: conditioning classes of the photos, and batches in a resumable order."""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from neighbourhoods.core import prepared
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.prepared import PreparedSplit
from neighbourhoods.core.resolution import res_name
from neighbourhoods.core.workspace import Workspace
from neighbourhoods.models.runs import ANY_CITY
from neighbourhoods.train.config import GRID_ROWS, GRID_SEEDS


def photo_batches(images: np.ndarray, rows: np.ndarray, batch: int = 512):
    """The photos images[rows] (uint8 N x H x W x 3, e.g. a memory map) in chunks of `batch`, as
    float N x 3 x H x W tensors in [-1, 1]: for whole-dataset statistics computed at a run's start."""
    for i in range(0, len(rows), batch):
        yield torch.from_numpy(np.ascontiguousarray(images[rows[i:i + batch]])).permute(0, 3, 1, 2).float() / 127.5 - 1


def class_map(label_names: list[str], labels: np.ndarray,
              min_city_photos: int) -> tuple[list[str], np.ndarray, list[str]]:
    """(class_names, class of each photo, merged city names).

    Cities with at least `min_city_photos` photos keep their own class, in labels.json order;
    the rest (and unlabelled photos) share ANY_CITY, appended last, so a city with a handful of
    photos cannot collapse to copies of them.
    """
    counts = np.bincount(labels[labels >= 0], minlength=len(label_names))
    own = [i for i, n in enumerate(counts) if n >= min_city_photos and label_names[i] != ANY_CITY]
    class_names = [label_names[i] for i in own]
    lut = np.full(len(label_names) + 1, -1, dtype=np.int64)   # the extra last slot: label -1 (none)
    lut[own] = np.arange(len(own))
    merged = [label_names[i] for i, n in enumerate(counts) if n > 0 and lut[i] < 0]
    if (lut[labels] < 0).any():
        class_names.append(ANY_CITY)
        lut[lut < 0] = len(class_names) - 1
    return class_names, lut[labels], merged


class BatchReader:
    """Batches from the memory-mapped arrays, in an order that depends only on (seed, position).

    Position p (= images shown before it) maps to photo perm_e[p mod N] of epoch e = p div N,
    perm_e a seeded permutation: every photo once per epoch, and resuming at images_seen needs
    no sampler state. Rank r of W takes every W-th image of each global batch. Only a batch's
    worth of pixels is ever in memory, whatever the dataset size.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, classes: np.ndarray, seed: int, mirror: bool,
                 rank: int, world: int, workers: int, pin: bool = False):
        self.images, self.rows, self.classes = images, rows, classes
        self.pin = pin   # page-locked batches copy to a GPU asynchronously
        self.seed, self.mirror, self.rank, self.world = seed, mirror, rank, world
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers) if workers > 0 else None
        self._pending: dict[tuple[int, int], Future] = {}
        self._loads = 0

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if epoch not in self._epochs:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(len(self.rows), generator=g).numpy()
                flips = torch.randint(0, 2, (len(self.rows),), generator=g).numpy().astype(bool)
                self._epochs[epoch] = (perm, flips)
                while len(self._epochs) > 3:
                    self._epochs.popitem(last=False)
            return self._epochs[epoch]

    def _load(self, position: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(self.rows)
        pos = np.arange(position, position + batch)[self.rank::self.world]
        picks, flips = [], []
        for p in pos:
            perm, flip = self._epoch(int(p) // n)
            picks.append(perm[p % n])
            flips.append(flip[p % n])
        picks = np.array(picks, dtype=np.int64)
        x = np.stack([self.images[self.rows[i]] for i in picks])          # N x H x W x 3 uint8
        self._loads += 1
        if self._loads % 64 == 0:
            prepared.release_pages(self.images)   # resident memory stays flat however many photos
        if self.mirror:
            x[np.array(flips)] = x[np.array(flips), :, ::-1]
        labels = self.classes[picks].copy()
        x, labels = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
        return ((x.pin_memory(), labels.pin_memory()) if self.pin else (x, labels)) + (torch.from_numpy(picks),)

    def get(self, position: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of the global batch starting at `position` as (uint8 images, classes,
        training-photo indices); prefetches the next one."""
        key = (position, batch)
        future = self._pending.pop(key, None)
        out = future.result() if future is not None else self._load(position, batch)
        if self._pool is not None:
            for stale in list(self._pending):   # after a rollback the old prefetches are of no use
                if stale[0] < position:
                    self._pending.pop(stale)
            nxt = (position + batch, batch)
            if nxt not in self._pending:
                self._pending[nxt] = self._pool.submit(self._load, *nxt)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def grid_rows_for(class_names: list[str], classes: np.ndarray, rows: int) -> list[int]:
    """The `rows` classes with the most training photos, in class order."""
    counts = np.bincount(classes, minlength=len(class_names))
    top = sorted(np.argsort(-counts, kind="stable")[:rows].tolist())
    return [int(c) for c in top]


@dataclass
class TrainingData:
    """The training split and its conditioning classes, as one run sees them."""
    split: PreparedSplit        # memory-mapped images, labels and catalog ids of the train split
    class_names: list[str]      # conditioning classes in index order (ANY_CITY last, if any)
    classes: np.ndarray         # class of each training photo
    merged: list[str]           # cities pooled into ANY_CITY
    grid_classes: list[int]     # rows of the progress grid
    grid_seeds: list[int]       # columns of the progress grid

    @property
    def class_weights(self) -> np.ndarray:
        return np.bincount(self.classes, minlength=len(self.class_names)) / len(self.classes)


def load_training_data(ws: Workspace, cfg) -> TrainingData:
    split = prepared.load_split(ws, tuple(cfg.res), "train")
    if len(split) == 0:
        raise NeighbourhoodsError(f"no training photos at {res_name(cfg.res)} (is everything held out or deselected?)")
    if split.images.shape[1:3] != tuple(cfg.res):
        raise NeighbourhoodsError(f"prepared arrays are {split.images.shape[1]}x{split.images.shape[2]}, "
                                  f"not {res_name(cfg.res)}")
    class_names, classes, merged = class_map(split.label_names, split.labels, cfg.min_city_photos)
    return TrainingData(split=split, class_names=class_names, classes=classes, merged=merged,
                        grid_classes=grid_rows_for(class_names, classes, GRID_ROWS),
                        grid_seeds=list(range(GRID_SEEDS)))
