"""Layouts from the photos: the density model G draws each sample's coarse layout from.

A GAN trained for a few CPU-minutes finds a few houses and draws them again and again (recall
0.05 at 64x64 where the photos themselves reach 0.66, docs/model.md). Where a house sits in the
frame and what colours its sky, walls and lawn have is exactly what a small density model
captures well and cannot collapse: PCA of the training photos averaged down to G's first
upsampled level (8x8 at 64x64), then a Gaussian mixture there (scikit-learn), fitted on the
photos and their mirror images (training mirrors them too). Each class (city) gets its own
mixture weights, its photos' mean responsibilities pulled a little towards all photos' (so a
city of 50 photos still draws from every kind of layout, mostly its own). The fit goes into G's
`LayoutPrior` (models/projected.py), so it is saved, resumed, exported and served with G.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from neighbourhoods.train.data import photo_batches

SMOOTHING_PHOTOS = 8.0   # a class's weights count the weights of all photos as this many photos of its own


@dataclass
class LayoutFit:
    mean: np.ndarray        # 3*h*w: the mean layout (flattened C, H, W)
    basis: np.ndarray       # dim x 3*h*w: the PCA directions
    means: np.ndarray       # components x dim
    chol: np.ndarray        # components x dim x dim: Cholesky factors of the covariances
    cdf: np.ndarray         # classes x components: each class's cumulative mixture weights

    def load_into(self, G: torch.nn.Module) -> None:
        prior = G.layouts
        for name in ("mean", "basis", "means", "chol", "cdf"):
            getattr(prior, name).copy_(torch.from_numpy(getattr(self, name)).float())


def photo_layouts(images: np.ndarray, rows: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """N x 3*h*w: each training photo (images[rows[i]], NHWC uint8) averaged down to `size`, in [-1, 1]."""
    out = [F.adaptive_avg_pool2d(x, size).flatten(1).numpy() for x in photo_batches(images, rows)]
    return np.concatenate(out).astype(np.float64)


def fit_layouts(images: np.ndarray, rows: np.ndarray, classes: np.ndarray, num_classes: int,
                size: tuple[int, int], components: int, dim: int, seed: int = 0) -> LayoutFit:
    """The layout prior of the training photos (images[rows[i]] is photo i, of class classes[i])."""
    # scikit-learn, imported only where a run uses layouts
    from sklearn.mixture import GaussianMixture

    flat = photo_layouts(images, rows, size)
    mirrored = flat.reshape(len(flat), 3, *size)[..., ::-1].reshape(len(flat), -1)
    both = np.concatenate([flat, mirrored])
    mean = both.mean(axis=0)
    _, _, vt = np.linalg.svd(both - mean, full_matrices=False)
    d = min(dim, vt.shape[0])   # fewer photos than dimensions (tests, toy data): the rest stays empty
    coords = (both - mean) @ vt[:d].T
    k = max(1, min(components, len(both) // 4))   # a handful of photos (tests, toy data): fewer components
    gmm = GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=seed, max_iter=200).fit(coords)
    resp = gmm.predict_proba(coords)
    resp = resp[: len(flat)] + resp[len(flat):]              # a photo and its mirror image count as one photo
    weights = np.zeros((num_classes, k))
    np.add.at(weights, classes, resp / 2)
    counts = np.bincount(classes, minlength=num_classes)[:, None]
    weights = (weights + SMOOTHING_PHOTOS * gmm.weights_) / (counts + SMOOTHING_PHOTOS)
    cdf = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    cdf[:, -1] = 1.0
    # the prior's buffers have the asked-for sizes: unused components and dimensions stay empty (weight 0)
    basis = np.zeros((dim, len(mean)))
    basis[:d] = vt[:d]
    pad_means = np.zeros((components, dim))
    pad_chol = np.zeros((components, dim, dim))
    pad_means[:k, :d], pad_chol[:k, :d, :d] = gmm.means_, np.linalg.cholesky(gmm.covariances_)
    pad_cdf = np.ones((num_classes, components))
    pad_cdf[:, :k] = cdf
    return LayoutFit(mean=mean, basis=basis, means=pad_means, chol=pad_chol, cdf=pad_cdf)
