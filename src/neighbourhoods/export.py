"""`neighbourhoods export`: the EMA generator for serving without the training code.

    --format pt2 (default)   OUT.pt2 + OUT.json: a torch.export ExportedProgram (graph + weights,
                             dynamic batch); still torch, but no `models` code (thumbnails/exported.py)
    --format onnx            OUT.onnx + OUT.json, the novelty guard (OUT.guard.onnx, OUT.guard.npz)
                             and the ESPCN upscaler (OUT.sr.onnx): a replica that generate and serve
                             run with onnxruntime, importing no torch and needing no workspace
                             (thumbnails/replica.py)

An ExportedProgram loads with torch.export.load (weights through the weights-only loader, no
pickled Python); ONNX files are plain graphs. Both are checked here against the eager model:
the largest pixel difference (and, for the replica, the guard's similarity and the upscaler's
pixels) is measured and reported.
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
from neighbourhoods.thumbnails.realism import QUANTILE
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


def export(workspace, run: str, out, bench: bool = False, check_n: int = 8, fmt: str | None = None,
           snapshot: str = "best", realism_quantile: float | None = None) -> dict:
    out = Path(out)
    fmt = fmt or (out.suffix[1:] if out.suffix in (".pt2", ".onnx") else "pt2")
    if fmt not in ("pt2", "onnx") or out.suffix != f".{fmt}":
        raise NeighbourhoodsError(f"--out must end in .pt2 (--format pt2) or .onnx (--format onnx), got {out}")
    if fmt == "onnx":
        return export_onnx(workspace, run, out, check_n=check_n, snapshot=snapshot,
                           realism_quantile=QUANTILE if realism_quantile is None else realism_quantile)
    ws = open_workspace(workspace)
    gen = runs.load_generator(runs.resolve_run(ws, run), snapshot=snapshot)
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
            "images_seen": int(gen.images_seen), "snapshot": gen.snapshot, "fingerprint": weights_fingerprint(gen.model),
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


# --- ONNX replicas -----------------------------------------------------------------------------------
def _onnx(module, args, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> None:
    """torch.onnx's TorchScript-based exporter (opset 17): it needs only the `onnx` package."""
    import warnings

    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the exporter's deprecation notices: this torch is pinned
        torch.onnx.export(module, args, str(tmp), dynamo=False, opset_version=17, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic)


def export_onnx(workspace, run: str, out: Path, check_n: int = 8, snapshot: str = "best",
                realism_quantile: float = QUANTILE) -> dict:
    """OUT.onnx (+ .json, .guard.onnx, .guard.npz, .sr.onnx): a replica with no torch (replica.py)."""
    from neighbourhoods.core.images import EFFICIENTNET_INPUT
    from neighbourhoods.core.latents import latents
    from neighbourhoods.metrics import novelty
    from neighbourhoods.nets.efficientnet import efficientnet_pooled, load_efficientnet_lite0
    from neighbourhoods.thumbnails import replica
    from neighbourhoods.thumbnails.distinct import calibrate_distinct
    from neighbourhoods.thumbnails.guard import calibrate_realism, train_classes
    from neighbourhoods.thumbnails.realism import realism_arrays
    from neighbourhoods.thumbnails.upscalers import SRUpscaler

    ws = open_workspace(workspace)
    run_dir = runs.resolve_run(ws, run)
    gen = runs.load_generator(run_dir, snapshot=snapshot)
    out.parent.mkdir(parents=True, exist_ok=True)
    z = torch.from_numpy(latents([0, 1], gen.z_dim))
    _onnx(_wrapper(gen.model), (z, torch.zeros(2, dtype=torch.long)), out, ["z", "labels"], ["images"],
          {"z": {0: "n"}, "labels": {0: "n"}, "images": {0: "n"}})

    # the guard: its network, and the index of training photos it compares with (features cached by evaluate)
    index = novelty.load_index(ws, gen.res, progress=False)

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = load_efficientnet_lite0()

        def forward(self, images01):
            return efficientnet_pooled(self.net, images01)

    guard_hw = EFFICIENTNET_INPUT[index.space] or gen.res   # the space's input size (None: the samples')
    _onnx(Pooled().eval(), (torch.rand(2, 3, *guard_hw),), replica.sibling(out, ".guard.onnx"), ["images"],
          ["features"], {"images": {0: "n"}, "features": {0: "n"}})
    classes = train_classes(ws, index, list(gen.class_names), gen.city_map)
    gate = calibrate_realism(ws, index, classes, list(gen.class_names), gen.city_map, realism_quantile, progress=False)
    apart = calibrate_distinct(index.train_features, classes, len(gen.class_names))
    with atomic_path(replica.sibling(out, ".guard.npz")) as tmp, open(tmp, "wb") as f:
        np.savez(f, features=index.train_features.astype(np.float16), photo_ids=index.train_photo_ids,
                 threshold=np.float64(index.threshold), distinct_thresholds=apart.thresholds,
                 **({} if gate is None else realism_arrays(gate)))

    upscaler = get_upscaler(None, workspace=ws.root, res=gen.res)
    upscale = None
    if isinstance(upscaler, SRUpscaler):
        _onnx(upscaler.model, (torch.rand(1, 3, *gen.res),), replica.sibling(out, ".sr.onnx"), ["x"], ["y"],
              {"x": {2: "h", 3: "w"}, "y": {2: "h2", 3: "w2"}})
        upscale = {"name": "espcn", "scale": upscaler.scale, "fingerprint": upscaler.fingerprint}
    meta = {"format": "onnx", "class_names": list(gen.class_names), "city_map": gen.city_map.to_json(),
            "res": list(gen.res), "z_dim": int(gen.z_dim), "images_seen": int(gen.images_seen), "snapshot": gen.snapshot,
            "fingerprint": weights_fingerprint(gen.model), "run": str(run_dir), "noise": "core.latents",
            "guard": {"space": index.space, "photos": int(len(index.train_photo_ids)),
                      "threshold": float(index.threshold),
                      "realism": None if gate is None else {"quantile": gate.quantile,
                                                            "classes": gate.summary(list(gen.class_names))}},
            "upscale": upscale}
    atomic_write_json(out.with_suffix(".json"), meta)

    # the replica must give the eager model's pixels (to 1/255), similarities and upscales
    seeds = list(range(check_n))
    classes = [i % len(gen.class_names) for i in seeds]
    ref = runs.sample(gen, classes, seeds)
    got = replica.load_replica_source(out).sample(classes, seeds)
    result = {"path": str(out), "bytes": sum(p.stat().st_size for p in out.parent.glob(out.stem + ".*")),
              "max_abs_diff": int(np.abs(ref.astype(np.int16) - got.astype(np.int16)).max())}
    eager_features = index.features(ref)
    replica_guard = replica.load_replica_guard(out)
    replica_features = replica_guard.embed(ref)
    result["guard_max_similarity_diff"] = float(np.abs(index.nearest_to_features(eager_features)[0]
                                                       - replica_guard.similarity(replica_features)).max())
    if gate is not None:   # the same reference sets and thresholds; scores differ by the features' precision
        a, b = gate.score(eager_features, classes), replica_guard.realism.score(replica_features, classes)
        result["realism_max_rel_diff"] = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))
    if upscale:
        a = upscaler._pass(ref[0])
        b = replica.load_replica_upscaler(out)._pass(ref[0])
        result["upscale_max_abs_diff"] = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
    return {**result, **meta}
