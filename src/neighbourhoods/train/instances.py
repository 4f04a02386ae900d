"""Instance conditioning (IC-GAN, Casanova et al., NeurIPS 2021): what G draws is "a house of
this city like that photo", and D judges a real photo against one of its near neighbours'
features, so the variety of samples comes from the city's own photos.

The bank: every training photo's instance feature (the model's `instance_features`, reduced to
`dim` by PCA so it stays small beside G's weights), rows grouped by class, written into G (it is
saved, exported and served with the weights). Each photo's `k` nearest same-class neighbours
(cosine, itself first) drive training: a real photo i is shown with the feature of a neighbour
j drawn from that list, and the fake for it is drawn from j's feature.

The same features also give G's city embeddings a starting point (`city_embeddings`, as
StyleGAN-XL starts its class embeddings from pretrained features): each city begins where its
photos' mean feature is, so cities whose houses look alike start alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from neighbourhoods import models


@dataclass
class Instances:
    features: np.ndarray     # rows x dim float32, rows grouped by class (class order)
    start: np.ndarray        # first row of each class
    count: np.ndarray        # rows of each class
    row_of: np.ndarray       # training photo index -> its row
    neighbours: np.ndarray   # rows x (k + 1): each row itself, then its k nearest same-class rows

    def conditioning_rows(self, photos: torch.Tensor, seed: int, position: int) -> torch.Tensor:
        """For each real photo, the row it is shown with: one of its neighbours, drawn from
        (seed, position) alone so a resumed run draws the same."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + position)
        pick = torch.randint(0, self.neighbours.shape[1], (len(photos),), generator=g).numpy()
        return torch.from_numpy(self.neighbours[self.row_of[photos.numpy()], pick])

    def load_into(self, G: torch.nn.Module) -> None:
        bank = G.instances
        bank.features.copy_(torch.from_numpy(self.features))
        bank.start.copy_(torch.from_numpy(self.start))
        bank.count.copy_(torch.from_numpy(self.count))


def photo_features(model: str, images: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
    """The training photos' pretrained features (images[rows[i]] is photo i, NHWC uint8),
    centred and reduced to `dim` by PCA (N x dim float64)."""
    photos = torch.from_numpy(np.stack([images[r] for r in rows])).permute(0, 3, 1, 2)
    feats = models.instance_features(model, photos).double().numpy()
    feats -= feats.mean(axis=0)
    _, _, vt = np.linalg.svd(feats, full_matrices=False)      # PCA: exact and fast at N x 432
    reduced = feats @ vt[:dim].T
    return np.pad(reduced, ((0, 0), (0, dim - reduced.shape[1])))   # fewer photos than dims


def city_embeddings(model: str, images: np.ndarray, rows: np.ndarray, classes: np.ndarray, num_classes: int,
                    dim: int) -> np.ndarray:
    """num_classes x dim float32: each class's mean photo feature (PCA to `dim`), scaled so its
    entries have unit variance, as nn.Embedding's own N(0, 1) start has; a class without photos
    keeps 0 (the mean photo)."""
    feats = photo_features(model, images, rows, dim)
    count = np.bincount(classes, minlength=num_classes)
    means = np.zeros((num_classes, dim))
    np.add.at(means, classes, feats)
    means /= np.maximum(count, 1)[:, None]
    return (means / (means[count > 0].std() + 1e-12)).astype(np.float32)


def build_instances(model: str, images: np.ndarray, rows: np.ndarray, classes: np.ndarray, num_classes: int,
                    k: int, dim: int) -> Instances:
    """The bank and neighbour lists of the training photos (images[rows[i]] is photo i, NHWC uint8)."""
    reduced = photo_features(model, images, rows, dim)
    reduced /= np.linalg.norm(reduced, axis=1, keepdims=True) + 1e-12
    order = np.argsort(classes, kind="stable")
    count = np.bincount(classes, minlength=num_classes)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    row_of = np.empty(len(order), dtype=np.int64)
    row_of[order] = np.arange(len(order))
    bank = reduced[order].astype(np.float32)
    neighbours = np.empty((len(order), k + 1), dtype=np.int64)
    for c in range(num_classes):
        a, n = int(start[c]), int(count[c])
        if n == 0:
            continue
        kk = min(k + 1, n)
        for i in range(0, n, 1024):                  # blocks of rows: memory stays flat in N
            sim = bank[a + i:a + min(i + 1024, n)] @ bank[a:a + n].T
            sim[np.arange(len(sim)), i + np.arange(len(sim))] = np.inf   # itself first
            top = np.argsort(-sim, axis=1, kind="stable")[:, :kk]
            top = np.concatenate([top, np.repeat(top[:, :1], k + 1 - kk, axis=1)], axis=1)   # tiny classes
            neighbours[a + i:a + i + len(sim)] = a + top
    return Instances(features=bank, start=start.astype(np.int64), count=np.maximum(count, 1).astype(np.int64),
                     row_of=row_of, neighbours=neighbours)
