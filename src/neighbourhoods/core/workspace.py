"""The workspace folder that carries state from stage to stage, and atomic file writes.

Layout (every stage reads what the previous one wrote):

    WS/catalog.sqlite              one row per input file (see catalog.py)
    WS/labels.json                 label vocabulary: names (index order) and photo counts
    WS/prepared/<H>x<W>/images.npy uint8 N x H x W x 3, memory-mapped by training
    WS/prepared/<H>x<W>/photo_ids.npy  int64 N, catalog id of each row (ascending)
    WS/embeddings/                 feature vectors for clustering and novelty
    WS/clusters/                   contact sheets and the cluster page
    WS/runs/<name>/                one training run: config, checkpoints, samples, metrics
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import res_name


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.sqlite"

    @property
    def labels_path(self) -> Path:
        return self.root / "labels.json"

    def prepared_dir(self, res: tuple[int, int]) -> Path:
        return self.root / "prepared" / res_name(res)

    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    @property
    def clusters_dir(self) -> Path:
        return self.root / "clusters"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / name


def open_workspace(path: str | os.PathLike, create: bool = False) -> Workspace:
    root = Path(path).expanduser().resolve()
    if create:
        make_folder(root, "workspace")
    elif not (root / "catalog.sqlite").is_file():
        raise NeighbourhoodsError(f"{root} is not a workspace (no catalog.sqlite): run `neighbourhoods ingest` first")
    return Workspace(root)


def make_folder(path: Path, what: str) -> Path:
    """mkdir -p `path`, or a one-line error saying why not (a file in the way, no permission)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise NeighbourhoodsError(f"cannot use {path} as the {what} folder: {p} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NeighbourhoodsError(f"cannot create the {what} folder {path}: {e.strerror or e}") from None
    return path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list: makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it into place.

    A kill at any moment leaves either the old file or the complete new one, never a torn one.
    Works for anything that writes to a path (np.save, Image.save, safetensors.save_file, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name ends in the real suffix: np.save appends ".npy" and Image.save picks
    # its format from the suffix, so "x.npy.tmp" would write elsewhere or fail
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
