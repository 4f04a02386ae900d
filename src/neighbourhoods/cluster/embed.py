"""Embeddings of catalog photos: batched, resumable and incremental, with a pluggable extractor.

    WS/embeddings/<extractor>-<res>/meta.json         extractor name, resolution, dimension
    WS/embeddings/<extractor>-<res>/chunk-NNNNNN.npz  ids (int64), sha256 (S64), vectors (float16)

Each chunk is written atomically once its photos are embedded, so a run killed at any moment
loses at most one chunk of work and the next run carries on. A photo is looked up by its
catalog id *and* sha256, so new photos and re-ingested changed files are embedded, and nothing
else. float16 halves the disk (217k x 1280 = 0.56 GB) at no cost to clustering.

Photos are read from the original files (EXIF orientation applied, RGB), centre-cropped to a
square and resized to `res` x `res`; JPEGs are decoded at reduced scale (PIL draft mode), which
is most of the speed on large photos.
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


@dataclass
class Extractor:
    name: str                                            # folder name under WS/embeddings
    dim: int                                             # length of one embedding
    embed: Callable[[torch.Tensor], torch.Tensor]        # N x 3 x H x W in [0, 1] -> N x dim
    class_probs: Callable[[np.ndarray], np.ndarray] | None = None  # embeddings -> N x 1000 ImageNet probs


def efficientnet_lite0_extractor() -> Extractor:
    """ImageNet EfficientNet-Lite0: 1280-d pooled features, and its own classifier's probabilities."""
    from neighbourhoods.nets.efficientnet import (
        efficientnet_pooled,
        imagenet_probs_from_pooled,
        load_efficientnet_lite0,
    )

    # channels_last: about 2x faster depthwise convolutions on CPU (measured in bench/embed.py)
    model = load_efficientnet_lite0().to(memory_format=torch.channels_last)

    def embed(images01: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return efficientnet_pooled(model, images01.contiguous(memory_format=torch.channels_last))

    def class_probs(vectors: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(vectors), 4096):
                chunk = torch.from_numpy(np.asarray(vectors[start:start + 4096], dtype=np.float32))
                out.append(imagenet_probs_from_pooled(model, chunk).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1000), np.float32)

    return Extractor(name="efficientnet_lite0", dim=1280, embed=embed, class_probs=class_probs)


EXTRACTORS: dict[str, Callable[[], Extractor]] = {
    "efficientnet_lite0": efficientnet_lite0_extractor,
}


def get_extractor(name: str) -> Extractor:
    if name not in EXTRACTORS:
        raise NeighbourhoodsError(f"unknown extractor {name!r}; available: {', '.join(sorted(EXTRACTORS))}")
    return EXTRACTORS[name]()


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
    return [(int(r["id"]), r["path"], r["sha256"] or "") for r in rows]


def _chunk_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("chunk-*.npz"))


def _read_store(folder: Path) -> dict[tuple[int, str], np.ndarray]:
    """(id, sha256) -> vector over all chunks; a later chunk wins (it can only repeat a key by re-embedding it)."""
    store: dict[tuple[int, str], np.ndarray] = {}
    for path in _chunk_files(folder):
        with np.load(path) as z:
            ids, shas, vectors = z["ids"], z["sha256"], z["vectors"]
        for i, s, v in zip(ids.tolist(), shas.tolist(), vectors):
            store[(int(i), s.decode())] = v
    return store


def _write_chunk(folder: Path, number: int, ids: list[int], shas: list[str], vectors: np.ndarray) -> None:
    with atomic_path(folder / f"chunk-{number:06d}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=np.asarray(ids, np.int64), sha256=np.asarray(shas, dtype="S64"),
                 vectors=vectors.astype(np.float16))


def embed_photos(ws: Workspace, extractor: Extractor | None = None, res: int = 224, batch_size: int = 64,
                 chunk_batches: int = 16, workers: int = 0, progress: bool = True,
                 on_chunk: Callable[[int], None] | None = None) -> EmbedSummary:
    """Embed every kept photo not yet in the store; returns what was done.

    chunk_batches: batches per stored chunk (the most work a kill can lose).
    workers: decoding processes beside the main one (0: decode in the main process).
    on_chunk: called with the number of photos embedded so far after each chunk is stored.
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

    photos = _kept_photos(ws)
    done = set(_read_store(folder))
    todo = [p for p in photos if (p[0], p[2]) not in done]
    summary = EmbedSummary(extractor.name, res, len(photos), 0, len(photos) - len(todo), 0.0)
    if not todo:
        return summary

    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(_PhotoDataset([p[1] for p in todo], res), batch_size=batch_size,
                                         num_workers=workers, shuffle=False)
    existing = _chunk_files(folder)
    number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
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
                number += 1
                summary.embedded += len(ids)
                ids, shas, parts = [], [], []
                if on_chunk is not None:
                    on_chunk(summary.embedded)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
    return summary


def load_embeddings(ws: Workspace, extractor_name: str, res: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 ascending, vectors float32 N x dim) for every kept photo; all must be embedded."""
    folder = embeddings_dir(ws, extractor_name, res)
    store = _read_store(folder)
    photos = _kept_photos(ws)
    missing = [p for p in photos if (p[0], p[2]) not in store]
    if missing:
        raise NeighbourhoodsError(f"{len(missing)} kept photos have no {extractor_name} embedding at {res}px; "
                                  "run `neighbourhoods cluster` to compute them")
    ids = np.array([p[0] for p in photos], dtype=np.int64)
    dim = next(iter(store.values())).shape[0] if store else 0
    vectors = np.stack([store[(p[0], p[2])] for p in photos]).astype(np.float32) if photos else np.zeros((0, dim), np.float32)
    return ids, vectors
