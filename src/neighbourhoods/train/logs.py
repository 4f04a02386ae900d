"""What a run shows while it trains: messages, the progress bar, metrics.jsonl, TensorBoard, grids.

Only rank 0 writes; `Dist.main` decides. metrics.jsonl gets one line per `tick_every` images
(averages over the steps since the last line), TensorBoard the same scalars and each sample grid.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from neighbourhoods.core.grid import save_grid
from neighbourhoods.core.workspace import atomic_write_text


def say(cfg, main: bool, message: str) -> None:
    """A line above the progress bar, from rank 0, unless the run is quiet."""
    if cfg.progress and main:
        tqdm.write(message)


def progress_bar(cfg, main: bool, run_name: str, images_seen: int, limit: float) -> tuple[tqdm, bool]:
    """(bar, by_time): with a time budget the bar fills with seconds (images/s and kimg in the
    postfix); with an image budget it fills with images."""
    by_time = cfg.minutes is not None
    bar = tqdm(total=(round(cfg.minutes * 60) if by_time else int(limit)),
               initial=0 if by_time else min(images_seen, int(limit)),
               unit="img", unit_scale=True, dynamic_ncols=True, disable=not (cfg.progress and main),
               desc=f"train {run_name}",
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}" if by_time else None)
    return bar, by_time


@dataclass
class Tick:
    """Sums over the steps since the last metrics line."""
    images: int           # images_seen when the tick started
    busy: float = 0.0     # seconds in training steps (snapshots and grids excluded)
    sums: dict = field(default_factory=dict)   # each loss term (train/loss.py) summed over the steps
    steps: int = 0

    def add(self, seconds: float, terms: dict[str, float]) -> None:
        self.busy += seconds
        for key, value in terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def rate(self, images_seen: int) -> float:
        """Images per second of training steps since the tick started."""
        return (images_seen - self.images) / max(self.busy, 1e-9)

    def line(self, images_seen: int, time_s: float) -> dict:
        return {"images_seen": images_seen, "time_s": round(time_s, 3),
                **{key: total / self.steps for key, total in self.sums.items()},
                "images_per_s": round(self.rate(images_seen), 2)}


def open_tensorboard(run_dir: Path, images_seen: int):
    from torch.utils.tensorboard import SummaryWriter  # pulls in tensorboard: only when a run starts

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=images_seen or None)


def write_metrics(run_dir: Path, writer, line: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    for key, value in line.items():   # every loss term, the rate and the KID, against images seen
        if key not in ("images_seen", "time_s") and isinstance(value, (int, float)):
            writer.add_scalar(f"train/{key}", value, line["images_seen"])


def trim_metrics(path: Path, images_seen: int) -> None:
    """Drop lines a killed run logged past the checkpoint we resume from."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["images_seen"] <= images_seen:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue   # a line torn by the kill
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


def progress_grid_path(run_dir: Path, images_seen: int) -> Path:
    return run_dir / "samples" / f"progress-{images_seen:010d}.png"


def write_progress_grid(run_dir: Path, images_seen: int, images: np.ndarray, row_names: list[str], columns: int,
                        writer) -> None:
    """The fixed-seed grid (cities down, seeds across) as a PNG and in TensorBoard."""
    sheet = save_grid(progress_grid_path(run_dir, images_seen), images, columns=columns, row_names=row_names)
    if writer is not None:
        writer.add_image("samples", np.asarray(sheet), images_seen, dataformats="HWC")


def deadline(cfg) -> float:
    return math.inf if cfg.minutes is None else time.monotonic() + cfg.minutes * 60
