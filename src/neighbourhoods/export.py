"""`neighbourhoods export`: the EMA generator via torch.export, so serving needs no training code.

    OUT.pt2    torch.export ExportedProgram: graph + weights, dynamic batch dimension
    OUT.json   class_names, res, z_dim, images_seen, weights fingerprint, noise recipe

Reading it back (what `serve` and `generate` do with a .pt2) is thumbnails/exported.py.

Why torch.export and not ONNX or TorchScript: ONNX would add two dependencies (onnx,
onnxruntime) for a graph torch already runs; TorchScript (torch.jit) is deprecated in the torch
this project pins. An ExportedProgram loads with torch.export.load (weights through the
weights-only loader, no pickled Python), runs without the `models` package, and gives the same
pixels as the eager model (`export` checks the largest difference and reports it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.workspace import atomic_path, atomic_write_json, open_workspace
from neighbourhoods.models import runs
from neighbourhoods.thumbnails.exported import load_exported
from neighbourhoods.thumbnails.postprocess import thumbnail
from neighbourhoods.thumbnails.source import weights_fingerprint
from neighbourhoods.thumbnails.upscalers import get_upscaler


def _wrapper(model):
    class Uint8Generator(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.g = model

        def forward(self, z, labels):
            return runs.to_uint8_tensor(self.g(z, labels))

    return Uint8Generator().eval()


def export(workspace, run: str, out, bench: bool = False, check_n: int = 8) -> dict:
    out = Path(out)
    if out.suffix != ".pt2":
        raise NeighbourhoodsError(f"--out must end in .pt2, got {out}")
    ws = open_workspace(workspace)
    gen = runs.load_generator(runs.resolve_run(ws, run))
    wrapped = _wrapper(gen.model)
    n = torch.export.Dim("n", min=1, max=1024)
    z = torch.randn(2, gen.z_dim)
    labels = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        program = torch.export.export(wrapped, (z, labels), dynamic_shapes=({0: n}, {0: n}))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.export.save(program, str(tmp))
    meta = {"class_names": list(gen.class_names), "city_map": gen.city_map.to_json(), "res": list(gen.res),
            "z_dim": int(gen.z_dim),
            "images_seen": int(gen.images_seen), "fingerprint": weights_fingerprint(gen.model),
            "run": str(runs.resolve_run(ws, run)), "noise": "runs.noise_for_seeds"}
    atomic_write_json(out.with_suffix(".json"), meta)

    # the exported file must give the same pixels as the training stack's own sampler
    seeds = list(range(check_n))
    classes = [i % len(gen.class_names) for i in seeds]
    ref = runs.sample(gen, classes, seeds)
    got = load_exported(out).sample(classes, seeds)
    diff = int(np.abs(ref.astype(np.int16) - got.astype(np.int16)).max())
    result = {"path": str(out), "bytes": out.stat().st_size, "max_abs_diff": diff, **meta}
    if bench:
        result["latency"] = benchmark(out, upscaler=get_upscaler(None, workspace=ws.root))
    return result


def benchmark(path, batches=(1, 64), threads=(1, 2), reps: int = 7, size=(256, 192), fmt: str = "jpg",
              upscaler=None) -> list[dict]:
    """CPU latency per thumbnail: the exported generator alone, and upscale + encode per image.

    Median over `reps` timed calls after a warm-up, per (torch threads, batch). The 1-minute load
    average is recorded with each row: on a shared machine, OpenMP threads that spin-wait for a
    descheduled sibling make multi-threaded small batches far slower than single-threaded ones.
    """
    src = load_exported(path)
    up = upscaler if upscaler is not None else get_upscaler(None)
    rows = []
    before = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            for b in batches:
                classes = [k % len(src.class_names) for k in range(b)]
                src.sample(classes, list(range(b)))   # warm-up
                times = []
                for r in range(reps):
                    t0 = time.perf_counter()
                    imgs = src.sample(classes, list(range(1000 + r * b, 1000 + (r + 1) * b)))
                    times.append(time.perf_counter() - t0)
                post_imgs = (list(imgs) * 32)[:max(32, b)]   # enough images for a stable mean
                t0 = time.perf_counter()
                for img in post_imgs:
                    thumbnail(img, size, fmt, up)
                post = (time.perf_counter() - t0) / len(post_imgs)
                gen_s = float(np.median(times))
                rows.append({"threads": t, "batch": b, "upscale": up.name, "ms_per_batch": 1000 * gen_s, "ms_per_image": 1000 * gen_s / b,
                             "postprocess_ms_per_image": 1000 * post, "size": f"{size[0]}x{size[1]}", "format": fmt,
                             "load_average_1min": os.getloadavg()[0]})
    finally:
        torch.set_num_threads(before)
    return rows
