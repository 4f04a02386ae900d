"""Embeddings of catalog photos: batched, resumable and incremental, with a pluggable extractor.

    WS/embeddings/<extractor>-<res>/meta.json         extractor name, resolution, dimension
    WS/embeddings/<extractor>-<res>/chunk-NNNNNN.npz  ids (int64), sha256 (S64), vectors (float16)

Each chunk is written atomically once its photos are embedded, so a run killed at any moment
loses at most one chunk of work and the next run carries on. A photo is looked up by its
catalog id *and* sha256, so new photos and re-ingested changed files are embedded, and nothing
else. float16 halves the disk (217k x 1280 = 0.56 GB) at no cost to clustering.

Photos are read from the original files (EXIF orientation applied, RGB), centre-cropped to a
square and resized to `res` x `res`; JPEGs are decoded at reduced scale (PIL draft mode), which
is most of the speed on large photos. The network runs on `device` (cpu, cuda) in bf16 where
that is native (1.7x the photos/s of fp32 on this AMX CPU; cosine >= 0.997 to the fp32 vector,
below the float16 the store keeps).

Several processes (torchrun, one per GPU or machine, on a shared workspace) each embed a
disjoint share of the photos still to do (every `world`-th, from the same list) into their own
chunks (chunk numbers interleaved by rank); the store is then the same as one process writes,
and rank 0 reads it whole.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from neighbourhoods.core import catalog
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.images import to_rgb
from neighbourhoods.core.workspace import Workspace, atomic_path, atomic_write_json
from neighbourhoods.nets.devices import Dist, autocast_dtype


@dataclass
class Extractor:
    name: str                                            # folder name under WS/embeddings
    dim: int                                             # length of one embedding
    embed: Callable[[torch.Tensor], torch.Tensor]        # N x 3 x H x W in [0, 1] -> N x dim
    class_probs: Callable[[np.ndarray], np.ndarray] | None = None  # embeddings -> N x 1000 ImageNet probs


def efficientnet_lite0_extractor(device: torch.device | str = "cpu", amp: str = "auto") -> Extractor:
    """ImageNet EfficientNet-Lite0: 1280-d pooled features, and its own classifier's probabilities.

    amp: "auto" (bf16 where native: CUDA, or a CPU with AMX / AVX512-BF16), "bf16" or "off".
    """
    from neighbourhoods.nets.efficientnet import (
        efficientnet_pooled,
        imagenet_probs_from_pooled,
        load_efficientnet_lite0,
    )

    # channels_last: about 2x faster depthwise convolutions on CPU (measured in bench/embed.py)
    device = torch.device(device)
    dtype = autocast_dtype(amp, device)
    model = load_efficientnet_lite0().to(device).to(memory_format=torch.channels_last)

    def embed(images01: torch.Tensor) -> torch.Tensor:
        x = images01.to(device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return efficientnet_pooled(model, x).float().cpu()

    def class_probs(vectors: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(vectors), 4096):
                chunk = torch.from_numpy(np.asarray(vectors[start:start + 4096], dtype=np.float32))
                out.append(imagenet_probs_from_pooled(model, chunk).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1000), np.float32)

    return Extractor(name="efficientnet_lite0", dim=1280, embed=embed, class_probs=class_probs)


EXTRACTORS: dict[str, Callable[..., Extractor]] = {
    "efficientnet_lite0": efficientnet_lite0_extractor,
}


def get_extractor(name: str, device: torch.device | str = "cpu", amp: str = "auto") -> Extractor:
    if name not in EXTRACTORS:
        raise NeighbourhoodsError(f"unknown extractor {name!r}; available: {', '.join(sorted(EXTRACTORS))}")
    return EXTRACTORS[name](device=device, amp=amp)


def check_res(res: int) -> int:
    if res < 32 or res > 1024 or res % 32:
        raise NeighbourhoodsError(f"bad embedding resolution {res}: use a multiple of 32 between 32 and 1024 "
                                  "(e.g. 224, or 128 to embed with about half the CPU time)")
    return res


def embeddings_dir(ws: Workspace, extractor_name: str, res: int) -> Path:
    return ws.embeddings_dir / f"{extractor_name}-{res}"


def load_photo(path: str | Path, res: int) -> np.ndarray:
    """The photo as res x res x 3 uint8 RGB: EXIF-upright, centre-cropped to a square, resized."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (res, res))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below res
            im = to_rgb(ImageOps.exif_transpose(im))  # as ingest does: alpha on white, 16-bit scaled
            im = ImageOps.fit(im, (res, res), Image.BILINEAR)
            return np.array(im, dtype=np.uint8)  # a writable copy: torch.from_numpy warns otherwise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise NeighbourhoodsError(f"cannot read {path} ({e}); it was readable at ingest: "
                                  "re-run `neighbourhoods ingest` to update the catalog") from None


class _PhotoDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], res: int):
        self.paths, self.res = paths, res

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(load_photo(self.paths[i], self.res)).permute(2, 0, 1)


@dataclass
class EmbedSummary:
    extractor: str     # extractor name
    res: int           # embedding resolution (square side)
    photos: int        # kept photos in the catalog
    embedded: int      # embedded by this run
    reused: int        # found in the store from earlier runs
    seconds: float     # wall time of the embedding part of this run

    @property
    def photos_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def _kept_photos(ws: Workspace) -> list[tuple[int, str, str]]:
    con = catalog.connect(ws.catalog_path)
    try:
        rows = con.execute("SELECT id, path, sha256 FROM photos WHERE status = 'kept' ORDER BY id").fetchall()
    finally:
        con.close()
    return [(int(r["id"]), catalog.fs_path(r["path"]), r["sha256"] or "") for r in rows]


def _chunk_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("chunk-*.npz"))


def _stored_keys(folder: Path) -> set[tuple[int, str]]:
    """(id, sha256) of every stored vector (the vectors themselves are not read)."""
    keys: set[tuple[int, str]] = set()
    for path in _chunk_files(folder):
        with np.load(path) as z:
            keys.update(zip(z["ids"].tolist(), (s.decode() for s in z["sha256"].tolist())))
    return keys


def _write_chunk(folder: Path, number: int, ids: list[int], shas: list[str], vectors: np.ndarray) -> None:
    with atomic_path(folder / f"chunk-{number:06d}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=np.asarray(ids, np.int64), sha256=np.asarray(shas, dtype="S64"),
                 vectors=vectors.astype(np.float16))


def embed_photos(ws: Workspace, extractor: Extractor | None = None, res: int = 224, batch_size: int = 64,
                 chunk_batches: int = 16, workers: int = 0, progress: bool = True,
                 on_chunk: Callable[[int], None] | None = None, dd: Dist | None = None) -> EmbedSummary:
    """Embed every kept photo not yet in the store; returns what was done (by this process).

    chunk_batches: batches per stored chunk (the most work a kill can lose).
    workers: decoding processes beside the main one (0: decode in the main process).
    on_chunk: called with the number of photos embedded so far after each chunk is stored.
    dd: the torchrun processes; each embeds every dd.world-th photo still to do.
    """
    from tqdm import tqdm

    check_res(res)
    extractor = extractor or efficientnet_lite0_extractor()
    folder = embeddings_dir(ws, extractor.name, res)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"extractor": extractor.name, "res": res, "dim": extractor.dim, "dtype": "float16"}
    meta_path = folder / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) != meta:
        raise NeighbourhoodsError(f"{folder} holds embeddings of another kind ({meta_path.read_text().strip()}); "
                                  "remove the folder to start again")
    atomic_write_json(meta_path, meta)

    dd = dd or Dist()
    photos = _kept_photos(ws)
    done = _stored_keys(folder)
    todo = [p for p in photos if (p[0], p[2]) not in done]
    existing = _chunk_files(folder)
    first_number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
    dd.barrier()   # every process has listed the store before any adds to it
    summary = EmbedSummary(extractor.name, res, len(photos), 0, len(photos) - len(todo), 0.0)
    todo = todo[dd.rank::dd.world]
    if not todo:
        return summary

    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(_PhotoDataset([p[1] for p in todo], res), batch_size=batch_size,
                                         num_workers=workers, shuffle=False)
    number = first_number + dd.rank
    ids: list[int] = []
    shas: list[str] = []
    parts: list[np.ndarray] = []
    bar = tqdm(total=len(todo), unit="photo", desc=f"embedding ({extractor.name}, {res}px)", disable=not progress)
    try:
        for b, batch in enumerate(loader):
            vectors = extractor.embed(batch.float() / 255.0)
            first = b * batch_size
            for pid, _, sha in todo[first:first + len(batch)]:
                ids.append(pid)
                shas.append(sha)
            parts.append(vectors.numpy())
            bar.update(len(batch))
            if len(parts) == chunk_batches or first + len(batch) == len(todo):
                _write_chunk(folder, number, ids, shas, np.concatenate(parts))
                number += dd.world
                summary.embedded += len(ids)
                ids, shas, parts = [], [], []
                if on_chunk is not None:
                    on_chunk(summary.embedded)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
    return summary


def load_embeddings(ws: Workspace, extractor_name: str, res: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 ascending, vectors float16 N x dim) for every kept photo; all must be embedded.

    Filled chunk by chunk into one array (a later chunk wins: it can only repeat a photo by
    re-embedding it), so memory is the result plus one chunk, at 217k photos as at 2k.
    """
    folder = embeddings_dir(ws, extractor_name, res)
    photos = _kept_photos(ws)
    row_of = {(p[0], p[2]): i for i, p in enumerate(photos)}
    vectors: np.ndarray | None = None
    filled = np.zeros(len(photos), dtype=bool)
    for path in _chunk_files(folder):
        with np.load(path) as z:
            ids, shas, chunk = z["ids"].tolist(), z["sha256"].tolist(), z["vectors"]
        if vectors is None:
            vectors = np.zeros((len(photos), chunk.shape[1]), dtype=np.float16)
        for j, key in enumerate(zip(ids, (s.decode() for s in shas))):
            row = row_of.get(key)
            if row is not None:
                vectors[row], filled[row] = chunk[j], True
    if not filled.all():
        raise NeighbourhoodsError(f"{int((~filled).sum())} kept photos have no {extractor_name} embedding at "
                                  f"{res}px; run `neighbourhoods cluster` to compute them")
    ids = np.array([p[0] for p in photos], dtype=np.int64)
    return ids, vectors if vectors is not None else np.zeros((0, 0), np.float16)
