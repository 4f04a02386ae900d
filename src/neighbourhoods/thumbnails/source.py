"""The generator behind the thumbnails: a run's EMA generator or an exported file, as a Source."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from neighbourhoods.core.cities import CityMap, CityMatch
from neighbourhoods.core.workspace import open_workspace


@dataclass
class Source:
    """What thumbnails need from a generator: names, resolution and a deterministic sampler."""
    class_names: list[str]                                   # conditioning classes, index order
    res: tuple[int, int]                                     # (H, W) the generator outputs
    sample: Callable[[list[int], list[int]], np.ndarray]     # (class indices, seeds) -> N x H x W x 3 uint8
    fingerprint: str                                         # hash of the weights: names the model in ETags
    label: str = ""                                          # where it came from, for /healthz and manifests
    images_seen: int = 0
    city_map: CityMap | None = None                          # every city of the data -> its class (None: classes only)
    snapshot: str = ""                                       # a run's: "best" or "last" (an export: "")

    def __post_init__(self):
        if self.city_map is None:
            self.city_map = CityMap.build(self.class_names)

    def resolve(self, city: str, fallback: str | None = None) -> CityMatch:
        """The class and seeds `city` is drawn with (core.cities.CityMap); UnknownCity otherwise."""
        return self.city_map.resolve(city, fallback)

    def class_index(self, city: str) -> int:
        return self.resolve(city).class_index


def weights_fingerprint(module) -> str:
    """Hash of a module's weights (names and values): the same in a run and in its export."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


# One image per generator call: CPU convolution kernels differ with the batch size, so an image
# sampled beside others can differ by a grey level from the same image alone, and a thumbnail's
# bytes (and its strong ETag) must not depend on which requests were batched with it. Measured on
# the default model at 64x64, 1 thread: 6.2 ms per image alone, 7.4 in batches of 64, 4.8 of 16.
SAMPLE_BATCH = 1


def load_source(workspace, run: str, device: str = "cpu", snapshot: str = "best") -> Source:
    """A run (name under WS/runs or a path) via runs.load_generator (its `snapshot`: best or last),
    or an exported .pt2 file.
    (An ONNX replica is replica.load_replica_source; pipeline.load_pipeline picks.)"""
    path = Path(run)
    # torch and the models code: imported only here, so a replica (which never calls this) never loads them
    from neighbourhoods.models import runs
    from neighbourhoods.thumbnails.exported import load_exported

    if path.suffix == ".pt2" or path.is_file():
        exported = load_exported(path)
        def sample_exported(class_indices: list[int], seeds: list[int]) -> np.ndarray:
            return exported.sample(class_indices, seeds, batch_size=SAMPLE_BATCH)

        return Source(class_names=list(exported.class_names), res=tuple(exported.res), sample=sample_exported,
                      fingerprint=exported.fingerprint, label=str(path), images_seen=exported.images_seen,
                      city_map=exported.city_map)

    ws = open_workspace(workspace)
    run_dir = runs.resolve_run(ws, run)
    gen = runs.load_generator(run_dir, device=device, snapshot=snapshot)

    def sample(class_indices: list[int], seeds: list[int]) -> np.ndarray:
        return runs.sample(gen, list(class_indices), list(seeds), batch_size=SAMPLE_BATCH)

    return Source(class_names=list(gen.class_names), res=tuple(gen.res), sample=sample,
                  fingerprint=weights_fingerprint(gen.model), label=str(run_dir),
                  images_seen=int(gen.images_seen), city_map=gen.city_map, snapshot=gen.snapshot)
