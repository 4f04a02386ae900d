"""Benchmark: does more compute buy more photo? The website recipe over a long run, scored as served.

    python3 bench/curve.py --workspace WS --minutes 120                 # 2 hours; run it again to resume
    python3 bench/curve.py --workspace WS --minutes 120 --sitting 55    # at most 55 minutes of it now
    python3 bench/curve.py --workspace WS --score-only                  # score what is kept, train nothing

On ../shared/data/socal, in a workspace prepared as bench/quality.py prepares it (the same fixed
15% holdout):
1. train (or resume) the run `curve-<HxW>[-tag]` with the default recipe until --minutes of
   training in total (the run's own clock, state.time_s: a run split over sittings trains the
   same total as one), keeping a checkpoint every --every-kimg thousand images, none pruned, and
   the fixed-seed grid at each (samples/progress-*.png: the same seeds at every point);
2. score every kept checkpoint at the served size through the one scoring function
   (scoring.score_run with snapshot=<images>, --samples samples against the held-out photos;
   `neighbourhoods evaluate --snapshot <images> --size WxH` reproduces each), skipping points
   already scored;
3. write JSON (per point: images, training minutes, KID, precision, recall, within-city
   diversity and near-duplicates, the training curve's KID) and an SVG figure of KID and recall
   against images and against training minutes (--out, default bench/results/curve-<HxW>.json /
   .svg). The run's report shows the same curve.
Sittings: a session that ends mid-training loses nothing saved (resume is exact); the training
part stops itself after --sitting minutes so the scoring part can follow in the same sitting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from quality import prepare_workspace

from neighbourhoods import scoring
from neighbourhoods.core.resolution import ThumbSize, parse_res, res_name
from neighbourhoods.core.workspace import atomic_write_json, atomic_write_text
from neighbourhoods.models import runs
from neighbourhoods.report import read_metrics_log, svg_chart
from neighbourhoods.scoring import ScoringConfig
from neighbourhoods.train import TrainConfig, train


def trained_minutes(run_dir: Path) -> float:
    """Training minutes (steps only) of the run's latest checkpoint: 0 for a run not started."""
    if not (run_dir / "checkpoints" / "latest.json").is_file():
        return 0.0
    _, state = runs.load_checkpoint(runs.latest_checkpoint(run_dir)[0])
    return float(state["time_s"]) / 60


def kept_points(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit() and int(p.name) > 0)


def curve(run_dir: Path, size: tuple[int, int]) -> list[dict]:
    """One row per scored checkpoint: its served-size figures, training minutes and training-curve KID."""
    log = read_metrics_log(run_dir)
    minutes = {r["images_seen"]: r.get("time_s", 0.0) / 60 for r in log}
    train_kid = {r["images_seen"]: r["kid_train"] for r in log if r.get("kid_train") is not None}
    rows = []
    for images in kept_points(run_dir):
        path = runs.eval_dir(run_dir, images) / scoring.metrics_file(size)
        if not path.is_file():
            continue
        q = json.loads(path.read_text())["quality"]
        near = min(minutes, key=lambda k: abs(k - images)) if minutes else None
        rows.append({"images_seen": images, "minutes": minutes.get(near), "kid": q["kid"]["mean"],
                     "kid_std": q["kid"]["std"], "precision": q["precision"], "recall": q["recall"],
                     "within_city_diversity": q.get("within_city_diversity"),
                     "near_duplicates": q.get("near_duplicates"), "kid_train": train_kid.get(images)})
    return rows


def figure(rows: list[dict], title: str) -> str:
    x_img = [r["images_seen"] / 1000 for r in rows]
    x_min = [r["minutes"] or 0.0 for r in rows]
    kid = {"label": "KID x1e-3", "y": [r["kid"] * 1000 for r in rows], "err": [r["kid_std"] * 1000 for r in rows]}
    rec = {"label": "recall", "y": [r["recall"] for r in rows]}
    pre = {"label": "precision", "y": [r["precision"] for r in rows]}
    charts = [svg_chart([{**kid, "x": x_img}], "thousands of images shown", "KID x 1e-3 (served)"),
              svg_chart([{**rec, "x": x_img}, {**pre, "x": x_img}], "thousands of images shown", "recall, precision"),
              svg_chart([{**kid, "x": x_min}], "training minutes", "KID x 1e-3 (served)"),
              svg_chart([{**rec, "x": x_min}, {**pre, "x": x_min}], "training minutes", "recall, precision")]
    # four charts stacked in one SVG document
    body = "".join(f'<g transform="translate(0,{i * 270})">{c}</g>' for i, c in enumerate(charts))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="640" height="{len(charts) * 270 + 24}">'
            f'<text x="8" y="{len(charts) * 270 + 16}" font-size="12">{title}</text>{body}</svg>')


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.environ.get("NEIGHBOURHOODS_SHARED_DATA", str(REPO.parent / "shared" / "data"))
                   + "/socal", help="the socal folder (images/ + listings.csv)")
    p.add_argument("--workspace", required=True, help="workspace folder (ingested here if it is not yet)")
    p.add_argument("--res", default="96x128", help="training resolution HxW (default: the website's 96x128)")
    p.add_argument("--served", default="256x192", help="the served thumbnail size WxH every point is scored at")
    p.add_argument("--minutes", type=float, default=120.0, help="training minutes in total over all sittings")
    p.add_argument("--sitting", type=float, default=None, help="train at most this many minutes in this call")
    p.add_argument("--every-kimg", type=float, default=16.0, help="a kept checkpoint (a point) every N kimg")
    p.add_argument("--samples", type=int, default=1000, help="samples scored per point (evaluate's --n)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--tag", default="", help="suffix of the run's name")
    p.add_argument("--train-option", action="append", default=[], metavar="FIELD=JSON",
                   help="a TrainConfig field, e.g. lr_g=5e-4 (repeatable)")
    p.add_argument("--score-only", action="store_true", help="train nothing; score the kept checkpoints")
    p.add_argument("--out", default=None, help="JSON file (default bench/results/curve-<HxW>[-tag].json)")
    args = p.parse_args(argv)

    res = parse_res(args.res)
    size = tuple(ThumbSize.parse(args.served))
    name = f"curve-{res_name(res)}" + (f"-{args.tag}" if args.tag else "")
    ws = prepare_workspace(Path(args.data), Path(args.workspace), res)
    run_dir = ws.run_dir(name)
    extra = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.train_option)}
    load = os.getloadavg()[0]

    done = trained_minutes(run_dir)
    if not args.score_only and done < args.minutes - 0.1:
        now = args.minutes - done if args.sitting is None else min(args.sitting, args.minutes - done)
        print(f"training {name}: {done:.1f} of {args.minutes:g} minutes done, {now:.1f} now (load {load:.2f})",
              flush=True)
        every = int(args.every_kimg * 1000)
        train(ws, TrainConfig(res=res, run=name, resume=run_dir.joinpath("config.json").is_file(), kimg=None,
                              minutes=now, seed=args.seed, snapshot_every=every, sample_every=every,
                              keep_checkpoints=1_000_000, **extra))
    for images in kept_points(run_dir):
        if (runs.eval_dir(run_dir, images) / scoring.metrics_file(size)).is_file():
            continue
        t = time.time()
        scoring.score_run(ws, run_dir, ScoringConfig(n=args.samples, size=size, novelty_spaces=()),
                          snapshot=str(images))
        print(f"scored {images:,} images at {size[0]}x{size[1]} in {time.time() - t:.0f} s", flush=True)

    rows = curve(run_dir, size)
    best = runs.best_snapshot(run_dir)
    result = {"run": str(run_dir), "res": list(res), "served": list(size), "samples": args.samples,
              "minutes_trained": trained_minutes(run_dir), "best_snapshot": best and best["images_seen"],
              "points": rows, "load_average_at_start": load, "machine": platform.processor() or platform.machine(),
              "evaluate_command": f"neighbourhoods evaluate -w {args.workspace} --run {name} --n {args.samples} "
                                  f"--size {size[0]}x{size[1]} --snapshot IMAGES"}
    out = Path(args.out or REPO / "bench" / "results" / f"{name}.json")
    atomic_write_json(out, result)
    if rows:
        atomic_write_text(out.with_suffix(".svg"), figure(rows, f"{name}: served {size[0]}x{size[1]}, "
                                                                f"{args.samples} samples per point"))
    for r in rows:
        print(f"  {r['images_seen']:>8,} images {r['minutes'] or 0:6.1f} min  KID {r['kid']:.4f} +- {r['kid_std']:.4f}"
              f"  P {r['precision']:.2f} R {r['recall']:.3f}  near-dup {r['near_duplicates']}")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
