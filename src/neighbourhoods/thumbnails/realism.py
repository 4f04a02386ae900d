"""The realism gate: a thumbnail less realistic than most real photos of its city is not served.

Each sample gets the realism score of Kynkaanniemi et al. (2019) (metrics.scores.realism) in the
novelty guard's feature space (EfficientNet-Lite0, never the FID Inception that judges the
model): how deep it sits among its city's training photos, relative to their own k-NN spacing.
The threshold is a quantile of the held-out photos' own scores against the same photos, so it
means the same for every model: at quantile 0.2, a sample is served only if it scores at least
as well as the least realistic fifth of real photos do. A city with fewer than `min_photos`
training photos (or held-out ones) is compared with all photos. Rejected samples are replaced
like near-copies (guard.render_samples: the next derived seed), so a URL keeps its bytes.

NumPy only: the ONNX replica (no torch) gates with the same code and the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.metrics.scores import as_features, realism, realism_checked, realism_radii

QUANTILE = 0.2        # the share of real held-out photos the gate would turn away
MIN_PHOTOS = 50       # a city's own training photos needed to be its own reference (else: all photos)
MIN_HOLDOUT = 20      # ... and held-out photos to calibrate its own threshold
K = 3                 # the k of the k-NN balls, as precision and recall use


@dataclass
class Realism:
    """Per class: which rows of `real` it is compared with, their radii, and its threshold."""
    real: np.ndarray             # N x D unit features of the training photos
    members: list[np.ndarray]    # per class: rows of `real` in its reference set
    radii: list[np.ndarray]      # per class: realism radii of that set (metrics.scores.realism_radii)
    thresholds: np.ndarray       # per class: the `quantile` of its held-out photos' realism
    own: np.ndarray              # per class: True when compared with its own photos, False: all photos
    quantile: float = QUANTILE
    # each class's reference set (float64, checked, squared norms), made at its first use and kept:
    # taking it from `real` (often a memory map) per call cost more than the distances. At most
    # twice the features in float64 (every city's own photos, and all photos for the pooled ones).
    _references: dict = field(default_factory=dict, init=False, repr=False)

    def _reference(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        key = "all" if not self.own[c] and len(self.members[c]) == len(self.real) else c
        if key not in self._references:
            real = as_features(self.real[self.members[c]], "real", min_rows=1)
            self._references[key] = real, (real * real).sum(1)
        return self._references[key]

    def score(self, features: np.ndarray, classes: list[int] | np.ndarray) -> np.ndarray:
        """Realism of each feature row (unit, the guard's space) against its class's reference set."""
        classes = np.asarray(classes)
        features = as_features(features, "generated", min_rows=1)
        if features.shape[1] != self.real.shape[1]:
            raise NeighbourhoodsError(f"feature dimensions differ: real {self.real.shape[1]}, "
                                      f"generated {features.shape[1]}")
        out = np.empty(len(features))
        for c in np.unique(classes):
            rows = np.flatnonzero(classes == c)
            real, real_sq = self._reference(int(c))
            out[rows] = realism_checked(real, real_sq, self.radii[c], features[rows])
        return out

    def passes(self, features: np.ndarray, classes: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, True where a sample is at least as realistic as its class's threshold)."""
        scores = self.score(features, classes)
        return scores, scores >= self.thresholds[np.asarray(classes)]

    def describe(self) -> str:
        return (f"realism gate: quantile {self.quantile:g} of held-out photos' realism, "
                f"{int(self.own.sum())} of {len(self.own)} classes against their own photos")

    def summary(self, class_names: list[str]) -> list[dict]:
        return [{"class": name, "threshold": float(t), "reference_photos": int(len(m)), "own_photos": bool(o)}
                for name, t, m, o in zip(class_names, self.thresholds, self.members, self.own)]


def calibrate(real: np.ndarray, real_classes: np.ndarray, holdout: np.ndarray, holdout_classes: np.ndarray,
              num_classes: int, quantile: float = QUANTILE, min_photos: int = MIN_PHOTOS,
              min_holdout: int = MIN_HOLDOUT) -> Realism:
    """The gate for generator classes 0..num_classes-1; `real_classes`/`holdout_classes` give each
    photo's class (-1: a photo of no class of its own, used only in the all-photos reference)."""
    everyone = np.arange(len(real))
    all_radii = realism_radii(real, K)
    all_threshold = float(np.quantile(realism(real, all_radii, holdout), quantile))
    members, radii, thresholds, own = [], [], [], []
    for c in range(num_classes):
        rows, held = np.flatnonzero(real_classes == c), holdout[holdout_classes == c]
        if len(rows) >= max(min_photos, K + 1) and len(held) >= min_holdout:
            r = realism_radii(real[rows], K)
            members.append(rows), radii.append(r), own.append(True)
            thresholds.append(float(np.quantile(realism(real[rows], r, held), quantile)))
        else:
            members.append(everyone), radii.append(all_radii), own.append(False), thresholds.append(all_threshold)
    return Realism(real=real, members=members, radii=radii, thresholds=np.asarray(thresholds), own=np.asarray(own),
                   quantile=quantile)


def realism_arrays(gate: Realism) -> dict[str, np.ndarray]:
    """The gate as flat arrays (an export's guard.npz): the real features are the index's own."""
    return {"realism_members": np.concatenate(gate.members).astype(np.int32),
            "realism_radii": np.concatenate(gate.radii).astype(np.float32),
            "realism_offsets": np.cumsum([0] + [len(m) for m in gate.members]).astype(np.int64),
            "realism_thresholds": gate.thresholds.astype(np.float64), "realism_own": gate.own,
            "realism_quantile": np.float64(gate.quantile)}


def realism_from_arrays(real: np.ndarray, z) -> Realism:
    """realism_arrays' inverse, over the replica's copy of the training features."""
    off = z["realism_offsets"]
    members = [z["realism_members"][a:b].astype(np.int64) for a, b in zip(off[:-1], off[1:])]
    radii = [z["realism_radii"][a:b].astype(np.float64) for a, b in zip(off[:-1], off[1:])]
    return Realism(real=real, members=members, radii=radii, thresholds=z["realism_thresholds"],
                   own=z["realism_own"], quantile=float(z["realism_quantile"]))
