"""Novelty: is a generated image a near-copy of a training photo?

For each generated image we find its nearest training photo by cosine similarity of features
(FID Inception or EfficientNet-Lite0, see eval_features.py). A similarity means little on its
own, so it is calibrated on real photos the generator never saw: each held-out photo's
nearest-train similarity says how close an independent real photo of the same cities comes to
the training set by chance. The memorisation threshold is the 99th percentile of those; a
generated image above it is closer to a training photo than 99% of held-out real photos are,
and counts as memorised. The memorisation rate is the fraction of generated images above it
(about 1% is what an ideal generator drawing new photos from the same distribution would show).

Held-out photos that ingest flagged as near-duplicates of a training photo (same listing photo
filed twice) are left out of the calibration: they are copies, not independent photos, and
would push the threshold up to 1.

The index for the serve engineer's novelty guard (thumbnails.guard.load_guard):

    index = novelty.load_index(ws, res)              # features cached in WS/embeddings
    sims, photo_ids = index.nearest(images)          # uint8 N x H x W x 3
    copies = index.max_similarity(images) > index.threshold
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from neighbourhoods.core import catalog
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import res_name
from neighbourhoods.core.similarity import nearest, normalise  # noqa: F401  (novelty's API too)
from neighbourhoods.core.workspace import Workspace
from neighbourhoods.metrics.features import FeatureSpace, load_space, split_features

# the guard's space: EfficientNet-Lite0 at the images' own size. It compares a sample with training
# photos at one resolution, so an ImageNet-sized input buys nothing: at 96x128 it is 4x cheaper
# than at 224 (5.5 vs 22.7 ms), flags 1% of held-out photos by construction either way, and catches
# noised copies far more often (80% vs 9%; bench/guard.py, docs/serve.md)
GUARD_SPACE = "efficientnet-native"
PERCENTILE = 99.0


def memorisation_threshold(holdout_similarity: np.ndarray, percentile: float = PERCENTILE) -> float:
    if len(holdout_similarity) == 0:
        raise NeighbourhoodsError("no held-out photos to calibrate the memorisation threshold: re-run ingest with "
                                  "--holdout > 0 (cities need at least --holdout-min photos to get a holdout)")
    return float(np.percentile(holdout_similarity, percentile))


def memorisation_rate(similarity: np.ndarray, threshold: float) -> float:
    """Fraction of generated images more similar to a training photo than the threshold."""
    similarity = np.asarray(similarity)
    return float((similarity > threshold).mean()) if len(similarity) else 0.0


def _near_duplicate_links(ws: Workspace) -> list[tuple[int, int]]:
    con = catalog.connect_readonly(ws.catalog_path)
    try:
        return [(int(r["id"]), int(r["near_duplicate_of"])) for r in
                con.execute("SELECT id, near_duplicate_of FROM photos WHERE near_duplicate_of IS NOT NULL")]
    finally:
        con.close()


def independent_holdout(ws: Workspace, holdout_ids: np.ndarray, train_ids: np.ndarray) -> np.ndarray:
    """Mask of held-out photos that are not flagged near-duplicates of a training photo."""
    train, holdout = set(map(int, train_ids)), set(map(int, holdout_ids))
    linked = set()
    for a, b in _near_duplicate_links(ws):
        if a in holdout and b in train:
            linked.add(a)
        if b in holdout and a in train:
            linked.add(b)
    return np.array([int(p) not in linked for p in holdout_ids], dtype=bool)


@dataclass
class NoveltyIndex:
    space: str                       # feature space name (eval_features.SPACES)
    res: tuple[int, int]             # prepared resolution the photos were compared at
    train_features: np.ndarray       # float32 N x D, L2-normalised, of the training photos
    train_photo_ids: np.ndarray      # int64 N catalog ids
    holdout_photo_ids: np.ndarray    # int64 held-out photos used for calibration
    holdout_similarity: np.ndarray   # their nearest-train cosine similarity
    threshold: float                 # memorisation threshold: `percentile` of holdout_similarity
    percentile: float = PERCENTILE
    excluded_near_duplicates: int = 0   # held-out photos left out as flagged near-copies of train photos
    device: str = "cpu"
    _extractor: FeatureSpace | None = field(default=None, repr=False)

    @classmethod
    def build(cls, ws: Workspace, res: tuple[int, int], space: str = GUARD_SPACE, percentile: float = PERCENTILE,
              progress: bool = True, device: str = "cpu", extractor: FeatureSpace | None = None) -> "NoveltyIndex":
        """Index the training photos at `res` and calibrate on the held-out ones (features cached)."""
        source = extractor if extractor is not None else space
        train, train_ids, _ = split_features(ws, res, "train", source, progress=progress, device=device)
        if len(train) == 0:
            raise NeighbourhoodsError(f"no selected training photos at {res_name(res)} to check novelty against")
        holdout, holdout_ids, _ = split_features(ws, res, "holdout", source, progress=progress, device=device)
        keep = independent_holdout(ws, holdout_ids, train_ids)
        train_unit = normalise(train, in_place=True)   # the index holds one copy of the training features
        sims, _ = nearest(train_unit, holdout[keep])
        return cls(space=space if extractor is None else extractor.name, res=tuple(res), train_features=train_unit,
                   train_photo_ids=train_ids.astype(np.int64), holdout_photo_ids=holdout_ids[keep].astype(np.int64),
                   holdout_similarity=sims, threshold=memorisation_threshold(sims, percentile), percentile=percentile,
                   excluded_near_duplicates=int((~keep).sum()), device=device, _extractor=extractor)

    def extractor(self) -> FeatureSpace:
        if self._extractor is None:
            self._extractor = load_space(self.space, device=self.device)
        return self._extractor

    def nearest_to_features(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarity, catalog id) of each feature row's nearest training photo."""
        sims, rows = nearest(self.train_features, features)
        return sims, self.train_photo_ids[rows]

    def features(self, images: np.ndarray) -> np.ndarray:
        """Unit feature rows of images (uint8 N x H x W x 3) in the index's space."""
        return normalise(self.extractor().extract(np.asarray(images)))

    def nearest(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarity, catalog id) of each image's nearest training photo; uint8 N x H x W x 3."""
        return self.nearest_to_features(self.extractor().extract(np.asarray(images)))

    def max_similarity(self, images: np.ndarray) -> np.ndarray:
        return self.nearest(images)[0]

    def is_copy(self, images: np.ndarray) -> np.ndarray:
        """True where an image is closer to a training photo than the memorisation threshold."""
        return self.max_similarity(images) > self.threshold

    def describe(self) -> str:
        return (f"novelty guard: {self.space} features, {len(self.train_photo_ids)} training photos at "
                f"{res_name(self.res)}, threshold {self.threshold:.4f} (p{self.percentile:g} of "
                f"{len(self.holdout_photo_ids)} held-out photos' nearest-train similarity)")


def load_index(ws: Workspace, res: tuple[int, int], space: str = GUARD_SPACE, progress: bool = True,
               device: str = "cpu") -> NoveltyIndex:
    """The novelty index for `res`: built from the cached features (computing any missing ones).

    Instant when `evaluate` has run on the workspace; otherwise the first call embeds every
    selected photo once (minutes on a CPU for thousands), with a progress bar.
    """
    return NoveltyIndex.build(ws, tuple(res), space=space, progress=progress, device=device)
