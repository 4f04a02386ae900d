"""`neighbourhoods demo`: the README's main job in one command.

With no data it draws toy town (see toytown.py) into the workspace and runs the pipeline on it;
with `--data DIR --labels CSV` it runs the same steps on real photos. Each stage is one library
call here, so later stages extend the sequence rather than the machinery.
"""

from __future__ import annotations

from pathlib import Path

from .ingest import IngestSummary, ingest
from .toytown import draw_toytown

DEMO_RES = ((64, 64), (48, 64))   # square for the quick GAN, 4:3 like listing thumbnails


def demo(workspace="neighbourhoods-demo", data=None, labels=None, file_column: str = "file",
         label_column: str = "city", workers: int | None = None, progress: bool = True) -> IngestSummary:
    """Run every stage that exists so far; returns the ingest summary."""
    ws = Path(workspace)
    if data is None:
        data, labels = draw_toytown(ws / "toytown", cities=("Pinecrest", "Sunvale", "Harborview", "Brickton"),
                                    per_city=100, seed=0)
    return ingest(data, ws, labels=labels, file_column=file_column, label_column=label_column,
                  res=DEMO_RES, workers=workers, progress=progress)
