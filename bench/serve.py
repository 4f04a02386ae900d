"""Load test of `neighbourhoods serve` on loopback: requests/s, p50/p99 latency, errors, RSS.

    python3 bench/serve.py --workspace WS --run RUN [--duration 60] [--clients 32]
    python3 bench/serve.py --run site.onnx      # an ONNX replica (no workspace)
    python3 bench/serve.py            # no run given: trains a tiny toy-town dcgan in a temp folder first

Starts the server in a subprocess (as a user would), times it to its first /healthz answer,
then runs two phases with `--clients` concurrent keep-alive connections, each for `--duration`
s, from a real HTTP load generator: `wrk` (Debian's; --client wrk, the default where it is
installed) in its own process, so the measurement does not cost the server's interpreter;
`--client python` uses httpx in this process instead (which measures itself as much as the
server: its p99 is mostly its own event loop).
  cached    requests cycle through `--distinct` URLs rendered once beforehand (what a CDN's
            origin sees for popular listings); target: zero errors, p99 < 250 ms
  uncached  every request a new listing (the next seed of a fresh block): generator, the guard's
            gates (a rejected sample draws its next attempts), upscale and encode each time
Bounded: fixed duration, fixed client count, and the server's own queue bound (503s count as
errors; so do redirects: every URL is canonical). The server's peak RSS (VmHWM) and its CPU
per request are recorded. Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


FRESH_SEED = 39_063 * 256   # 10,000,128: the start of a block of listings no earlier phase touched


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (Linux /proc), to report server CPU per request."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _measured(server, coro) -> dict:
    return _measured_sync(server, lambda: asyncio.run(coro))


def _measured_sync(server, phase) -> dict:
    """Run one load phase; add the server's CPU time per request and the machine's load average."""
    load = os.getloadavg()[0]
    cpu0 = _cpu_seconds(server.pid)
    out = phase()
    cpu1 = _cpu_seconds(server.pid)
    if cpu0 is not None and cpu1 is not None and out["requests"]:
        out["server_cpu_ms_per_request"] = 1000 * (cpu1 - cpu0) / out["requests"]
    out["load_average_1min_before"], out["load_average_1min"] = load, os.getloadavg()[0]
    return out


def _toy_run(root: Path) -> tuple[Path, str]:
    from neighbourhoods.demo.toytown import draw_toytown
    from neighbourhoods.ingest import ingest
    from neighbourhoods.train import TrainConfig, train

    photos, labels = draw_toytown(root / "toytown", per_city=30)
    ws = root / "ws"
    ingest(photos, ws, labels=labels, res=[(48, 64)], workers=1, progress=False)
    train(ws, TrainConfig(model="dcgan", res=(48, 64), run="toy", kimg=0.256, batch=32, min_city_photos=1,
                          num_workers=0, progress=False))
    return ws, "toy"


async def _phase(base: str, urls, clients: int, duration: float) -> dict:
    """`clients` workers request urls() for `duration` seconds; latencies of every request."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop = time.perf_counter() + duration

    async def worker(c: httpx.AsyncClient, k: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            url = urls(k, i)
            i += 1
            t0 = time.perf_counter()
            try:
                r = await c.get(url)
                ok = r.status_code == 200 and len(r.content) > 0
                key = None if ok else f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                key = type(e).__name__
            latencies.append(time.perf_counter() - t0)
            if key:
                errors[key] = errors.get(key, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=30.0, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(c, k) for k in range(clients)])
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "seconds": wall, "requests_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
            "errors": sum(errors.values()), "error_kinds": errors}


WRK_SCRIPT = r"""
-- every request a canonical thumbnail path; the seed is a per-thread counter for the uncached phase
local paths, prefix, suffix, fixed = {}, nil, nil, %(fixed)s
%(paths)s
local counter, tid = 0, 0
local threads = {}
function setup(thread) table.insert(threads, thread); thread:set("tid", #threads) end
function init(args) tid = tonumber(wrk.thread:get("tid")) or 0 end
function request()
  counter = counter + 1
  if fixed then return wrk.format("GET", paths[(counter * 7919 + tid) %% #paths + 1]) end
  return wrk.format("GET", prefix .. tostring(%(seed0)d + tid * 100000000 + counter) .. suffix)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("JSON {\"requests\": %%d, \"duration_us\": %%d, \"socket_errors\": %%d, " ..
    "\"non_2xx\": %%d, \"p50_us\": %%d, \"p90_us\": %%d, \"p99_us\": %%d, \"max_us\": %%d}\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _phase_wrk(base: str, clients: int, duration: float, paths: list[str] | None = None,
               prefix: str = "", suffix: str = "", seed0: int = 0) -> dict:
    """wrk with `clients` connections on 2 threads: fixed `paths` in turn, or prefix + a new seed + suffix."""
    lua = WRK_SCRIPT % {
        "fixed": "true" if paths else "false", "seed0": seed0,
        "paths": ("\n".join(f"paths[{i + 1}] = {json.dumps(p)}" for i, p in enumerate(paths)) if paths
                  else f"prefix = {json.dumps(prefix)}; suffix = {json.dumps(suffix)}")}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua)
    try:
        out = subprocess.run(["wrk", "-t", "2", "-c", str(clients), "-d", f"{int(duration)}s", "--timeout", "30s",
                              "-s", f.name, base], capture_output=True, text=True, timeout=duration + 120)
    finally:
        os.unlink(f.name)
    m = re.search(r"^JSON (\{.*\})$", out.stdout, re.M)
    if not m:
        raise SystemExit(f"wrk gave no result: {out.stdout[-1500:]} {out.stderr[-1500:]}")
    r = json.loads(m.group(1))
    seconds = r["duration_us"] / 1e6
    return {"client": "wrk", "requests": r["requests"], "seconds": seconds, "requests_per_s": r["requests"] / seconds,
            "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
            "max_ms": r["max_us"] / 1000, "errors": r["socket_errors"] + r["non_2xx"],
            "error_kinds": {"socket": r["socket_errors"], "non-2xx": r["non_2xx"]}}


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def profile_uncached(ws, run: str, size: str, fmt: str, novelty: bool, n: int = 48, batch: int = 1,
                     city: str | None = None) -> dict:
    """Where an uncached thumbnail's time goes, in this process, one thread: ms per image for the
    generator and each part of the guard (its features, nearest training photo, realism gate,
    perceptual hash; called on `batch` samples at once, as the server's micro-batches are), the
    upscaler and the encoder (median over `n` images). Then the whole of it as a website meets it:
    ms per listing for the first 64 listings of `city` (default: the run's first class) through the guard's every gate
    (render_listings: a seed whose sample is rejected draws its next attempts), and the samples
    drawn per listing."""
    from PIL import Image

    from neighbourhoods.thumbnails.distinct import Ledgers, phash
    from neighbourhoods.thumbnails.guard import render_listings
    from neighbourhoods.thumbnails.pipeline import is_replica, load_pipeline
    from neighbourhoods.thumbnails.postprocess import encode

    if not is_replica(run):
        import torch
        torch.set_num_threads(1)
    source, guard, upscaler = load_pipeline(ws, run, novelty=novelty, progress=False)
    w, h = (int(v) for v in size.split("x"))
    parts: dict[str, list[float]] = {k: [] for k in ("generator", "guard_features", "novelty", "realism", "phash",
                                                     "upscale", "encode")}
    rounds = max(1, n // batch)
    for k in range(rounds + 2):
        seeds = [50_000_000 + k * batch + j for j in range(batch)]
        classes = [s % len(source.class_names) for s in seeds]
        times = [time.perf_counter()]
        img = source.sample(classes, seeds)
        times.append(time.perf_counter())
        if guard is not None:
            features = guard.embed(img)
            times.append(time.perf_counter())
            guard.similarity(features)
            times.append(time.perf_counter())
            if guard.realism is not None:
                guard.realism.passes(features, classes)
            times.append(time.perf_counter())
            [phash(im) for im in img]
            times.append(time.perf_counter())
        else:
            times += [times[-1]] * 4
        big = upscaler.resize(Image.fromarray(img[0]), (w, h))
        times.append(time.perf_counter())
        encode(big, fmt)
        times.append(time.perf_counter())
        if k >= 2:   # warm-up
            steps = np.diff(times)
            steps[:5] /= batch
            for key, dt in zip(parts, steps):
                parts[key].append(1000 * dt)
    out = {f"{key}_ms": round(float(np.median(v)), 2) for key, v in parts.items()}
    out["total_ms"] = round(sum(out.values()), 2)
    out["batch"], out["upscale"], out["guard"] = batch, upscaler.name, None if guard is None else guard.label
    if guard is not None:
        city = city or source.class_names[0]
        match = source.resolve(city)
        drawn = []

        def counted(classes, seeds):
            drawn.append(len(seeds))
            return source.sample(classes, seeds)

        t = time.perf_counter()
        listings = render_listings(replace(source, sample=counted), match, list(range(64)), guard, Ledgers())
        out["listing"] = {"city": city, "listings": len(listings), "ms_per_listing":
                          round(1000 * (time.perf_counter() - t) / len(listings), 1),
                          "samples_per_listing": round(sum(drawn) / len(listings), 2),
                          "served_at_first_seed": round(float(np.mean([s.used_seed == s.seed for s in listings])), 3)}
    out["load_average_1min"] = os.getloadavg()[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", help="workspace with the run (default: a toy-town run made in a temp folder)")
    ap.add_argument("--run", help="run name or folder, or an exported .pt2")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients")
    ap.add_argument("--distinct", type=int, default=200, help="distinct URLs in the cached phase")
    ap.add_argument("--size", default="256x192")
    ap.add_argument("--format", default="jpg")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads")
    ap.add_argument("--generator-workers", type=int, default=None,
                    help="the server's generator calls at once (default: serve's own)")
    ap.add_argument("--no-novelty-guard", action="store_true")
    ap.add_argument("--profile", action="store_true", help="first time one uncached thumbnail's parts in-process")
    ap.add_argument("--profile-city", default=None, help="the city whose first 64 listings --profile draws "
                    "through every gate (default: the run's first class)")
    ap.add_argument("--client", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python",
                    help="load generator (default wrk where installed: `apt install wrk`)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "serve.json"))
    args = ap.parse_args()

    tmp = None
    if args.run and (args.workspace or args.run.endswith(".onnx")):
        ws, run = (Path(args.workspace) if args.workspace else None), args.run
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
        print("no --workspace/--run: training a tiny toy-town dcgan first ...", flush=True)
        ws, run = _toy_run(Path(tmp.name))
    profile = None
    if args.profile:
        profile = {f"batch_{b}": profile_uncached(ws, run, args.size, args.format, not args.no_novelty_guard, batch=b,
                                                  city=args.profile_city) for b in (1, 8)}
        print("profile ", json.dumps(profile), flush=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "neighbourhoods", "serve", "--run", run, "--port", str(port),
           "--threads", str(args.threads)]
    cmd += ["--generator-workers", str(args.generator_workers)] if args.generator_workers else []
    cmd += ["--workspace", str(ws)] if ws else []
    if args.no_novelty_guard:
        cmd.append("--no-novelty-guard")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stdout.read()}")
            try:
                health = httpx.get(base + "/healthz", timeout=2).json()
                startup_s = time.perf_counter() - started
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit("server did not come up in 300 s")
                time.sleep(0.5)
        cities = [c["name"] for c in httpx.get(base + "/cities").json()["cities"]]

        from neighbourhoods.core.urls import Thumb, canonical_path

        def url(city: str, seed: int) -> str:    # the canonical spelling: no redirects in the measurement
            return canonical_path(Thumb(city, seed, args.size, args.format))

        # a city's listings are kept distinct in blocks of 256 seeds, filled in seed order: the warm URLs
        # and the uncached seeds each start a block or follow the one before, so a request draws one listing
        warm = [url(cities[k % len(cities)], k // len(cities)) for k in range(args.distinct)]
        t0 = time.perf_counter()
        for u in warm:
            r = httpx.get(base + u, timeout=60)
            assert r.status_code == 200, (u, r.status_code, r.text[:200])
        warm_s = time.perf_counter() - t0
        if args.client == "wrk":
            head, tail = url(cities[0], 0).split("seed=0")
            cached = _measured_sync(server, lambda: _phase_wrk(base, args.clients, args.duration, paths=warm))
            print("cached  ", json.dumps(cached), flush=True)
            uncached = _measured_sync(server, lambda: _phase_wrk(base, args.clients, args.duration,
                                                                 prefix=head + "seed=", suffix=tail, seed0=FRESH_SEED))
        else:
            cached = _measured(server, _phase(base, lambda k, i: warm[(k * 7919 + i) % len(warm)], args.clients,
                                              args.duration))
            print("cached  ", json.dumps(cached), flush=True)
            uncached = _measured(server, _phase(base, lambda k, i: url(cities[(k + i) % len(cities)],
                                                                       FRESH_SEED + k * 1_000_192 + i),
                                                args.clients, args.duration))
        print("uncached", json.dumps(uncached), flush=True)
        peak_rss = _peak_rss_mb(server.pid)
        health_after = httpx.get(base + "/healthz").json()
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        if tmp is not None:
            tmp.cleanup()
    result = {"workspace": str(ws), "run": run, "duration_s": args.duration, "clients": args.clients,
              "client": args.client, "startup_s": startup_s, "profile_uncached": profile, "server_peak_rss_mb": peak_rss,
              "server_rss_mb_after": health_after.get("rss_mb"),
              "size": args.size, "format": args.format, "server_threads": args.threads,
              "generator_workers": args.generator_workers, "load_average_end": os.getloadavg(),
              "novelty_guard": not args.no_novelty_guard, "model": health,
              "warmup": {"urls": len(warm), "seconds": warm_s, "sequential_ms_per_uncached": 1000 * warm_s / len(warm)},
              "cached": cached, "uncached": uncached,
              "server_after": {k: health_after[k] for k in ("cache", "sample_cache", "batches", "samples_generated")},
              "cpu": {"cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
              "target": {"errors": 0, "cached_p99_ms": 250, "uncached_p99_ms": 500},
              "met": cached["errors"] == 0 and uncached["errors"] == 0 and cached["p99_ms"] < 250
              and uncached["p99_ms"] < 500}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from neighbourhoods.core.workspace import atomic_write_json
    atomic_write_json(out, result)
    print(f"server CPU per request: cached {cached.get('server_cpu_ms_per_request', float('nan')):.2f} ms, "
          f"uncached {uncached.get('server_cpu_ms_per_request', float('nan')):.1f} ms; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"wrote {out}: cached {cached['requests_per_s']:.0f} req/s p99 {cached['p99_ms']:.1f} ms, "
          f"uncached {uncached['requests_per_s']:.1f} req/s p99 {uncached['p99_ms']:.0f} ms, "
          f"errors {cached['errors'] + uncached['errors']}; start-up {startup_s:.1f} s, peak RSS {peak_rss} MB")


if __name__ == "__main__":
    main()
