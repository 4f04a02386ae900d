"""What `generate` and `serve` load: the generator, the novelty guard and the upscaler, from a
run, an exported .pt2, or an ONNX replica (no torch, no workspace: replica.py)."""

from __future__ import annotations

from pathlib import Path

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.thumbnails.guard import Guard, load_guard
from neighbourhoods.thumbnails.realism import QUANTILE
from neighbourhoods.thumbnails.source import Source, load_source
from neighbourhoods.thumbnails.upscalers import get_upscaler


def is_replica(run) -> bool:
    return Path(str(run)).suffix == ".onnx"


def load_pipeline(workspace, run, upscale: str | None = None, novelty: bool = True, guard_device: str = "cpu",
                  progress: bool = True, snapshot: str = "best",
                  realism_quantile: float | None = None) -> tuple[Source, Guard | None, object]:
    """(source, guard or None, upscaler); a run's `snapshot` weights (runs.load_generator); the
    guard's realism gate at `realism_quantile` (None: realism.QUANTILE; 0: off; a replica's is
    the one it was exported with, and 0 turns it off)."""
    if is_replica(run):
        from neighbourhoods.thumbnails.replica import load_replica_guard, load_replica_source, load_replica_upscaler

        source = load_replica_source(run)
        if realism_quantile not in (None, 0):
            raise NeighbourhoodsError("an .onnx replica gates with the realism quantile it was exported with: "
                                      "export again with --realism-quantile, or give 0 to turn its gate off")
        guard = load_replica_guard(run, realism=realism_quantile != 0) if novelty else None
        return source, guard, load_replica_upscaler(run, upscale)
    if workspace is None:
        raise NeighbourhoodsError("give --workspace: a run needs its workspace (only an .onnx replica runs without one)")
    source = load_source(workspace, run, snapshot=snapshot)
    quantile = QUANTILE if realism_quantile is None else realism_quantile
    guard = load_guard(workspace, source, device=guard_device, progress=progress,
                       realism_quantile=quantile) if novelty else None
    return source, guard, get_upscaler(upscale, workspace=workspace, res=source.res)
