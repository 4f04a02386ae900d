"""Which upscaler makes the best thumbnails? KID at thumbnail size against real photos of that size.

    python3 bench/upscale.py --data ../shared/data --workspace WS [--n 300] [--run RUN]

Protocols (each upscaler sees the same inputs; features: the FID Inception of inception.py):
  houses-x4  houses/ photos of even house ids, resized to fill 256x192 (the default thumbnail).
             Half are the real reference; the other half are shrunk to 64x48 (Lanczos, as ingest
             does) and upscaled back to 256x192 by each method. Also PSNR against the originals.
  socal-x2   socal/ exteriors at their native 128x96: reference vs. others shrunk to 64x48 and
             upscaled x2.
  gan        (with --run) generator samples at the run's resolution, upscaled to 128x96, against
             the socal reference: the real use, where the input is not a downscaled photo.
The SR network trains on houses/ photos of ODD house ids only (`upscale.train_sr`), so no
evaluation photo is seen in training. Writes bench/results/upscale.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neighbourhoods.core import catalog
from neighbourhoods.core.workspace import atomic_write_json  # noqa: E402
from neighbourhoods.metrics import scores as metrics  # noqa: E402
from neighbourhoods.nets import inception
from neighbourhoods.thumbnails.upscalers import NAMES, SR_FILE, SRConfig, cover_box, get_upscaler, sr_dir  # noqa: E402
from neighbourhoods.upscale import train_sr  # noqa: E402


def _fill(path: Path, size: tuple[int, int]) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
        return im.resize(size, Image.LANCZOS, box=cover_box(im.size, size))


def _unique(paths: list[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        h = hashlib.sha256(p.read_bytes()).hexdigest()
        if h not in seen:
            seen.add(h)
            out.append(p)
    return out


def _order(paths: list[Path]) -> list[Path]:
    """A fixed pseudo-random order (by hash of the name): reference and test halves are unbiased."""
    return sorted(paths, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--workspace", required=True, help="workspace for the SR weights (created if missing)")
    ap.add_argument("--n", type=int, default=300, help="images per set")
    ap.add_argument("--sr-steps", type=int, default=1000, help="SR training steps when no weights exist")
    ap.add_argument("--run", help="also compare on this run's generator samples (a run in --workspace or a path)")
    ap.add_argument("--run-workspace", help="workspace holding --run (default: --workspace)")
    ap.add_argument("--features-dir", help="also save the Inception features here (to recompute metrics)")
    ap.add_argument("--protocols", default="houses-x4,socal-x2,gan", help="comma-separated subset to run")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "upscale.json"))
    args = ap.parse_args()
    data, ws, n = Path(args.data), Path(args.workspace), args.n
    if args.features_dir:
        Path(args.features_dir).mkdir(parents=True, exist_ok=True)
    ws.mkdir(parents=True, exist_ok=True)
    catalog.connect(ws / "catalog.sqlite").close()
    results: dict = {"n": n, "methods": list(NAMES), "protocols": {}}

    houses = sorted((data / "houses" / "images").glob("*.jpg"))
    odd = [p for p in houses if int(p.stem.split("_")[0]) % 2 == 1]
    even = _order(_unique([p for p in houses if int(p.stem.split("_")[0]) % 2 == 0]))
    if not (sr_dir(ws) / SR_FILE).is_file():
        t0 = time.time()
        meta = train_sr(ws, odd, SRConfig(steps=args.sr_steps))
        meta["train_s"] = time.time() - t0
        results["sr_training"] = meta
    else:
        results["sr_training"] = json.loads((sr_dir(ws) / SR_FILE).with_suffix(".json").read_text())
    ups = {name: get_upscaler(name, workspace=ws) for name in NAMES}
    net = inception.load_fid_inception()

    def feats(images: list[np.ndarray], desc: str) -> np.ndarray:
        out = net.features(np.stack(images), progress=True, desc=desc)
        if args.features_dir and "ref" in desc:
            np.save(Path(args.features_dir) / f"{desc.replace(' ', '-')}.npy", out)
        return out

    def compare(name: str, ref_feats: np.ndarray, inputs: list[Image.Image], size, originals=None) -> dict:
        rows = {}
        for m, up in ups.items():
            t0 = time.perf_counter()
            out = [np.asarray(up.resize(im, size)) for im in inputs]
            ms = 1000 * (time.perf_counter() - t0) / len(inputs)
            gen_feats = feats(out, f"{name} {m}")
            if args.features_dir:
                np.save(Path(args.features_dir) / f"{name}-{m}.npy", gen_feats)
            # subsets of half the set: the spread over subsets is the uncertainty we report
            mean, std = metrics.kid(ref_feats, gen_feats, subsets=100, subset_size=max(2, n // 2))
            rows[m] = {"kid": mean, "kid_std": std, "ms_per_image": ms}
            if originals is not None:
                rows[m]["psnr"] = float(np.mean([_psnr(o, a) for o, a in zip(out, originals)]))
            print(f"{name:10s} {m:14s} KID {1000 * mean:7.3f} ± {1000 * std:.3f} (x1e-3)  "
                  f"{rows[m].get('psnr', float('nan')):6.2f} dB  {ms:6.2f} ms/img", flush=True)
        return rows

    wanted = set(args.protocols.split(","))
    # houses-x4: 64x48 -> 256x192
    if "houses-x4" in wanted:
        ref = [np.asarray(_fill(p, (256, 192))) for p in even[:n]]
        test_hr = [_fill(p, (256, 192)) for p in even[n:2 * n]]
        test_lr = [im.resize((64, 48), Image.LANCZOS) for im in test_hr]
    if "houses-x4" in wanted:
        results["protocols"]["houses-x4"] = compare("houses-x4", feats(ref, "houses ref"), test_lr, (256, 192),
                                                [np.asarray(im) for im in test_hr])

    # socal-x2: 64x48 -> 128x96
    socal = _order(_unique(sorted((data / "socal" / "images").glob("*.jpg"))[:4 * n]))
    ref2 = [np.asarray(_fill(p, (128, 96))) for p in socal[:n]]
    test2 = [_fill(p, (128, 96)) for p in socal[n:2 * n]]
    ref2_feats = feats(ref2, "socal ref")
    if "socal-x2" in wanted:
        results["protocols"]["socal-x2"] = compare("socal-x2", ref2_feats, [im.resize((64, 48), Image.LANCZOS)
                                                                         for im in test2], (128, 96),
                                               [np.asarray(im) for im in test2])

    if args.run and "gan" in wanted:
        from neighbourhoods.thumbnails.source import load_source
        src = load_source(args.run_workspace or ws, args.run)
        classes = [k % len(src.class_names) for k in range(n)]
        samples = [Image.fromarray(a) for a in src.sample(classes, list(range(n)))]
        results["protocols"]["gan"] = compare("gan", ref2_feats, samples, (128, 96))
        results["gan_run"] = {"run": src.label, "images_seen": src.images_seen, "generator_res": list(src.res)}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
