"""Benchmark: does the novelty guard still catch copies when it looks at the images' own size?

    python bench/guard.py --workspace WS --res 96x128 [--run RUN] [--photos 400]

The guard (thumbnails.guard, metrics.novelty) drops a generated image whose nearest training
photo is more similar than the 99th percentile of held-out photos' nearest-train similarity.
For each feature space it can use (EfficientNet-Lite0 at 224x224, the ImageNet size, and at the
images' own size) this measures, on the workspace's own photos:
- how many altered copies of training photos it flags: `--photos` training photos, each as it
  is and JPEG'd, blurred, shifted, noised, mirrored, recoloured, and all of those at once (what a
  generator that memorised a photo draws is an imperfect copy);
- how many held-out photos it flags (about 1%, by the threshold's construction);
- where --run is given, the share of that run's samples it flags, and how often the spaces agree;
- the price: ms per image of the feature pass, one thread, batches of 16 (median of 5).
JSON to --out (default bench/results/guard.json).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from neighbourhoods.core.prepared import load_split  # noqa: E402
from neighbourhoods.core.resolution import parse_res  # noqa: E402
from neighbourhoods.core.workspace import Workspace, atomic_write_json  # noqa: E402
from neighbourhoods.metrics.features import load_space  # noqa: E402
from neighbourhoods.metrics.novelty import NoveltyIndex  # noqa: E402

SPACES = ("efficientnet", "efficientnet-native")


def _jpeg(img: Image.Image, quality: int = 70) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _shift(img: Image.Image, px: int = 3) -> Image.Image:
    a = np.asarray(img)
    return Image.fromarray(np.pad(a, ((px, 0), (px, 0), (0, 0)), mode="edge")[: a.shape[0], : a.shape[1]])


def _noise(img: Image.Image, rng: np.random.Generator, sigma: float = 8.0) -> Image.Image:
    a = np.asarray(img).astype(np.float32) + rng.normal(0, sigma, np.asarray(img).shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _recolour(img: Image.Image) -> Image.Image:
    return ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(0.85)).enhance(1.15)


def altered(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Each photo as it is and under the alterations a memorised sample shows, uint8 N x H x W x 3."""
    rng = np.random.default_rng(seed)
    ops = {
        "copy": lambda im: im,
        "jpeg q70": _jpeg,
        "blur r1": lambda im: im.filter(ImageFilter.GaussianBlur(1)),
        "shift 3 px": _shift,
        "noise 8": lambda im: _noise(im, rng),
        "mirrored": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "recoloured": _recolour,
        "all at once": lambda im: _jpeg(_noise(_shift(_recolour(im.filter(ImageFilter.GaussianBlur(1)))), rng)),
    }
    return {name: np.stack([np.asarray(op(Image.fromarray(a))) for a in images]) for name, op in ops.items()}


def ms_per_image(space: str, images: np.ndarray, rounds: int = 5) -> float:
    extract = load_space(space).extract
    batch = images[:16]
    extract(batch)   # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        extract(batch)
        times.append((time.perf_counter() - t0) / len(batch))
    return 1000 * float(np.median(times))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", type=Path, required=True, help="an ingested workspace with held-out photos")
    ap.add_argument("--res", type=parse_res, default=(96, 128), help="prepared resolution HxW")
    ap.add_argument("--run", default=None, help="also score this run's samples in both spaces")
    ap.add_argument("--photos", type=int, default=400, help="training photos altered")
    ap.add_argument("--samples", type=int, default=500, help="samples of --run")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "guard.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)   # as the server runs it
    ws = Workspace(args.workspace)
    train = load_split(ws, args.res, "train")
    pick = np.random.default_rng(0).choice(len(train), size=min(args.photos, len(train)), replace=False)
    photos = np.stack([np.asarray(train.images[train.rows[i]]) for i in np.sort(pick)])
    variants = altered(photos)
    samples = None
    if args.run:
        from neighbourhoods.models import runs
        gen = runs.load_generator(runs.resolve_run(ws, args.run))
        n = args.samples
        samples = runs.sample(gen, [i % len(gen.class_names) for i in range(n)], list(range(n)))
    result = {"workspace": str(ws.root), "res": list(args.res), "photos_altered": len(photos), "run": args.run,
              "load_average_start": os.getloadavg(), "spaces": {}}
    flags = {}
    for space in SPACES:
        index = NoveltyIndex.build(ws, args.res, space=space, progress=True)
        r = {"threshold": index.threshold, "training_photos": len(index.train_photo_ids),
             "holdout_flagged": float((index.holdout_similarity > index.threshold).mean()),
             "ms_per_image": ms_per_image(space, photos), "copies_flagged": {}, "similarity_median": {}}
        for name, imgs in variants.items():
            sims = index.max_similarity(imgs)
            r["copies_flagged"][name] = float((sims > index.threshold).mean())
            r["similarity_median"][name] = float(np.median(sims))
        if samples is not None:
            flags[space] = index.max_similarity(samples) > index.threshold
            r["samples_flagged"] = float(flags[space].mean())
        result["spaces"][space] = r
        print(f"{space}: threshold {index.threshold:.4f}, {r['ms_per_image']:.1f} ms/image, held-out flagged "
              f"{r['holdout_flagged']:.1%}; copies flagged: "
              + ", ".join(f"{k} {v:.0%}" for k, v in r["copies_flagged"].items()), flush=True)
    if flags:
        a, b = flags.values()
        result["samples_agreement"] = float((a == b).mean())
        print(f"samples flagged: {', '.join(f'{k} {v.mean():.1%}' for k, v in flags.items())}; "
              f"agreement {result['samples_agreement']:.1%}")
    result["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
