"""Benchmark: ingest throughput (images/s) beside a bare single-process PIL loop, same run.

    python bench/ingest.py                       # houses + 2,000 generated 2048x1536 JPEGs
    python bench/ingest.py --large 200 --out /tmp/ingest.json

For each collection it times (1) a bare loop: Image.open + load + convert('RGB') over every file,
one process, no hashing, no resizing, no catalog; (2) a full `ingest` into a fresh workspace
(discovery, sha256, perceptual hash, checks, resize to --res, catalog commits, final arrays).
Files are read once before timing so both measure decoding from the page cache, not the disk.
Writes JSON to --out (default bench/results/ingest.json) and prints it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from neighbourhoods.core.resolution import parse_res, res_name  # noqa: E402
from neighbourhoods.ingest import ingest  # noqa: E402

LARGE_SIZE = (2048, 1536)


def _large_photo(i: int) -> Image.Image:
    """Photo-like content: smooth random structure, gradients and sensor noise (not flat fills,
    not pure noise, so JPEG sizes and decode costs are those of real photos, ~0.5-1 MB)."""
    rng = np.random.default_rng(i)
    w, h = LARGE_SIZE
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(coarse, np.int16) * 3 // 4
    arr += _gradient()
    arr += rng.integers(-7, 8, (h, w, 3), dtype=np.int16)   # sensor noise
    for _ in range(12):  # hard edges, like windows and roof lines
        x0, y0 = int(rng.integers(0, w - 200)), int(rng.integers(0, h - 200))
        arr[y0:y0 + int(rng.integers(20, 200)), x0:x0 + int(rng.integers(20, 200))] = rng.integers(0, 255, 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


_GRADIENT: list[np.ndarray] = []


def _gradient() -> np.ndarray:
    if not _GRADIENT:
        w, h = LARGE_SIZE
        y, x = np.mgrid[0:h, 0:w]
        _GRADIENT.append(((x * 60 // w) + (y * 40 // h)).astype(np.int16)[..., None])
    return _GRADIENT[0]


def _write_large(args: tuple[int, str]) -> None:
    i, folder = args
    path = Path(folder) / f"large_{i:05d}.jpg"
    tmp = path.with_suffix(".part")
    _large_photo(i).save(tmp, format="JPEG", quality=90)
    os.replace(tmp, path)


def large_collection(folder: Path, n: int, workers: int) -> Path:
    """n generated 2048x1536 JPEGs in `folder`, made once and reused by later runs."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [(i, str(folder)) for i in range(n) if not (folder / f"large_{i:05d}.jpg").is_file()]
    if missing:
        print(f"generating {len(missing)} {LARGE_SIZE[0]}x{LARGE_SIZE[1]} JPEGs in {folder} (once) ...", file=sys.stderr)
        with multiprocessing.Pool(workers) as pool:
            pool.map(_write_large, missing, chunksize=8)
    return folder


def _files(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ingest's worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def bare_loop(files: list[Path]) -> dict:
    """The simplest correct decoder: one process, PIL open + load + convert('RGB')."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    for f in files:
        with Image.open(f) as img:
            img.load()
            img.convert("RGB")
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {"images_per_s": round(len(files) / seconds, 1), "seconds": round(seconds, 2),
            "images_per_cpu_s": round(len(files) / cpu, 1)}


def ingest_run(folder: Path, res, workers: int | None, scratch: Path) -> dict:
    """A full ingest into a fresh workspace: discovery to final arrays."""
    ws = scratch / f"ws-{folder.name}"
    shutil.rmtree(ws, ignore_errors=True)
    start, cpu = time.perf_counter(), _cpu_seconds()
    summary = ingest(folder, ws, res=res, workers=workers, progress=False)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    shutil.rmtree(ws, ignore_errors=True)
    return {"images_per_s": round(summary.files / seconds, 1), "seconds": round(seconds, 2),
            "images_per_cpu_s": round(summary.files / cpu, 1), "kept": summary.kept,
            "duplicates": summary.duplicates, "rejected": summary.rejected}


def warm(files: list[Path]) -> int:
    return sum(len(f.read_bytes()) for f in files)


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def bench_collection(name: str, folder: Path, pattern: str, res, workers, scratch: Path, rounds: int) -> dict:
    """Alternate bare loop and ingest `rounds` times, so a change in the machine's load (it is
    shared) hits both alike; report the median round of each and every round."""
    files = _files(folder, pattern)
    total_bytes = warm(files)
    load_before = load()
    bare, full = [], []
    for _ in range(rounds):
        bare.append(bare_loop(files))
        full.append(ingest_run(folder, res, workers, scratch))
    median = lambda runs: sorted(runs, key=lambda r: r["images_per_s"])[len(runs) // 2]  # noqa: E731
    b, f = median(bare), median(full)
    return {"collection": name, "folder": str(folder), "files": len(files),
            "mean_file_kb": round(total_bytes / max(1, len(files)) / 1024, 1),
            "bare_loop_images_per_s": b["images_per_s"], "ingest_images_per_s": f["images_per_s"],
            "ratio": round(f["images_per_s"] / b["images_per_s"], 2),
            "bare_loop_images_per_cpu_s": b["images_per_cpu_s"], "ingest_images_per_cpu_s": f["images_per_cpu_s"],
            "kept": f["kept"], "duplicates": f["duplicates"], "rejected": f["rejected"],
            "rounds": {"bare_loop": bare, "ingest": full},
            "load_average_before": load_before, "load_average_after": load()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--houses", type=Path, default=REPO.parent / "shared" / "data" / "houses",
                   help="houses collection (its images/ folder is ingested); skipped if absent")
    p.add_argument("--large", type=int, default=2000, help="number of generated 2048x1536 JPEGs")
    p.add_argument("--large-dir", type=Path, default=Path(tempfile.gettempdir()) / "neighbourhoods-bench-large",
                   help="where the generated JPEGs are kept between runs")
    p.add_argument("--res", action="append", type=parse_res, help="ingest resolutions (default 64x64 and 96x128)")
    p.add_argument("--workers", type=int, default=None, help="ingest worker processes (default: CPU count)")
    p.add_argument("--rounds", type=int, default=3, help="alternating bare/ingest rounds per collection (median reported)")
    p.add_argument("--generate-only", action="store_true", help="only make the large JPEGs (for a later run)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json")
    args = p.parse_args()
    res = args.res or [(64, 64), (96, 128)]
    if args.generate_only:
        large_collection(args.large_dir, args.large, os.cpu_count() or 1)
        return 0

    result = {"benchmark": "ingest", "cpus": os.cpu_count(), "workers": args.workers or os.cpu_count(),
              "res": [res_name(r) for r in res], "python": platform.python_version(),
              "pillow": Image.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "collections": []}
    with tempfile.TemporaryDirectory(prefix="neighbourhoods-bench-") as scratch:
        if (args.houses / "images").is_dir():
            result["collections"].append(bench_collection("houses", args.houses / "images", "*.jpg", res,
                                                          args.workers, Path(scratch), args.rounds))
        else:
            print(f"skipping houses: {args.houses / 'images'} not found", file=sys.stderr)
        if args.large > 0:
            folder = large_collection(args.large_dir, args.large, os.cpu_count() or 1)
            files = _files(folder, "large_*.jpg")[: args.large]
            if len(files) < len(_files(folder, "large_*.jpg")):   # a smaller --large: ingest just those
                sub = Path(scratch) / "large-subset"
                sub.mkdir()
                for f in files:
                    os.symlink(f, sub / f.name)
                folder = sub
            result["collections"].append(bench_collection(f"large-{LARGE_SIZE[0]}x{LARGE_SIZE[1]}", folder,
                                                          "large_*.jpg", res, args.workers, Path(scratch), args.rounds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
