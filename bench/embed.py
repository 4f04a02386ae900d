"""Benchmark: embedding throughput for `cluster` at each offered resolution, and what it costs in accuracy.

    python bench/embed.py                                   # ../shared/data/houses, res 224 160 128
    python bench/embed.py --res 224 128 --out /tmp/embed.json

For each resolution, into one workspace ingested once:
  1. a full embedding run from an empty store (decode from the original files, EXIF, crop, resize,
     network, chunked writes): photos/s by the wall clock and CPU-seconds per photo;
  2. the same network on an in-memory batch (model-only photos/s) and the decode alone, to show
     where the time goes;
  3. `cluster` (k=4) + `select --auto exteriors`, and on the houses data the houses with exactly
     one selected photo (each house has exactly one exterior), plus the adjusted Rand index of
     the clusters against those at the first resolution.
Decode of large listing photos (2048x1536 JPEGs, generated) is timed too: draft-mode decoding
is what keeps big originals cheap. Projections for 217,000 photos use both the measured wall
rate and CPU time / 2 cores (what 2 dedicated cores would give; the wall rate on a shared
machine is lower, and the load average is recorded beside it).
Writes JSON to --out (default bench/results/embed.json) and prints it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from neighbourhoods.cluster import ClusterConfig, cluster  # noqa: E402
from neighbourhoods.cluster.embed import efficientnet_lite0_extractor, embed_photos, embeddings_dir, load_photo  # noqa: E402
from neighbourhoods.core import catalog  # noqa: E402
from neighbourhoods.core.workspace import atomic_write_json, open_workspace  # noqa: E402
from neighbourhoods.ingest import ingest  # noqa: E402
from neighbourhoods.select import select  # noqa: E402

TARGET_PHOTOS = 217_000


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (decode workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def houses_accuracy(ws) -> dict | None:
    """Houses with exactly 0 / 1 / 2+ selected photos, where file names are <house>_<n>.jpg.

    A byte-identical duplicate counts as selected when the kept photo it duplicates is.
    """
    con = catalog.connect(ws.catalog_path)
    try:
        rows = con.execute("SELECT id, path, status, selected, duplicate_of FROM photos").fetchall()
    finally:
        con.close()
    names = [Path(r["path"]).stem.split("_") for r in rows]
    if not rows or not all(len(n) == 2 and n[0].isdigit() for n in names):
        return None
    selected = {r["id"]: bool(r["selected"]) and r["status"] == "kept" for r in rows}
    per_house: dict[str, int] = collections.Counter()
    for r, (house, _) in zip(rows, names):
        per_house[house] += selected[r["id"]] or bool(r["duplicate_of"] and selected.get(r["duplicate_of"]))
    dist = collections.Counter(per_house.values())
    houses = len(per_house)
    return {"houses": houses, "exactly_one": dist[1], "exactly_one_share": dist[1] / houses,
            "none": dist[0], "two_or_more": sum(v for n, v in dist.items() if n >= 2),
            "mistakes": sorted((h for h, n in per_house.items() if n != 1), key=int)}


def model_only(res: int, batch: int = 32, repeats: int = 3) -> dict:
    extractor = efficientnet_lite0_extractor()
    x = torch.rand(batch, 3, res, res)
    extractor.embed(x)  # warm-up
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(repeats):
        extractor.embed(x)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    n = batch * repeats
    return {"photos_per_s": n / wall, "cpu_ms_per_photo": 1000 * cpu / n}


def decode_only(paths: list[str], res: int) -> dict:
    wall, cpu = time.perf_counter(), cpu_seconds()
    for p in paths:
        load_photo(p, res)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {"photos": len(paths), "photos_per_s": len(paths) / wall, "cpu_ms_per_photo": 1000 * cpu / len(paths)}


def large_photos(folder: Path, n: int) -> list[str]:
    """n photo-like 2048x1536 JPEGs (smooth structure + noise, ~0.5-1 MB each) to time big-original decodes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((2048, 1536), Image.BICUBIC), np.float32)
        img += rng.normal(0, 6, img.shape)
        path = folder / f"large_{i:03d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default=str(REPO.parent / "shared" / "data" / "houses" / "images"))
    ap.add_argument("--res", type=int, nargs="+", default=[224, 160, 128])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--large", type=int, default=40, help="generated 2048x1536 JPEGs to time decoding (0: skip)")
    ap.add_argument("--workdir", help="scratch folder (default: a temporary one, removed after)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "embed.json"))
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-embed-"))
    ws_path = work / "ws"
    result = {"photos_dir": args.photos, "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                                      "python": platform.python_version(), "torch": torch.__version__},
              "target_photos": TARGET_PHOTOS, "resolutions": []}
    try:
        summary = ingest(args.photos, ws_path, progress=False)
        ws = open_workspace(ws_path)
        result["kept_photos"] = summary.kept
        paths = sorted(str(p) for p in Path(args.photos).iterdir())[:200]
        big = large_photos(work / "large", args.large) if args.large else []
        first_labels = None
        for res in args.res:
            shutil.rmtree(embeddings_dir(ws, "efficientnet_lite0", res), ignore_errors=True)
            load_before = os.getloadavg()[0]
            wall, cpu = time.perf_counter(), cpu_seconds()
            emb = embed_photos(ws, res=res, progress=False)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            load_after = os.getloadavg()[0]
            clustered = cluster(ws_path, ClusterConfig(k=args.k, res=res), progress=False)
            picked = select(ws_path, auto="exteriors") if any(c.suggestion == "exteriors" for c in clustered.clusters) else None
            labels = _catalog_clusters(ws)
            if first_labels is None:
                first_labels = labels
            from sklearn.metrics import adjusted_rand_score
            cpu_per_photo = cpu / emb.embedded
            entry = {
                "res": res,
                "embedded": emb.embedded,
                "photos_per_s_wall": emb.embedded / wall,
                "cpu_ms_per_photo": 1000 * cpu_per_photo,
                "photos_per_s_2_dedicated_cores": 2 / cpu_per_photo,
                "load_average_1min": [load_before, load_after],
                "projected_hours_217k_wall": TARGET_PHOTOS / (emb.embedded / wall) / 3600,
                "projected_hours_217k_2_dedicated_cores": TARGET_PHOTOS * cpu_per_photo / 2 / 3600,
                "model_only": model_only(res),
                "decode_only": decode_only(paths, res),
                "decode_only_2048x1536": decode_only(big, res) if big else None,
                "clusters": [{"cluster": c.cluster, "photos": c.photos, "suggestion": c.suggestion,
                              "exterior": round(c.scores["exterior"], 3), "interior": round(c.scores["interior"], 3),
                              "top": c.top_classes[:3]} for c in clustered.clusters],
                "selected": picked.selected if picked else 0,
                "houses": houses_accuracy(ws),
                "adjusted_rand_vs_first_res": adjusted_rand_score(
                    [first_labels[i] for i in sorted(first_labels)], [labels[i] for i in sorted(first_labels)]),
            }
            result["resolutions"].append(entry)
            print(json.dumps(entry), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


def _catalog_clusters(ws) -> dict[int, int]:
    con = catalog.connect(ws.catalog_path)
    try:
        return {int(r["id"]): int(r["cluster"]) for r in con.execute("SELECT id, cluster FROM photos WHERE status = 'kept'")}
    finally:
        con.close()


if __name__ == "__main__":
    main()
