"""What `generate` and `serve` load: the generator, the novelty guard and the upscaler, from a
run, an exported .pt2, or an ONNX replica (no torch, no workspace: replica.py)."""

from __future__ import annotations

from pathlib import Path

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.thumbnails.guard import Guard, load_guard
from neighbourhoods.thumbnails.source import Source, load_source
from neighbourhoods.thumbnails.upscalers import get_upscaler


def is_replica(run) -> bool:
    return Path(str(run)).suffix == ".onnx"


def load_pipeline(workspace, run, upscale: str | None = None, novelty: bool = True, guard_device: str = "cpu",
                  progress: bool = True, snapshot: str = "best") -> tuple[Source, Guard | None, object]:
    """(source, guard or None, upscaler); a run's `snapshot` weights (runs.load_generator)."""
    if is_replica(run):
        from neighbourhoods.thumbnails.replica import load_replica_guard, load_replica_source, load_replica_upscaler

        source = load_replica_source(run)
        return source, load_replica_guard(run) if novelty else None, load_replica_upscaler(run, upscale)
    if workspace is None:
        raise NeighbourhoodsError("give --workspace: a run needs its workspace (only an .onnx replica runs without one)")
    source = load_source(workspace, run, snapshot=snapshot)
    guard = load_guard(workspace, source, device=guard_device, progress=progress) if novelty else None
    return source, guard, get_upscaler(upscale, workspace=workspace, res=source.res)
