"""Replicas: generate and serve from `neighbourhoods export --format onnx` with onnxruntime and
no torch at all (a smaller, faster-starting process for the machines that only serve).

    OUT.onnx        the EMA generator: (z float32 N x z_dim, labels int64 N) -> uint8 N x H x W x 3
    OUT.json        class names, city map, resolution, z_dim, fingerprint, images seen, the files below
    OUT.guard.onnx  the novelty guard's EfficientNet-Lite0: float32 N x 3 x 224 x 224 in [0, 1] -> N x 1280
    OUT.guard.npz   the guard's index: unit features of the training photos, their ids, the threshold,
                    the realism gate's reference sets, radii and thresholds (realism.py), and the
                    thresholds that keep a city's listings distinct (distinct.py)
    OUT.sr.onnx     the ESPCN x2 upscaler, where the workspace had one

A replica needs no workspace: everything it reads is in these files. Latents come from
core.latents (NumPy), exactly as the training stack draws them; the networks run in fp32, so
pixels are within 1/255 of the eager generator's (export measures it), and the source's
fingerprint says "onnx" so a replica's ETags never claim an eager server's bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from neighbourhoods.core.cities import CityMap
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.images import efficientnet_pixels
from neighbourhoods.core.latents import latents
from neighbourhoods.core.similarity import nearest, normalise
from neighbourhoods.thumbnails.distinct import Distinct
from neighbourhoods.thumbnails.guard import Guard
from neighbourhoods.thumbnails.realism import realism_from_arrays
from neighbourhoods.thumbnails.source import SAMPLE_BATCH, Source
from neighbourhoods.thumbnails.upscalers import SRUpscaler, get_upscaler


def _session(path: Path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads      # like the eager server's --threads 1: no spin-waiting siblings
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:   # a damaged or foreign file: one line
        raise NeighbourhoodsError(f"cannot load {path}: {e}") from None


def read_meta(path: Path) -> dict:
    meta_path = Path(path).with_suffix(".json")
    if not Path(path).is_file() or not meta_path.is_file():
        raise NeighbourhoodsError(f"{path} is not an ONNX replica (need {Path(path).name} and {meta_path.name}); "
                                  "run `neighbourhoods export --format onnx` first")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "onnx":
        raise NeighbourhoodsError(f"{meta_path} does not describe an ONNX export")
    return meta


def sibling(path: Path, suffix: str) -> Path:
    """OUT.onnx -> OUT.guard.onnx, OUT.guard.npz, OUT.sr.onnx."""
    return Path(path).with_suffix(suffix)


def load_replica_source(path, threads: int = 1) -> Source:
    path = Path(path)
    meta = read_meta(path)
    session = _session(path, threads)
    z_dim, (h, w) = int(meta["z_dim"]), meta["res"]

    def sample(class_indices: list[int], seeds: list[int]) -> np.ndarray:
        out = np.empty((len(seeds), h, w, 3), np.uint8)
        for i in range(0, len(seeds), SAMPLE_BATCH):   # one per call: bytes never depend on the batch
            z = latents(seeds[i:i + SAMPLE_BATCH], z_dim)
            labels = np.asarray(class_indices[i:i + SAMPLE_BATCH], dtype=np.int64)
            out[i:i + len(z)] = session.run(None, {"z": z, "labels": labels})[0]
        return out

    return Source(class_names=list(meta["class_names"]), res=(h, w), sample=sample,
                  fingerprint="onnx-" + str(meta["fingerprint"]), label=str(path),
                  images_seen=int(meta["images_seen"]), snapshot=str(meta.get("snapshot", "")),
                  city_map=CityMap.from_json(meta["class_names"], meta.get("city_map")))


def guard_features(session, images: np.ndarray, space: str = "efficientnet") -> np.ndarray:
    """uint8 N x H x W x 3 -> float32 N x 1280, by the eager guard's preprocessing for `space`."""
    x = efficientnet_pixels(images, space).transpose(0, 3, 1, 2) / np.float32(255)
    return session.run(None, {"images": np.ascontiguousarray(x, dtype=np.float32)})[0]


def load_replica_guard(path, max_attempts: int = 8, realism: bool = True) -> Guard:
    path = Path(path)
    meta = read_meta(path)
    net, index = sibling(path, ".guard.onnx"), sibling(path, ".guard.npz")
    if not net.is_file() or not index.is_file():
        raise NeighbourhoodsError(f"the replica {path} has no novelty guard ({net.name}, {index.name}): export it "
                                  "again from a workspace with held-out photos, or serve with --no-novelty-guard")
    session = _session(net)
    with np.load(index, allow_pickle=False) as z:
        train = z["features"].astype(np.float32)   # unit rows, as the eager index holds them
        threshold = float(z["threshold"])
        gate = realism_from_arrays(train, z) if "realism_thresholds" in z.files and realism else None
        apart = Distinct(thresholds=z["distinct_thresholds"]) if "distinct_thresholds" in z.files else None

    def embed(images: np.ndarray) -> np.ndarray:
        return normalise(guard_features(session, images, meta["guard"]["space"]))

    label = (f"novelty guard (onnx): {meta['guard']['space']} features, {len(train)} training photos, "
             f"threshold {threshold:.4f}") + "".join(f"; {x.describe()}" for x in (gate, apart) if x is not None)
    return Guard(embed=embed, similarity=lambda f: nearest(train, f)[0], threshold=threshold,
                 max_attempts=max_attempts, label=label, realism=gate, distinct=apart)


def load_replica_upscaler(path, name: str | None = None):
    """The replica's upscaler: its ESPCN where exported and wanted, else the named filter."""
    path = Path(path)
    sr = sibling(path, ".sr.onnx")
    if name in (None, "espcn") and sr.is_file():
        session = _session(sr)
        meta = read_meta(path)

        def network(x: np.ndarray) -> np.ndarray:
            return session.run(None, {"x": x})[0]

        return SRUpscaler("espcn", network, int(meta["upscale"]["scale"]), "onnx-" + meta["upscale"]["fingerprint"])
    if name == "espcn":
        raise NeighbourhoodsError(f"the replica {path} has no ESPCN upscaler ({sr.name}): pick bicubic, lanczos "
                                  "or lanczos-sharp")
    return get_upscaler(name)
