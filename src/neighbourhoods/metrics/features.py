"""Feature spaces for evaluation and novelty, and a per-workspace cache of real photos' features.

Three spaces, fed uint8 images at the training resolution; the first two through the same
resize (inception.resize_bicubic: PIL bicubic, per channel, on floats):

    inception            FID InceptionV3 pool3, 2048-d, at 299 x 299 (see inception.py)
    efficientnet         ImageNet EfficientNet-Lite0 pooled features, 1280-d, at 224 x 224 (bf16 where native)
    efficientnet-native  the same network at the images' own size, no resize: the novelty guard's
                         space (it compares like with like, a generated image with training photos
                         at one resolution, so it needs no ImageNet-sized input; 4x-12x cheaper
                         per image, and it catches altered copies as well: bench/guard.py)

Real photos' features are computed once per workspace and cached in

    WS/embeddings/eval-<space>-<H>x<W>.npz   photo_ids int64, digests uint64, features float32,
                                             protocol (the extractor + preprocessing they came from)

A cached row is reused only if its photo id, the digest of its prepared pixels and the protocol
all match, so re-ingested photos are recomputed and nothing else. The file is rewritten
atomically as work progresses (photo_features): an interrupted run keeps what it finished.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.images import EFFICIENTNET_INPUT, efficientnet_pixels
from neighbourhoods.core.prepared import load_split, release_pages
from neighbourhoods.core.resolution import res_name
from neighbourhoods.core.workspace import Workspace, atomic_path
from neighbourhoods.nets import inception
from neighbourhoods.nets.devices import autocast_dtype

log = logging.getLogger("neighbourhoods.features")
SPACES = ("inception", "efficientnet", "efficientnet-native")
EFFICIENTNET_PROTOCOL = "efficientnet-lite0 imagenet pooled 1280; PIL bicubic float resize to 224x224; x/127.5-1"
NATIVE_PROTOCOL = "efficientnet-lite0 imagenet pooled 1280; at the images' own size, no resize; x/127.5-1"
PROTOCOLS = {"inception": inception.PROTOCOL, "efficientnet": EFFICIENTNET_PROTOCOL,
             "efficientnet-native": NATIVE_PROTOCOL}
BF16 = "; bf16 autocast"   # EfficientNet runs in bf16 where that is native (1.7x here, cosine >= 0.997)
DIMS = {"inception": inception.FEATURE_DIM, "efficientnet": 1280, "efficientnet-native": 1280}


@dataclass
class FeatureSpace:
    name: str                                        # "inception" or "efficientnet"
    dim: int                                         # feature length
    protocol: str                                    # network + preprocessing; part of the cache key
    extract: Callable[..., np.ndarray]               # (uint8 N x H x W x 3, progress=, desc=) -> float32 N x dim


def protocol(name: str, device: str = "cpu") -> str:
    """What a space's features came from (network, preprocessing, arithmetic): part of the cache key."""
    if name not in PROTOCOLS:
        raise NeighbourhoodsError(f"unknown feature space {name!r}; choose from {', '.join(SPACES)}")
    if name in EFFICIENTNET_INPUT and autocast_dtype("auto", torch.device(device)) is not None:
        return PROTOCOLS[name] + BF16
    return PROTOCOLS[name]


def _efficientnet_space(name: str, device: str, batch_size: int) -> FeatureSpace:
    from neighbourhoods.nets.efficientnet import efficientnet_pooled, load_efficientnet_lite0

    # channels-last is ~2.5x faster on CPU for this network (measured), same features to 3e-5
    model = load_efficientnet_lite0().to(device).to(memory_format=torch.channels_last)
    dtype = autocast_dtype("auto", torch.device(device))
    kind = torch.device(device).type

    @torch.inference_mode()
    def extract(images: np.ndarray, progress: bool = False, desc: str = f"{name} features") -> np.ndarray:
        out = np.empty((len(images), 1280), dtype=np.float32)
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress):
            batch = efficientnet_pixels(images[start:start + batch_size], name)
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).div(255.0)
            x = x.contiguous(memory_format=torch.channels_last).to(device)
            with torch.autocast(kind, dtype=dtype or torch.float32, enabled=dtype is not None):
                out[start:start + len(batch)] = efficientnet_pooled(model, x).float().cpu().numpy()
        return out

    return FeatureSpace(name, 1280, protocol(name, device), extract)


def _inception_space(device: str, batch_size: int) -> FeatureSpace:
    net = inception.load_fid_inception(device=device)

    def extract(images: np.ndarray, progress: bool = False, desc: str = "inception features") -> np.ndarray:
        return net.features(images, batch_size=batch_size, progress=progress, desc=desc)

    return FeatureSpace("inception", inception.FEATURE_DIM, inception.PROTOCOL, extract)


@functools.lru_cache(maxsize=4)
def load_space(name: str, device: str = "cpu", batch_size: int = 32) -> FeatureSpace:
    """The feature space `name`, loaded once per process: the networks are frozen and only
    read, and loading (checksum, freeze, first-call warm-up) costs seconds that evaluate,
    the training KID and the novelty guard would otherwise pay again and again."""
    if name == "inception":
        return _inception_space(device, batch_size)
    if name in EFFICIENTNET_INPUT:
        return _efficientnet_space(name, device, batch_size)
    raise NeighbourhoodsError(f"unknown feature space {name!r}; choose from {', '.join(SPACES)}")


def cache_path(ws: Workspace, space: str, res: tuple[int, int]) -> Path:
    return ws.embeddings_dir / f"eval-{space}-{res_name(res)}.npz"


def _digests(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.uint64)
    for i, row in enumerate(rows):
        out[i] = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(images[row]).tobytes(), digest_size=8).digest(), "little")
        if i % 4096 == 4095:
            release_pages(images)   # a pass over every photo must not show up as resident memory
    release_pages(images)
    return out


def _read_cache(path: Path, protocol: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["protocol"]) != protocol:
                return None
            return f["photo_ids"], f["digests"], f["features"]
    except (OSError, KeyError, ValueError):   # torn or foreign file: recompute rather than fail
        return None


def _write_cache(path: Path, protocol: str, photo_ids: np.ndarray, digests: np.ndarray,
                 features: list[tuple[np.ndarray, np.ndarray]], dim: int) -> None:
    """The cache as an .npz whose features are the rows `index` of each (array, index), in order,
    streamed in blocks into the zip (a whole copy of 217k x 1280 would be another 1.1 GB)."""
    import zipfile

    n = sum(len(index) for _, index in features)
    try:
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in (("photo_ids", photo_ids), ("digests", digests), ("protocol", np.array(protocol))):
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)
            with zf.open("features.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.float32).str, "fortran_order": False,
                                                         "shape": (n, dim)})
                for arr, index in features:
                    for start in range(0, len(index), 8192):
                        f.write(np.ascontiguousarray(arr[index[start:start + 8192]], dtype=np.float32).tobytes())
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        # a read-only workspace (a deployed model): the features stay in this process's memory
        if path not in _UNWRITABLE:
            _UNWRITABLE.add(path)
            log.warning("cannot cache features in %s (%s): kept in memory for this process", path.parent, e.strerror)


_UNWRITABLE: set[Path] = set()


def photo_features(ws: Workspace, res: tuple[int, int], images: np.ndarray, rows: np.ndarray,
                   photo_ids: np.ndarray, space: str | FeatureSpace, progress: bool = True,
                   device: str = "cpu", chunk: int = 512, step: int = 64, path: Path | None = None) -> np.ndarray:
    """Features of prepared rows `rows` (catalog ids `photo_ids`), from the cache where valid.

    `path`: the cache file (default: the space's at `res`, cache_path); the photos at a served
    thumbnail size (scoring.served_real_features) keep their own.

    `space` is a FeatureSpace or its name; by name, the network is loaded only if some rows
    are not cached yet. Photos are processed `step` at a time. The cache (one file) is rewritten
    after `chunk` new photos only once a minute has passed or the new rows are a quarter of
    what it holds: rewriting it every 512 photos made 50k photos write 12 GB (quadratic); this
    way the rewrites add up to a few times the final file, and a kill still loses at most a
    minute or a fifth of the work.
    """
    name = space.name if isinstance(space, FeatureSpace) else space
    wanted = space.protocol if isinstance(space, FeatureSpace) else protocol(name, device)
    dim = DIMS[name]
    path = path or cache_path(ws, name, res)
    digests = _digests(images, rows)
    cached = _read_cache(path, wanted)
    if cached is None:
        c_ids, c_digests, c_feats = np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros((0, dim), np.float32)
    else:
        c_ids, c_digests, c_feats = cached
    position = {(int(p), int(d)): i for i, (p, d) in enumerate(zip(c_ids, c_digests))}
    where = np.array([position.get((int(p), int(d)), -1) for p, d in zip(photo_ids, digests)], dtype=np.int64)
    missing = np.flatnonzero(where < 0)
    out = np.empty((len(rows), dim), dtype=np.float32)
    hit = np.flatnonzero(where >= 0)
    for start in range(0, len(hit), 8192):   # in blocks: a fancy-indexed copy of all rows would be a third copy
        block = hit[start:start + 8192]
        out[block] = c_feats[where[block]]
    if len(missing) == 0:
        return out
    loaded = space if isinstance(space, FeatureSpace) else load_space(name, device=device)
    bar = tqdm(total=len(missing), desc=f"{name} features of real photos ({res_name(res)})", unit="img",
               disable=not progress)
    # the rows the new cache keeps from the old one (photos not recomputed here), then the new rows
    # in `missing` order as they are computed; written by streaming both (_write_cache), never
    # concatenated: memory stays the old cache plus `out`, however many photos
    keep = np.flatnonzero(~np.isin(c_ids, photo_ids[missing]))
    done, written, last_write = 0, 0, time.monotonic()
    for start in range(0, len(missing), step):
        todo = missing[start:start + step]
        out[todo] = loaded.extract(np.asarray(images[rows[todo]]))
        release_pages(images)
        done = start + len(todo)
        bar.update(len(todo))
        fresh = done - written
        if done == len(missing) or (fresh >= chunk and (time.monotonic() - last_write >= 60
                                                        or fresh >= (len(keep) + written) // 4)):
            new = missing[:done]
            _write_cache(path, wanted, np.concatenate([c_ids[keep], photo_ids[new].astype(np.int64)]),
                         np.concatenate([c_digests[keep], digests[new]]), [(c_feats, keep), (out, new)], dim)
            written, last_write = done, time.monotonic()
    bar.close()
    return out


def split_features(ws: Workspace, res: tuple[int, int], split: str, space: str | FeatureSpace,
                   progress: bool = True, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, photo_ids, labels) of the selected photos in `split` ('train' or 'holdout')."""
    data = load_split(ws, res, split)
    name = space.name if isinstance(space, FeatureSpace) else space
    if len(data) == 0:
        return np.zeros((0, DIMS[name]), np.float32), data.photo_ids, data.labels
    feats = photo_features(ws, res, data.images, data.rows, data.photo_ids, space, progress=progress, device=device)
    return feats, data.photo_ids, data.labels
