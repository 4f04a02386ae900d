"""Reading a generator written by `neighbourhoods export` (the writing is export.py's).

    OUT.pt2    torch.export ExportedProgram: graph + weights, dynamic batch dimension
    OUT.json   class_names, city_map, res, z_dim, images_seen, weights fingerprint, noise recipe

The program loads with torch.export.load (weights through the weights-only loader, no
pickled Python) and runs without the `models` package; the latent of each seed is drawn
exactly as runs.sample draws it (runs.noise_for_seeds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from neighbourhoods.core.cities import CityMap
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.models.runs import noise_for_seeds


@dataclass
class ExportedGenerator:
    """An exported generator and its metadata (the counterpart of runs.LoadedGenerator)."""
    path: Path
    class_names: list[str]          # conditioning classes in index order
    res: tuple[int, int]            # (H, W) it generates
    z_dim: int
    images_seen: int
    fingerprint: str                # weights fingerprint of the run it was exported from
    module: Callable                # (z, labels) -> N x H x W x 3 uint8 tensor
    city_map: CityMap | None = None # every city of the run's data -> its class

    def sample(self, class_indices: list[int], seeds: list[int], batch_size: int = 64) -> np.ndarray:
        """uint8 N x H x W x 3; image i depends only on (class_indices[i], seeds[i]) and the weights."""
        outs = []
        with torch.inference_mode():
            for i in range(0, len(seeds), batch_size):
                z = noise_for_seeds(list(seeds[i:i + batch_size]), self.z_dim)
                labels = torch.tensor(class_indices[i:i + batch_size], dtype=torch.long)
                outs.append(self.module(z, labels).numpy())
        h, w = self.res
        return np.concatenate(outs) if outs else np.zeros((0, h, w, 3), np.uint8)


def load_exported(path) -> ExportedGenerator:
    """The exported generator at `path` (.pt2, with its .json beside it); NeighbourhoodsError if it is not one."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise NeighbourhoodsError(f"{path} is not an exported generator (need {path.name} and {meta_path.name}); "
                                  "run `neighbourhoods export` first")
    try:
        module = torch.export.load(str(path)).module()
    except Exception as e:  # a damaged or foreign file: one clear line, not a traceback
        raise NeighbourhoodsError(f"cannot load exported generator {path}: {e}") from None
    meta = json.loads(meta_path.read_text())
    return ExportedGenerator(path=path, class_names=list(meta["class_names"]), res=tuple(meta["res"]),
                             z_dim=int(meta["z_dim"]), images_seen=int(meta["images_seen"]),
                             fingerprint=str(meta["fingerprint"]), module=module,
                             city_map=CityMap.from_json(meta["class_names"], meta.get("city_map")))
