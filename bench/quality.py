"""Benchmark: sample quality per unit of compute, the default model against the DCGAN baseline.

    python bench/quality.py                                   # 20 CPU-minutes per model, 64x64
    python bench/quality.py --minutes 3 --samples 500         # a quick look
    python bench/quality.py --res 96x128 --minutes 8 --device cuda
    python bench/quality.py --seed 1 --workspace WS --out bench/results/quality-seed1.json   # another seed
    python bench/quality.py --models projected --tag tc --train-option cond_full_kimg=20   # an option A/B
    python bench/quality.py --models projected --kimg 15.456 --tag ab   # an A/B at equal images
    python bench/quality.py --models projected --res 64x64,96x128 --served 128x96 --minutes 30   # the website's size
    python bench/quality.py --models projected --res 96x128 --served 128x96 --minutes 30 --grow 12   # grown by an octave

On ../shared/data/socal (real SoCal listing exteriors with their cities):
1. ingest into a fresh workspace (or --workspace, reused if already ingested) with a fixed
   15% holdout per city (cities with at least 20 photos; the split is a hash of each photo's
   bytes, so it is the same on every machine);
2. train each model (--models, default dcgan then projected) for the same wall-clock budget
   through `neighbourhoods.train.train`, each with its own recipe (loss, lr, augmentation);
3. score each run by the project's one protocol, `neighbourhoods.scoring.score_run` (the
   function `neighbourhoods evaluate` is): --samples images from its EMA generator, cities in the
   held-out split's proportions (largest remainder; a held-out city without its own class is
   drawn from "(any city)" through the run's city map), sample i at seed i; FID, KID (mean and
   std over 100 subsets), precision/recall (k=3) against the held-out photos in the standard FID
   Inception space; per-city KID and within-city diversity (cities with their own class and at
   least 25 held-out photos); the real-vs-real floor; novelty in the Inception and EfficientNet
   spaces. Its metrics.json goes into the run's eval folder (the report shows it), and the
   summary prints the `neighbourhoods evaluate ...` command that reproduces every figure;
   with --served WxH, the same samples are also scored as thumbnails (score_run at that size:
   generate's and serve's path, the workspace's upscaler, crop to fill, JPEG, against the
   held-out photos read from their files and cropped to that size; novelty is the samples',
   so not computed twice), reproduced by the same command with --size WxH;
   with several --res, every model trains at each (same budget each) and all meet at that size;
   with --grow M, each run first trains M minutes of its budget at half the resolution and is
   then grown by an octave (train --grow-from) for the rest: one budget, counted over both;
4. write a grid (rows: the largest cities, columns: fixed seeds) per model beside its run, and
   JSON to --out (default bench/results/quality.json), and print a summary.
Each model is scored in a child process (on all threads) before the next one trains; with
--overlap-scoring the next model trains meanwhile, and the scorer keeps to one thread (scoring
2,000 images through Inception and the two EfficientNet spaces then takes well over 10 minutes on
a CPU). Not the default: on a 2-core
machine a 2-thread trainer beside the scorer fell from ~25 to 3.2 img/s at 96x128 (its threads
spin-wait for the core the scorer holds), which took a third of its budget from the later model.

Runs, grids and the workspace stay outside the repository (default: a new folder under /tmp).
Wall-clock budgets on a shared machine depend on its load: compare models from one invocation.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from neighbourhoods import scoring  # noqa: E402
from neighbourhoods.core.grid import save_grid  # noqa: E402
from neighbourhoods.core.prepared import load_split  # noqa: E402
from neighbourhoods.core.resolution import ThumbSize, parse_res, res_name  # noqa: E402
from neighbourhoods.core.workspace import Workspace, atomic_write_json  # noqa: E402
from neighbourhoods.ingest import ingest  # noqa: E402
from neighbourhoods.models import runs  # noqa: E402
from neighbourhoods.scoring import ScoringConfig, served_thumbnails  # noqa: E402
from neighbourhoods.train import TrainConfig, train  # noqa: E402
from neighbourhoods.upscale import ensure_sr  # noqa: E402

HOLDOUT = 0.15
GRID_CITIES = 8
GRID_SEEDS = 8


def prepare_workspace(data: Path, ws_root: Path, res: tuple[int, int]) -> Workspace:
    """Ingest the SoCal photos with the benchmark's fixed split, unless already done at `res`."""
    ws = Workspace(ws_root)
    if not (ws.prepared_dir(res) / "images.npy").is_file():
        ingest(data / "images", ws_root, labels=str(data / "listings.csv"), res=[res],
               holdout=HOLDOUT, progress=True)
    return ws


def evaluate_command(ws_root: Path, run_dir: Path, config: ScoringConfig) -> str:
    """The `neighbourhoods evaluate` command that scores `run_dir` by `config`: the same figures."""
    default = ScoringConfig()
    parts = ["neighbourhoods evaluate", "-w", shlex.quote(str(ws_root)), "--run", shlex.quote(run_dir.name),
             "--n", str(config.n)]
    if config.seed != default.seed:
        parts += ["--seed", str(config.seed)]
    if config.min_city_holdout != default.min_city_holdout:
        parts += ["--min-city-holdout", str(config.min_city_holdout)]
    if config.device != default.device:
        parts += ["--device", shlex.quote(config.device)]
    if config.size is not None:
        parts += ["--size", f"{config.size[0]}x{config.size[1]}"]
    if config.upscale is not None:
        parts += ["--upscale", shlex.quote(config.upscale)]
    if not config.gated:
        parts += ["--no-gate"]
    elif config.realism_quantile != default.realism_quantile:
        parts += ["--realism-quantile", str(config.realism_quantile)]
    return " ".join(parts)


def summary(result: dict, ws_root: Path, run_dir: Path, config: ScoringConfig) -> dict:
    """The bench's figures of one score_run result (flat, as earlier results had them)."""
    q = result["quality"]
    return {"fid": q["fid"], "kid_mean": q["kid"]["mean"], "kid_std": q["kid"]["std"], "precision": q["precision"],
            "recall": q["recall"], "within_city_diversity": q["within_city_diversity"],
            "near_duplicates": q.get("near_duplicates"), "snapshot": result.get("snapshot"),
            "images_seen": result.get("images_seen"),
            "per_city": [{"city": c["city"], "holdout": c["holdout"], "generated": c["generated"],
                          "kid_mean": c["kid"]["mean"], "kid_std": c["kid"]["std"], "diversity": c["diversity"],
                          "near_duplicates": c.get("near_duplicates")}
                         for c in result["per_city"]],
            "real_vs_real_floor": result["real_vs_real_floor"], "scored_at": result["scored_at"],
            "gated": result.get("gated"),
            "metrics": result.get("path"), "evaluate_command": evaluate_command(ws_root, run_dir, config)}


def score_run(ws_root: Path, run_dir: Path, top_cities: list[str], grid_path: Path,
                       config: ScoringConfig, served: tuple[int, int] | None = None) -> dict:
    """Score the run by the one protocol (scoring.score_run with `config`; at `served` (W, H)
    too) and draw a grid of its largest cities; `neighbourhoods evaluate` with the returned
    "evaluate_command" reproduces every figure."""
    ws = Workspace(ws_root)
    t0 = time.time()
    result = scoring.score_run(ws, run_dir, config)
    gen = runs.load_generator(run_dir, device=config.device)
    rows = [c for c in top_cities if c in gen.class_names][:GRID_CITIES]
    grid_classes = [gen.class_names.index(c) for c in rows for _ in range(GRID_SEEDS)]
    grid = runs.sample(gen, grid_classes, list(range(GRID_SEEDS)) * len(rows))
    save_grid(grid_path, grid, GRID_SEEDS, row_names=rows)
    at_size = None
    if served is not None:
        # the same samples as thumbnails; their novelty is the samples' (above), not computed again
        # and the set as generate and serve give it (guard, realism gate, distinct listings) beside it
        served_config = replace(config, size=tuple(served), novelty_spaces=(), gated=True)
        served_result = scoring.score_run(ws, run_dir, served_config)
        size = tuple(served)
        grid_thumbs, upscale = served_thumbnails(ws, gen.res, grid, (256, 192) if size[0] * 3 == size[1] * 4 else size,
                                                 progress=False)
        thumb_grid = grid_path.with_name(grid_path.stem + "-thumbnails.png")
        save_grid(thumb_grid, grid_thumbs, GRID_SEEDS, row_names=rows)
        grid_size = (256, 192) if size[0] * 3 == size[1] * 4 else size
        at_size = {"size": f"{size[0]}x{size[1]}", "upscale": upscale, "grid": str(thumb_grid),
                   "grid_same_house": grid_same_house(ws, gen.res, rows, grid_thumbs, grid_size),
                   **summary(served_result, ws_root, run_dir, served_config)}
    return {"served": at_size, "novelty": result["novelty"], **summary(result, ws_root, run_dir, config),
            "samples": config.n, "scoring_s": time.time() - t0, "images_seen": result["images_seen"],
            "grid": str(grid_path), "classes": len(gen.class_names)}


def grid_same_house(ws: Workspace, res: tuple[int, int], cities: list[str], thumbs: np.ndarray,
                    size: tuple[int, int]) -> dict[str, list[list[int]]]:
    """For each grid row (a city, GRID_SEEDS seeds as served at `size`): the pairs of seeds that
    are one house, i.e. more alike in the Inception space than the 99th percentile of the city's
    held-out photo pairs (scoring's near-duplicate rule). The issue's check: no such pair."""
    from neighbourhoods.core.prepared import load_label_names
    from neighbourhoods.metrics import scores
    from neighbourhoods.metrics.features import load_space

    space = load_space("inception")
    feats = space.extract(thumbs, progress=False)
    holdout, names = load_split(ws, res, "holdout"), load_label_names(ws)
    out = {}
    for row, city in enumerate(cities):
        ids = holdout.photo_ids[holdout.labels == names.index(city)] if city in names else []
        if len(ids) < 2:
            continue
        threshold = scores.near_duplicate_threshold(scoring.served_real_features(ws, ids, size, space, progress=False))
        f = feats[row * GRID_SEEDS:(row + 1) * GRID_SEEDS]
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        sims = f @ f.T
        out[city] = [[i, j] for i in range(GRID_SEEDS) for j in range(i + 1, GRID_SEEDS) if sims[i, j] > threshold]
    return out


def train_seconds(run_dir: Path, t0: float) -> float:
    """Training time of a run, from its metrics.jsonl (else the wall clock since t0)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return lines[-1]["time_s"] if lines and "time_s" in lines[-1] else time.time() - t0


def _score_to_file(out: Path, threads: int, *args) -> None:
    """score_run in a child process (so scoring one model can overlap training the next),
    on `threads` threads: one beside a training run, else the machine's."""
    torch.set_num_threads(threads)
    atomic_write_json(out, score_run(*args))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "socal",
                   help="the socal folder (images/ + listings.csv)")
    p.add_argument("--workspace", type=Path, default=None, help="workspace folder (default: a new one under /tmp)")
    p.add_argument("--res", type=lambda t: [parse_res(r) for r in t.split(",")], default=[(64, 64)],
                   help="training resolution(s) HxW, comma-separated: each model trains at each")
    p.add_argument("--served", type=ThumbSize.parse, default=None, metavar="WxH",
                   help="also score every run's thumbnails at this size (e.g. 128x96), against the held-out photos "
                        "at that size")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget per model")
    p.add_argument("--kimg", type=float, default=None,
                   help="train each model to this many thousand images instead (an A/B at equal images on a "
                        "machine whose speed drifts; not with --grow)")
    p.add_argument("--models", default="dcgan,projected", help="comma-separated registered model names")
    p.add_argument("--batch", type=int, default=None, help="batch size for every model (default: each model's recipe, else train's default)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every model (weights, data order, noise)")
    p.add_argument("--samples", type=int, default=2000, help="generated images scored per model (evaluate's --n)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json")
    p.add_argument("--train-option", action="append", default=[], metavar="FIELD=JSON",
                   help="a TrainConfig field for every model, e.g. cond_full_kimg=20 (repeatable)")
    p.add_argument("--grow", type=float, default=None, metavar="MINUTES",
                   help="train this many minutes of each budget at half the resolution, then grow the run by an "
                        "octave for the rest")
    p.add_argument("--grow-native", action="store_true",
                   help="with --grow: lay the half-size run out as the lower levels of the native G "
                        "(g_grow_octaves 1), so the grown G has the native layout; default: grow the default "
                        "half-size G (slimmer)")
    p.add_argument("--tag", default="", help="suffix of the run names, to compare options in one workspace")
    p.add_argument("--overlap-scoring", action="store_true",
                   help="train the next model while the last one is scored (many cores only: see above)")
    args = p.parse_args(argv)
    if not (args.data / "listings.csv").is_file():
        raise SystemExit(f"{args.data} has no listings.csv: pass --data .../shared/data/socal")

    if args.grow is not None and not 0 < args.grow < args.minutes:
        raise SystemExit("--grow must be between 0 and --minutes")
    if args.kimg is not None and (args.kimg <= 0 or args.grow is not None):
        raise SystemExit("--kimg must be positive, and not with --grow")
    ws_root = args.workspace or Path(tempfile.mkdtemp(prefix="neighbourhoods-quality-"))
    for res in args.res:
        ws = prepare_workspace(args.data, ws_root, res)
        if args.grow is not None:
            prepare_workspace(args.data, ws_root, (res[0] // 2, res[1] // 2))
    first = args.res[0]
    holdout = load_split(ws, first, "holdout")
    train_split = load_split(ws, first, "train")
    counts = np.bincount(train_split.labels[train_split.labels >= 0], minlength=len(train_split.label_names))
    top_cities = [train_split.label_names[i] for i in np.argsort(-counts, kind="stable")]
    print(f"workspace {ws_root}: {len(train_split)} training photos, {len(holdout)} held out", flush=True)

    if args.served is not None:
        ensure_sr(ws_root)        # the website path's upscaler, trained once per workspace before any budget
    protocol = ScoringConfig(n=args.samples, device=args.device)   # evaluate's defaults otherwise

    result = {"data": str(args.data), "workspace": str(ws_root), "res": [list(r) for r in args.res],
              "served": args.served.name if args.served else None,
              "minutes_per_model": None if args.kimg else args.minutes, "kimg_per_model": args.kimg,
              "train_photos": len(train_split), "holdout_photos": len(holdout),
              "holdout_fraction": HOLDOUT, "samples_per_model": args.samples, "seed": args.seed, "torch": torch.__version__,
              "grow_minutes": args.grow, "grow_native": args.grow_native, "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "device": args.device, "load_average_start": os.getloadavg(), "models": {},
              "overlap_scoring": args.overlap_scoring,
              "note": "each model is scored in a child process" + (
                  " while the next model trains (this slows the later models' training)" if args.overlap_scoring
                  else " before the next model trains")}
    options = {}
    for item in args.train_option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    result["train_options"] = options
    ctx = mp.get_context("spawn")
    scorers = []
    for res, model in [(r, m) for r in args.res for m in args.models.split(",")]:
        key = model if len(args.res) == 1 else f"{model}-{res_name(res)}"
        grow = "" if args.grow is None else f"-grow{args.grow:g}" + ("n" if args.grow_native else "")
        run_name = (f"quality-{model}-{res_name(res)}" + (f"-seed{args.seed}" if args.seed else "") + grow
                    + (f"-{args.tag}" if args.tag else ""))
        config = TrainConfig(model=model, res=res, run=run_name, seed=args.seed,
                             kimg=args.kimg, minutes=None if args.kimg else args.minutes, device=args.device,
                             # None: each model's recipe batch (the default model 32, dcgan 64 like
                             # pytorch's DCGAN example); --batch overrides for all
                             batch=args.batch, **options)
        t0 = time.time()
        grown_from = None
        if args.grow is not None:   # the first minutes at half the size, then one octave up
            half_kwargs = {**config.model_kwargs, **({"g_grow_octaves": 1} if args.grow_native else {})}
            grown_from = train(ws, replace(config, res=(res[0] // 2, res[1] // 2), run=run_name + "-half",
                                           minutes=args.grow, model_kwargs=half_kwargs))
            config = replace(config, grow_from=grown_from.name, minutes=args.minutes - args.grow)
        run_dir = train(ws, config)
        train_s = train_seconds(run_dir, t0)
        progress = sorted(str(p) for p in (run_dir / "samples").glob("progress-*.png"))
        images_seen = runs.latest_checkpoint(run_dir)[1]
        result["models"][key] = {
            "run": str(run_dir), "train_s": train_s, "train_wall_s": time.time() - t0,
            "images_seen": images_seen, "images_per_s": images_seen / max(train_s, 1e-9),
            "batch": json.loads((run_dir / "config.json").read_text())["batch"], "progress_grid": progress[-1] if progress else None,
            "load_average_after_training": os.getloadavg()}
        if grown_from is not None:
            half_s, half_images = train_seconds(grown_from, t0), runs.latest_checkpoint(grown_from)[1]
            result["models"][key]["grown_from"] = {"run": str(grown_from), "train_s": half_s, "images_seen": half_images,
                                                   "images_per_s": half_images / max(half_s, 1e-9)}
            result["models"][key]["train_s_both"] = half_s + train_s
        print(f"{model}: {images_seen} images in {train_s:.0f} s ({images_seen / max(train_s, 1e-9):.1f} img/s)",
              flush=True)
        out = run_dir / "bench-score.json"
        out.unlink(missing_ok=True)
        threads = 1 if args.overlap_scoring else torch.get_num_threads()
        result["models"][key]["scoring_threads"] = threads
        grid = run_dir / "samples" / f"bench-{model}.png"
        proc = ctx.Process(target=_score_to_file, args=(out, threads, ws_root, run_dir, top_cities, grid, protocol,
                                                        tuple(args.served) if args.served else None))
        proc.start()
        if not args.overlap_scoring:
            proc.join()   # the next model's budget must not be shared with this scorer
        scorers.append((key, proc, out))

    for model, proc, out in scorers:
        proc.join()
        if proc.exitcode != 0 or not out.is_file():
            raise SystemExit(f"scoring {model} failed (exit code {proc.exitcode})")
        scores = json.loads(out.read_text())
        result["models"][model].update(scores)
        memorised = ", ".join(f"{s} {v['memorisation_rate'] * 100:.1f}%" for s, v in scores["novelty"].items()
                              if isinstance(v, dict))
        print(f"{model}: FID {scores['fid']:.2f}, KID {scores['kid_mean']:.4f} +- {scores['kid_std']:.4f}, "
              f"precision {scores['precision']:.3f}, recall {scores['recall']:.3f}, within-city diversity "
              f"{scores['within_city_diversity'] or 0:.2f}, memorised {memorised}; grid {scores['grid']}", flush=True)
        for c in scores["per_city"]:
            print(f"  {c['city']}: KID {c['kid_mean']:.4f} +- {c['kid_std']:.4f}, diversity {c['diversity']:.2f} "
                  f"({c['generated']} samples, {c['holdout']} held out)", flush=True)
        if scores["served"]:
            sv = scores["served"]
            print(f"{model} as {sv['size']} thumbnails ({sv['upscale']}): KID {sv['kid_mean']:.4f} +- {sv['kid_std']:.4f}, "
                  f"precision {sv['precision']:.3f}, recall {sv['recall']:.3f}, within-city diversity "
                  f"{sv['within_city_diversity'] or 0:.2f}; grid {sv['grid']}", flush=True)
        print(f"  reproduce: {scores['evaluate_command']}", flush=True)
        if scores["served"]:
            print(f"  reproduce as served: {scores['served']['evaluate_command']}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, result)   # after each model, so a late failure keeps the first

    if "dcgan" in result["models"]:
        base = result["models"]["dcgan"]["kid_mean"]
        for name, r in result["models"].items():
            if name != "dcgan":
                r["kid_ratio_dcgan_over_this"] = base / r["kid_mean"] if r["kid_mean"] > 0 else float("inf")
    atomic_write_json(args.out, result)
    print(json.dumps({m: {k: r[k] for k in ("images_per_s", "images_seen", "kid_mean", "kid_std", "precision", "recall",
                                            "within_city_diversity", "grid")}
                      for m, r in result["models"].items()}, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
