"""Load test of `neighbourhoods serve` on loopback: requests/s, p50/p99 latency and errors.

    python3 bench/serve.py --workspace WS --run RUN [--duration 60] [--clients 32]
    python3 bench/serve.py            # no run given: trains a tiny toy-town dcgan in a temp folder first

Starts the server in a subprocess (as a user would), waits for /healthz, then runs two phases
with `--clients` concurrent keep-alive clients (httpx.AsyncClient), each for `--duration` s:
  cached    requests cycle through `--distinct` URLs rendered once beforehand (what a CDN's
            origin sees for popular listings); target: zero errors, p99 < 250 ms
  uncached  every request a new seed: generator + novelty guard + upscale + encode each time
Bounded: fixed duration, fixed client count, and the server's own queue bound (503s count as
errors). Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


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
    """Run one load phase; add the server's CPU time per request and the machine's load average."""
    cpu0 = _cpu_seconds(server.pid)
    out = asyncio.run(coro)
    cpu1 = _cpu_seconds(server.pid)
    if cpu0 is not None and cpu1 is not None and out["requests"]:
        out["server_cpu_ms_per_request"] = 1000 * (cpu1 - cpu0) / out["requests"]
    out["load_average_1min"] = os.getloadavg()[0]
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
    ap.add_argument("--no-novelty-guard", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "serve.json"))
    args = ap.parse_args()

    tmp = None
    if args.workspace and args.run:
        ws, run = Path(args.workspace), args.run
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
        print("no --workspace/--run: training a tiny toy-town dcgan first ...", flush=True)
        ws, run = _toy_run(Path(tmp.name))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "neighbourhoods", "serve", "--workspace", str(ws), "--run", run,
           "--port", str(port), "--threads", str(args.threads)]
    if args.no_novelty_guard:
        cmd.append("--no-novelty-guard")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stdout.read()}")
            try:
                health = httpx.get(base + "/healthz", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit("server did not come up in 300 s")
                time.sleep(0.5)
        cities = [c["name"] for c in httpx.get(base + "/cities").json()["cities"]]

        def url(city: str, seed: int) -> str:
            q = httpx.QueryParams({"city": city, "seed": seed, "size": args.size, "format": args.format})
            return f"/thumbnail?{q}"

        warm = [url(cities[k % len(cities)], k) for k in range(args.distinct)]
        t0 = time.perf_counter()
        for u in warm:
            httpx.get(base + u, timeout=60).raise_for_status()
        warm_s = time.perf_counter() - t0
        cached = _measured(server, _phase(base, lambda k, i: warm[(k * 7919 + i) % len(warm)], args.clients,
                                          args.duration))
        print("cached  ", json.dumps(cached), flush=True)
        uncached = _measured(server, _phase(base, lambda k, i: url(cities[(k + i) % len(cities)],
                                                                   10_000_000 + k * 1_000_000 + i),
                                            args.clients, args.duration))
        print("uncached", json.dumps(uncached), flush=True)
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
              "size": args.size, "format": args.format, "server_threads": args.threads,
              "novelty_guard": not args.no_novelty_guard, "model": health,
              "warmup": {"urls": len(warm), "seconds": warm_s, "sequential_ms_per_uncached": 1000 * warm_s / len(warm)},
              "cached": cached, "uncached": uncached,
              "server_after": {k: health_after[k] for k in ("cache", "sample_cache", "batches", "samples_generated")},
              "cpu": {"cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
              "target": {"errors": 0, "cached_p99_ms": 250},
              "met": cached["errors"] == 0 and uncached["errors"] == 0 and cached["p99_ms"] < 250}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from neighbourhoods.core.workspace import atomic_write_json
    atomic_write_json(out, result)
    print(f"server CPU per request: cached {cached.get('server_cpu_ms_per_request', float('nan')):.2f} ms, "
          f"uncached {uncached.get('server_cpu_ms_per_request', float('nan')):.1f} ms; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"wrote {out}: cached {cached['requests_per_s']:.0f} req/s p99 {cached['p99_ms']:.1f} ms, "
          f"uncached {uncached['requests_per_s']:.1f} req/s p99 {uncached['p99_ms']:.0f} ms, "
          f"errors {cached['errors'] + uncached['errors']}")


if __name__ == "__main__":
    main()
