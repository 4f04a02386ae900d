"""Export the EMA generator with torch.export, so serving needs no training code.

    OUT.pt2    torch.export ExportedProgram: graph + weights, dynamic batch dimension
    OUT.json   class_names, res, z_dim, images_seen, weights fingerprint, noise recipe

Why torch.export and not ONNX or TorchScript: ONNX would add two dependencies (onnx,
onnxruntime) for a graph torch already runs; TorchScript (torch.jit) is deprecated in the torch
this project pins. An ExportedProgram loads with torch.export.load (weights through the
weights-only loader, no pickled Python), runs without the `models` package, and gives the same
pixels as the eager model (`export` checks the largest difference and reports it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.generate import Source


def _noise(seeds, z_dim):
    """The latent of each seed, exactly as runs.sample draws it."""
    from neighbourhoods.models.runs import noise_for_seeds
    return noise_for_seeds(list(seeds), z_dim)


def _wrapper(model):
    import torch

    from neighbourhoods.models.runs import to_uint8_tensor

    class Uint8Generator(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.g = model

        def forward(self, z, labels):
            return to_uint8_tensor(self.g(z, labels))

    return Uint8Generator().eval()


def export(workspace, run: str, out, bench: bool = False, check_n: int = 8) -> dict:
    import torch

    from neighbourhoods.models import runs
    from neighbourhoods.generate import _weights_fingerprint
    from neighbourhoods.core.workspace import atomic_path, atomic_write_json, open_workspace

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
    meta = {"class_names": list(gen.class_names), "res": list(gen.res), "z_dim": int(gen.z_dim),
            "images_seen": int(gen.images_seen), "fingerprint": _weights_fingerprint(gen.model),
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
        from neighbourhoods.upscale import get_upscaler
        result["latency"] = benchmark(out, upscaler=get_upscaler(None, workspace=ws.root))
    return result


def load_exported(path) -> Source:
    """A Source backed by an exported .pt2 and its metadata: no `models` code involved."""
    import torch

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise NeighbourhoodsError(f"{path} is not an exported generator (need {path.name} and {meta_path.name}); "
                                  "run `neighbourhoods export` first")
    try:
        module = torch.export.load(str(path)).module()
    except Exception as e:  # a damaged or foreign file: one clear line, not a traceback
        raise NeighbourhoodsError(f"cannot load exported generator {path}: {e}") from None
    meta = json.loads(meta_path.read_text())
    z_dim = int(meta["z_dim"])

    def sample(class_indices: list[int], seeds: list[int], batch_size: int = 64) -> np.ndarray:
        outs = []
        with torch.inference_mode():
            for i in range(0, len(seeds), batch_size):
                z = _noise(seeds[i:i + batch_size], z_dim)
                labels = torch.tensor(class_indices[i:i + batch_size], dtype=torch.long)
                outs.append(module(z, labels).numpy())
        h, w = meta["res"]
        return np.concatenate(outs) if outs else np.zeros((0, h, w, 3), np.uint8)

    return Source(class_names=list(meta["class_names"]), res=tuple(meta["res"]), sample=sample,
                  fingerprint=str(meta["fingerprint"]), label=str(path), images_seen=int(meta["images_seen"]))


def benchmark(path, batches=(1, 64), threads=(1, 2), reps: int = 7, size=(256, 192), fmt: str = "jpg",
              upscaler=None) -> list[dict]:
    """CPU latency per thumbnail: the exported generator alone, and upscale + encode per image.

    Median over `reps` timed calls after a warm-up, per (torch threads, batch). The 1-minute load
    average is recorded with each row: on a shared machine, OpenMP threads that spin-wait for a
    descheduled sibling make multi-threaded small batches far slower than single-threaded ones.
    """
    import os

    import torch

    from neighbourhoods.generate import thumbnail
    from neighbourhoods.upscale import get_upscaler

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
