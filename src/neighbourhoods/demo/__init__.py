"""`neighbourhoods demo`: the README's main job in one command.

With no data it draws toy town (see toytown.py) into the workspace and runs the whole pipeline
on it; with `--data DIR --labels CSV` it runs the same steps on real photos. Each stage is one
library call, so the sequence below is also the shortest example of the library API.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neighbourhoods.cluster import ClusterConfig, ClusterSummary, cluster
from neighbourhoods.demo.toytown import draw_toytown
from neighbourhoods.evaluate import EvaluateConfig, evaluate
from neighbourhoods.evaluate import describe as describe_metrics
from neighbourhoods.ingest import IngestSummary, ingest
from neighbourhoods.report import write_report
from neighbourhoods.select import select
from neighbourhoods.serve import serve_command
from neighbourhoods.train import TrainConfig, train
from neighbourhoods.upscale import ensure_sr

DEMO_RES = ((64, 64), (48, 64))   # square for the quick GAN, 4:3 like listing thumbnails
TOY_CITIES = ("Pinecrest", "Sunvale", "Harborview", "Brickton")


@dataclass
class DemoResult:
    ingest: IngestSummary
    clusters: ClusterSummary
    run_dir: Path              # the trained run
    metrics: dict              # what `evaluate` wrote
    report: Path               # the self-contained HTML report
    serve_command: str         # the command that serves the run

    def describe(self) -> str:
        return "\n\n".join([self.ingest.describe(), self.clusters.describe(), f"trained: {self.run_dir}",
                              describe_metrics(self.metrics), f"report: {self.report}",
                              f"serve it: {self.serve_command}"])


def demo(workspace="neighbourhoods-demo", data=None, labels=None, file_column: str = "file",
         label_column: str = "city", workers: int | None = None, minutes: float = 4.0,
         eval_samples: int = 300, toy_per_city: int = 100, upscaler_steps: int | None = None,
         progress: bool = True) -> DemoResult:
    """ingest -> cluster -> select exteriors -> train (`minutes` on this machine) -> evaluate -> report."""
    ws = Path(workspace)
    say = print if progress else (lambda *a, **k: None)
    toy = data is None
    if toy:
        data, labels = draw_toytown(ws / "toytown", cities=TOY_CITIES, per_city=toy_per_city, seed=0)
    say("== ingest")
    ingested = ingest(data, ws, labels=labels, file_column=file_column, label_column=label_column,
                      res=DEMO_RES, workers=workers, progress=progress)
    say("== cluster")
    # toy town's drawn rooms need 128 px to look like rooms to the network; real photos get the defaults
    clusters = cluster(ws, ClusterConfig(k=4, res=128) if toy else ClusterConfig(), progress=progress)
    select(ws, auto="exteriors")
    say(f"== train ({minutes:g} min)")
    run_dir = train(ws, TrainConfig(res=DEMO_RES[0], run="demo", minutes=minutes, kimg=None,
                                    min_city_photos=20 if toy else 50, progress=progress))
    say("== upscaler (the workspace's own x2 ESPCN, which generate and serve use)")
    ensure_sr(ws, progress=progress, steps=upscaler_steps)
    say("== evaluate")
    metrics = evaluate(ws, run_dir.name, EvaluateConfig(n=eval_samples), progress=progress)
    report = write_report(ws, run_dir.name)
    return DemoResult(ingested, clusters, run_dir, metrics, report, serve_command(ws, run_dir.name))
