"""Benchmark: the whole pipeline at 5k, 20k and 50k photos, and what that says about 217k.

    python bench/scale.py --data ../shared/data/socal                  # N = 5000, 20000, 50000
    python bench/scale.py --data ../shared/data/socal --sizes 2000 --out /tmp/scale.json

For each N it synthesises N distinct photos from the real ones (a random crop of 80-100% of each
side, a mirror flip half the time, small per-channel colour gains, re-encoded as JPEG at a random
quality; three photos per listing, named `<listing>_<n>.jpg`, with a listings table keyed by
listing id), in a temporary folder that is deleted afterwards (nothing derived from the photos is
kept). Then, each stage as its own process (`python -m neighbourhoods ...`), timed alone:

    ingest   --labels listings.csv --key-column listing_id --res 64x64
    cluster  -k 4 (EfficientNet-Lite0 at 224 px: the heaviest step before training)
    select   --auto exteriors
    train    --minutes 2 (fixed time: what grows with N is start-up and the data reads)
    generate --city <largest> -n 16 (its first call indexes every training photo for the guard)
    serve    start-up to the first answer of /healthz, then 20 uncached thumbnails

and records per stage: wall seconds, CPU seconds, photos/s, peak RSS of the stage's processes
(wait4's ru_maxrss, children included; the server's VmHWM), and the workspace's disk use after
it. Cost per photo flat means a straight line through the three sizes: the slope of a least-
squares fit of seconds against N, and its prediction at 217,000 photos, are in the JSON.
Memory-mapped arrays count in RSS as their pages are touched; their size is recorded beside it.

Run it alone (it uses both cores for about 45 minutes at the default sizes); the load average is
recorded at the start of each stage. Writes JSON to --out (default bench/results/scale.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
TARGET = 217_000
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}   # this checkout's code, whatever is installed
PER_LISTING = 3


# --- the collection ---------------------------------------------------------------------------
def _read_sources(data: Path) -> list[tuple[Path, str]]:
    with open(data / "listings.csv", newline="", encoding="utf-8") as f:
        rows = [(data / "images" / r["file"], r["city"]) for r in csv.DictReader(f) if r.get("city")]
    return [(p, c) for p, c in rows if p.is_file()]


def _synthesise_part(args) -> None:
    sources, out, start, stop, seed = args
    rng = np.random.default_rng([seed, start])
    for i in range(start, stop):
        path, _ = sources[(i * 7919) % len(sources)]   # a fixed walk over the sources
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            im = ImageOps.mirror(im)
        arr = np.asarray(im, np.float32) * rng.uniform(0.92, 1.08, 3)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
            out / f"{i // PER_LISTING}_{i % PER_LISTING + 1}.jpg", quality=int(rng.integers(80, 96)))


def synthesise(data: Path, out: Path, n: int, seed: int = 0, workers: int = 2) -> dict:
    """N distinct photos and listings.csv (listing_id, city) under `out`; returns counts."""
    sources = _read_sources(data)
    images = out / "images"
    images.mkdir(parents=True)
    step = 500
    parts = [(sources, images, s, min(s + step, n), seed) for s in range(0, n, step)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap_unordered(_synthesise_part, parts):
            pass
    with open(out / "listings.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["listing_id", "city", "price"])
        for listing in range(-(-n // PER_LISTING)):
            city = sources[(listing * PER_LISTING * 7919) % len(sources)][1]
            writer.writerow([listing, city, 400_000 + 1000 * (listing % 500)])
    return {"photos": n, "listings": -(-n // PER_LISTING), "bytes": sum(p.stat().st_size for p in images.iterdir())}


# --- measuring a stage ------------------------------------------------------------------------
def disk_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def run_stage(name: str, argv: list[str], ws: Path, log: Path, n: int) -> dict:
    """Run one CLI stage as a child process; wall, CPU and peak RSS from wait4."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "neighbourhoods", *argv], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, env=ENV)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-15:]
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    result = {"seconds": round(wall, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
              "photos_per_s": round(n / wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
              "disk_mb_after": round(disk_bytes(ws) / 2**20, 1), "load_average_at_start": round(load, 2)}
    print(f"  {name:<9} {wall:8.1f} s  {n / wall:8.1f} photos/s  peak RSS {result['peak_rss_mb']:7.1f} MB  "
          f"disk {result['disk_mb_after']:8.1f} MB  (load {load:.2f})", flush=True)
    return result


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def serve_stage(ws: Path, run: str, city: str, log: Path, port: int, requests: int = 20) -> dict:
    """Start the server, time it to the first healthy answer, then uncached thumbnails (new seeds)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "neighbourhoods", "serve", "-w", str(ws), "--run", run,
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=ENV)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit("serve exited:\n" + log.read_text(errors="replace")[-2000:])
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        startup = time.perf_counter() - start
        latencies = []
        query = urllib.parse.urlencode({"city": city})
        for seed in range(requests):
            t = time.perf_counter()
            with urllib.request.urlopen(f"{base}/thumbnail?{query}&seed={1000 + seed}", timeout=120) as r:
                r.read()
            latencies.append(time.perf_counter() - t)
        return {"startup_seconds": round(startup, 2), "uncached_ms_median": round(1000 * float(np.median(latencies)), 1),
                "uncached_ms_max": round(1000 * max(latencies), 1), "peak_rss_mb": vm_hwm_mb(proc.pid),
                "load_average_at_start": round(load, 2)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def largest_city(ws: Path) -> str:
    counts = json.loads((ws / "labels.json").read_text())["counts"]
    return max(counts, key=lambda c: (counts[c], c))


def fit_line(ns: list[int], values: list[float]) -> dict:
    """Least squares value = a + b * N; b per 1000 photos, the prediction at TARGET, and how far
    the measured points sit from the line (a curve shows as a large relative residual)."""
    if len(ns) < 2:
        return {}
    b, a = np.polyfit(np.asarray(ns, float), np.asarray(values, float), 1)
    residual = max(abs(v - (a + b * n)) / max(abs(v), 1e-9) for n, v in zip(ns, values))
    return {"per_1000": round(b * 1000, 3), "intercept": round(a, 2), "at_217k": round(a + b * TARGET, 1),
            "max_relative_residual": round(float(residual), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "socal"),
                    help="real photos to synthesise from: a folder with images/ and listings.csv (file, city)")
    ap.add_argument("--sizes", default="5000,20000,50000", help="comma-separated N")
    ap.add_argument("--train-minutes", type=float, default=2.0)
    ap.add_argument("--tmp", default=None, help="where the temporary collections go (default: the system's)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "listings.csv").is_file():
        raise SystemExit(f"no listings.csv under {data}: pass --data ../shared/data/socal")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    out_path = Path(args.out)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "data": str(data), "sizes": sizes, "train_minutes": args.train_minutes, "runs": {}}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"nb-scale-{n}-", dir=args.tmp) as tmp:
            tmp = Path(tmp)
            t = time.perf_counter()
            made = synthesise(data, tmp / "photos", n)
            print(f"N = {n}: synthesised {made['photos']} photos of {made['listings']} listings "
                  f"({made['bytes'] / 2**20:.0f} MB) in {time.perf_counter() - t:.0f} s", flush=True)
            ws, logs = tmp / "ws", tmp / "logs"
            logs.mkdir()
            stages = {}
            stages["ingest"] = run_stage("ingest", ["ingest", str(tmp / "photos" / "images"), "-w", str(ws),
                                                    "--labels", str(tmp / "photos" / "listings.csv"),
                                                    "--key-column", "listing_id", "--res", "64x64", "--json"],
                                         ws, logs / "ingest.log", n)
            text = (logs / "ingest.log").read_text()
            summary = json.loads(text[text.index("{"):text.rindex("}") + 1])
            stages["ingest"]["kept"], stages["ingest"]["labels"] = summary["kept"], len(summary["labels"])
            stages["ingest"]["prepared_mb"] = round(disk_bytes(ws / "prepared") / 2**20, 1)
            stages["cluster"] = run_stage("cluster", ["cluster", "-w", str(ws), "-k", "4", "--json"], ws,
                                          logs / "cluster.log", n)
            stages["select"] = run_stage("select", ["select", "-w", str(ws), "--auto", "exteriors"], ws,
                                         logs / "select.log", n)
            stages["train"] = run_stage("train", ["train", "-w", str(ws), "--res", "64x64", "--minutes",
                                                  str(args.train_minutes), "--name", "scale", "--no-upscaler"],
                                        ws, logs / "train.log", n)
            stages["train"]["overhead_seconds"] = round(stages["train"]["seconds"] - 60 * args.train_minutes, 2)
            city = largest_city(ws)
            stages["generate"] = run_stage("generate", ["generate", "-w", str(ws), "--run", "scale", "--city", city,
                                                        "-n", "16", "--out", str(tmp / "thumbs"), "--json"],
                                           ws, logs / "generate.log", n)
            stages["serve"] = serve_stage(ws, "scale", city, logs / "serve.log", port=18000 + n % 1000)
            print(f"  serve     start-up {stages['serve']['startup_seconds']:.1f} s, uncached thumbnail "
                  f"{stages['serve']['uncached_ms_median']:.0f} ms median, peak RSS {stages['serve']['peak_rss_mb']} MB",
                  flush=True)
            result["runs"][str(n)] = {"collection": made, "stages": stages}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2))   # after each N: a long run keeps what it measured

    ns = [int(n) for n in result["runs"]]
    result["fit"] = {}
    for stage in ("ingest", "cluster", "select", "train", "generate"):
        runs = [result["runs"][str(n)]["stages"][stage] for n in ns]
        result["fit"][stage] = {"seconds": fit_line(ns, [r["seconds"] for r in runs]),
                                "peak_rss_mb": fit_line(ns, [r["peak_rss_mb"] for r in runs])}
    result["fit"]["serve"] = {"startup_seconds": fit_line(ns, [result["runs"][str(n)]["stages"]["serve"]["startup_seconds"]
                                                               for n in ns]),
                              "peak_rss_mb": fit_line(ns, [result["runs"][str(n)]["stages"]["serve"]["peak_rss_mb"] or 0
                                                           for n in ns])}
    if len(ns) >= 2:
        pre = result["fit"]["ingest"]["seconds"]["at_217k"] + result["fit"]["cluster"]["seconds"]["at_217k"]
        result["ingest_plus_cluster_at_217k_hours"] = round(pre / 3600, 2)
        print(f"extrapolated to {TARGET:,} photos: ingest + cluster {pre / 3600:.2f} h; "
              + ", ".join(f"{s} peak RSS {result['fit'][s]['peak_rss_mb']['at_217k']:.0f} MB"
                          for s in ("ingest", "cluster", "generate")), flush=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
