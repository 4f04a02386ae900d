"""Which cities to sample for a held-out set, and the cheap KID of training curves.

`evaluate` and training's `kid_every` share these: samples are spread over cities in the
held-out split's proportions (a city the run has no class of is drawn from "(any city)"), and
`training_kid` scores a few hundred fixed-seed samples in the same Inception space as
`neighbourhoods evaluate`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from neighbourhoods.core.cities import CityMap
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.prepared import load_label_names
from neighbourhoods.core.workspace import Workspace
from neighbourhoods.metrics import scores as metrics
from neighbourhoods.metrics.features import FeatureSpace, load_space, split_features
from neighbourhoods.models import runs


# --- which cities to sample ---------------------------------------------------------------------
def class_of_label(label_names: list[str], class_names: list[str], city_map: CityMap | None = None) -> np.ndarray:
    """For each workspace label (and -1 = no label, at the end): the run's class, or -1 if none.

    Through the run's city map (a pooled city -> "(any city)"); without one, every label that is
    not a class is drawn from "(any city)" where the run has it.
    """
    return (city_map or CityMap.build(class_names)).class_lut(label_names)


def allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Split n over classes in proportion to `counts` (largest remainder, deterministic)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise NeighbourhoodsError("no held-out photos of any city the run was trained on")
    exact = counts / counts.sum() * n
    out = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - out), kind="stable")[: n - out.sum()]:
        out[i] += 1
    return out


# --- cheap KID during training ------------------------------------------------------------------
def quick_kid(sample_fn: Callable[[int], np.ndarray], real_features: np.ndarray, n: int = 300,
              extractor: FeatureSpace | None = None, subsets: int = 50, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std) of `n` images from sample_fn(n) (uint8 N x H x W x 3) against real features.

    A few hundred samples make a noisy but unbiased estimate: fine for a training curve, not
    for comparing runs (use `evaluate` with 2,000 for that).
    """
    extractor = extractor or load_space("inception")
    feats = extractor.extract(np.asarray(sample_fn(n)))
    return metrics.kid(real_features, feats, subsets=subsets, subset_size=min(n, len(real_features)), seed=seed)


@functools.lru_cache(maxsize=2)
def _kid_reference(ws_root: str, res: tuple[int, int], device: str) -> tuple[np.ndarray, np.ndarray, FeatureSpace] | None:
    # Cached per process: training calls this every kid_every images, and reloading (and
    # re-warming) the Inception network each time would cost more than the KID itself.
    ws = Workspace(Path(ws_root))
    feats, _, labels = split_features(ws, res, "holdout", "inception", progress=False, device=device)
    if len(feats) < 2:
        return None
    return feats, labels, load_space("inception", device=device)


def training_kid(ws: Workspace, res: tuple[int, int], G_ema: torch.nn.Module, class_names: list[str],
                 n: int = 300, seed: int = 0) -> tuple[float, float] | None:
    """KID (mean, std) of G_ema against the held-out photos, or None where there are none.

    Samples `n` images, cities in the held-out split's proportions, fixed seeds (the same
    every call, so the curve moves only with the weights).
    """
    device = str(next(G_ema.parameters()).device)
    reference = _kid_reference(str(ws.root), tuple(res), device)
    if reference is None:
        return None
    feats, labels, space = reference
    lut = class_of_label(load_label_names(ws), class_names)
    classes = lut[labels]
    counts = np.bincount(classes[classes >= 0], minlength=len(class_names))
    if counts.sum() == 0:
        return None
    gen_classes = np.repeat(np.arange(len(class_names)), allocate(counts, n))
    seeds = seed + np.arange(n)

    def sample_fn(count: int) -> np.ndarray:
        was_training = G_ema.training
        G_ema.eval()
        try:
            return runs.generate_images(G_ema, gen_classes[:count].tolist(), seeds[:count].tolist())
        finally:
            G_ema.train(was_training)

    return quick_kid(sample_fn, feats[classes >= 0], n=n, extractor=space, seed=seed)
