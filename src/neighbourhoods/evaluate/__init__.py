"""`neighbourhoods evaluate`: how real do a run's samples look, and are they new?

Against the held-out split (photos the run never trained on), in the standard FID Inception
space (inception.py for the weights and the preprocessing protocol):

- FID, and KID as mean and std over random subsets (metrics.py);
- precision and recall (Kynkaanniemi et al., k=3), in the same Inception space;
- per-city KID for cities with enough held-out photos, and each one's within-city diversity
  (mean pairwise Inception distance among its samples over the same among its held-out photos;
  1.0 = as varied as reality, near 0 = one house whatever the seed);
- the real-vs-real floor: the same metrics between a sample of the training photos and the
  held-out photos, i.e. what a perfect generator would score at this N;
- novelty (novelty.py): each sample's nearest training photo by cosine similarity in the
  Inception and the EfficientNet-Lite0 spaces, and the memorisation rate in each.

Generated samples are spread over cities in the held-out split's proportions (a city the run
has no class of is drawn from its "(any city)" class), so real and generated sets describe
the same mix of cities; sample i uses seed `seed + i`, so an evaluation is reproducible.

Results go to WS/runs/<run>/eval/<images_seen:010d>/metrics.json, with novelty.npz beside it
(the most memorised-looking samples and their nearest photos, for the report).

The cheap KID for training curves (TrainConfig.kid_every) is metrics/quick_kid.py.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.prepared import load_label_names, load_split
from neighbourhoods.core.resolution import res_name
from neighbourhoods.core.workspace import Workspace, atomic_path, atomic_write_json, open_workspace
from neighbourhoods.metrics import scores as metrics
from neighbourhoods.metrics.features import SPACES, load_space, split_features
from neighbourhoods.metrics.novelty import NoveltyIndex, memorisation_rate
from neighbourhoods.metrics.quick_kid import (  # noqa: F401 (the API)
    allocate,
    class_of_label,
    quick_kid,
    training_kid,
)
from neighbourhoods.models import runs
from neighbourhoods.models.runs import eval_dir, latest_evaluation  # noqa: F401 (the API)


@dataclass
class EvaluateConfig:
    n: int = 2000                 # generated samples (the real side is every held-out photo)
    seed: int = 0                 # sample i uses seed + i
    kid_subsets: int = 100        # KID: random subsets averaged (their std is reported)
    kid_subset_size: int = 1000   # KID: rows drawn per subset, capped by the smaller set
    pr_k: int = 3                 # precision/recall: k-th nearest neighbour radius
    min_city_holdout: int = 25    # per-city KID only for cities with at least this many held-out photos
    percentile: float = 99.0      # memorisation threshold: percentile of held-out photos' nearest-train similarity
    figure_pairs: int = 24        # most train-like samples kept (with their nearest photos) for the report
    batch_size: int = 32          # images per feature-network batch
    device: str = "cpu"           # "cpu" or "cuda[:N]" for the generator and the feature networks
    size: tuple[int, int] | None = None   # (W, H): score thumbnails as served at this size (None: the samples)
    upscale: str | None = None    # the upscaler of the served path (None: what generate and serve use)
    fmt: str = "jpg"              # the served encoding (decoded again before scoring)


def sample_images(gen: runs.LoadedGenerator, classes: np.ndarray, seeds: np.ndarray, batch_size: int = 64,
                  progress: bool = True) -> np.ndarray:
    out = np.empty((len(classes), gen.res[0], gen.res[1], 3), dtype=np.uint8)
    for start in tqdm(range(0, len(classes), 256), desc="sampling", unit="chunk", disable=not progress):
        stop = start + 256
        out[start:stop] = runs.sample(gen, classes[start:stop].tolist(), seeds[start:stop].tolist(), batch_size)
    return out


def _kid_dict(real: np.ndarray, gen: np.ndarray, cfg: EvaluateConfig) -> dict:
    mean, std = metrics.kid(real, gen, subsets=cfg.kid_subsets, subset_size=cfg.kid_subset_size, seed=cfg.seed)
    return {"mean": mean, "std": std, "subset_size": int(min(cfg.kid_subset_size, len(real), len(gen)))}


# --- the evaluation -----------------------------------------------------------------------------
def evaluate(workspace: Workspace | str, run: str, config: EvaluateConfig | None = None,
             progress: bool = True) -> dict:
    """Evaluate the run's latest generator; writes and returns the metrics (see module doc)."""
    cfg = config or EvaluateConfig()
    if cfg.n < max(cfg.pr_k + 1, 2):
        raise NeighbourhoodsError(f"--n {cfg.n} is too small: need at least {max(cfg.pr_k + 1, 2)} samples")
    ws = workspace if isinstance(workspace, Workspace) else open_workspace(workspace)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    run_dir = runs.resolve_run(ws, run)
    gen = runs.load_generator(run_dir, device=cfg.device)
    res = tuple(gen.res)

    holdout_count = len(load_split(ws, res, "holdout"))
    if holdout_count < 2:
        raise NeighbourhoodsError(
            f"only {holdout_count} held-out photos at {res_name(res)}: evaluation needs photos the run never "
            "trained on; re-run ingest with --holdout > 0 (cities need at least --holdout-min photos)")

    # Real features (cached per workspace), then the generated samples.
    spaces = {name: load_space(name, device=cfg.device, batch_size=cfg.batch_size) for name in SPACES}
    real = {}
    for name, space in spaces.items():
        real[name] = {split: split_features(ws, res, split, space, progress=progress) for split in ("holdout", "train")}
    holdout_feats, holdout_ids, holdout_labels = real["inception"]["holdout"]
    label_names = load_label_names(ws)
    lut = class_of_label(label_names, gen.class_names, gen.city_map)
    holdout_class = lut[holdout_labels]            # labels of -1 index the lut's last slot
    usable = holdout_class >= 0
    timings["real_features_s"] = time.monotonic() - t0

    t = time.monotonic()
    per_class = allocate(np.bincount(holdout_class[usable], minlength=len(gen.class_names)), cfg.n)
    gen_classes = np.repeat(np.arange(len(gen.class_names)), per_class)
    seeds = cfg.seed + np.arange(cfg.n, dtype=np.int64)
    images = sample_images(gen, gen_classes, seeds, progress=progress)
    timings["sampling_s"] = time.monotonic() - t
    t = time.monotonic()
    gen_feats = {name: space.extract(images, progress=progress, desc=f"{name} features of samples")
                 for name, space in spaces.items()}
    timings["sample_features_s"] = time.monotonic() - t

    # Quality, in the Inception space: of the samples themselves, or (--size) of the thumbnails
    # as generate and serve make them, against the held-out photos brought to that size.
    t = time.monotonic()
    served = None
    if cfg.size is not None:
        served = served_quality_inputs(ws, res, cfg, images, holdout_ids, real["inception"]["train"][1],
                                       spaces["inception"], progress)
        holdout_feats = served["holdout"]
        real["inception"]["train"] = (served["train"],) + tuple(real["inception"]["train"][1:])
        g = served["generated"]
    else:
        g = gen_feats["inception"]
    real_inc = holdout_feats[usable]
    precision, recall = metrics.precision_recall(real_inc, g, k=cfg.pr_k)
    quality = {"fid": metrics.fid(real_inc, g), "kid": _kid_dict(real_inc, g, cfg),
               "precision": precision, "recall": recall}
    train_inc = real["inception"]["train"][0]
    rng = np.random.default_rng(cfg.seed)
    floor_rows = rng.choice(len(train_inc), min(cfg.n, len(train_inc)), replace=False)
    floor = None
    if len(floor_rows) > cfg.pr_k:
        fp, fr = metrics.precision_recall(real_inc, train_inc[floor_rows], k=cfg.pr_k)
        floor = {"n": int(len(floor_rows)), "fid": metrics.fid(real_inc, train_inc[floor_rows]),
                 "kid": _kid_dict(real_inc, train_inc[floor_rows], cfg), "precision": fp, "recall": fr}
    cities = []
    for label, name in enumerate(label_names):
        rows = (holdout_labels == label) & usable
        cls = int(lut[label])
        if rows.sum() < cfg.min_city_holdout or cls < 0 or gen.class_names[cls] != name:
            continue
        city_gen = g[gen_classes == cls]
        if len(city_gen) < 2:
            continue
        cities.append({"city": name, "holdout": int(rows.sum()), "generated": int(len(city_gen)),
                       "kid": _kid_dict(holdout_feats[rows], city_gen, cfg),
                       "diversity": metrics.diversity_ratio(holdout_feats[rows], city_gen)})
    # Within-city variety (1.0 = as varied as the city's real photos), over the cities above.
    quality["within_city_diversity"] = float(np.mean([c["diversity"] for c in cities])) if cities else None
    timings["quality_s"] = time.monotonic() - t

    # Novelty, in both spaces.
    t = time.monotonic()
    novelty, nearest = {}, {}
    for name, space in spaces.items():
        index = NoveltyIndex.build(ws, res, space=name, percentile=cfg.percentile, progress=progress,
                                   device=cfg.device, extractor=space)
        sims, ids = index.nearest_to_features(gen_feats[name])
        nearest[name] = (sims, ids)
        novelty[name] = {"threshold": index.threshold, "memorisation_rate": memorisation_rate(sims, index.threshold),
                         "nearest_similarity_median": float(np.median(sims)),
                         "nearest_similarity_max": float(sims.max()),
                         "holdout_calibration_photos": int(len(index.holdout_photo_ids)),
                         "excluded_near_duplicates": index.excluded_near_duplicates,
                         "holdout_similarity": index.holdout_similarity}
    flagged = np.zeros(cfg.n, dtype=bool)
    for name in spaces:
        flagged |= nearest[name][0] > novelty[name]["threshold"]
    novelty["either_space_rate"] = float(flagged.mean())
    timings["novelty_s"] = time.monotonic() - t
    timings["total_s"] = time.monotonic() - t0

    result = {
        "run": run_dir.name, "run_dir": str(run_dir), "images_seen": int(gen.images_seen), "res": list(res),
        "n_generated": int(cfg.n), "n_holdout": int(usable.sum()), "n_train": int(len(train_inc)),
        "holdout_without_class": int((~usable).sum()),
        "feature_protocol": {name: space.protocol for name, space in spaces.items()},
        "config": asdict(cfg), "scored_at": (f"{cfg.size[0]}x{cfg.size[1]} thumbnails ({served['upscale']}, "
                                             f"{cfg.fmt})" if served else f"{res_name(res)} samples"),
        "quality": quality, "real_vs_real_floor": floor, "per_city": cities,
        "novelty": {k: ({kk: vv for kk, vv in v.items() if kk != "holdout_similarity"} if isinstance(v, dict) else v)
                    for k, v in novelty.items()},
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out_dir = eval_dir(run_dir, gen.images_seen)
    _write_novelty_figure_data(out_dir / "novelty.npz", images, gen_classes, gen.class_names, nearest, novelty, cfg)
    name = "metrics.json" if cfg.size is None else f"metrics-{cfg.size[0]}x{cfg.size[1]}.json"   # beside, not over
    result["path"] = str(out_dir / name)
    atomic_write_json(out_dir / name, result)
    return result


def served_quality_inputs(ws: Workspace, res: tuple[int, int], cfg: EvaluateConfig, images: np.ndarray,
                          holdout_ids: np.ndarray, train_ids: np.ndarray, space, progress: bool) -> dict:
    """Inception features at the served size: the samples through the exact thumbnail path
    (upscaler, crop to fill, encode, decode), and the real photos from their files, cropped to
    fill the same size (so the real side is what a photo on the page would look like). The train
    photos (for the real-vs-real floor) are a sample of at most `cfg.n`."""
    size = tuple(cfg.size)
    thumbs, upscale = served_thumbnails(ws, res, images, size, cfg.upscale, cfg.fmt, progress)
    # the real-vs-real floor below scores these train rows (the same draw): only they are read
    rng = np.random.default_rng(cfg.seed)
    floor_rows = rng.choice(len(train_ids), min(cfg.n, len(train_ids)), replace=False)
    out = {"upscale": upscale, "generated": space.extract(thumbs, progress=progress, desc="inception of thumbnails"),
           "holdout": space.extract(real_photos_at(ws, holdout_ids, size, progress), progress=progress,
                                    desc="inception of held-out photos at served size")}
    out["train"] = np.zeros((len(train_ids), out["holdout"].shape[1]), np.float32)
    out["train"][floor_rows] = space.extract(real_photos_at(ws, train_ids[floor_rows], size, progress),
                                             progress=progress, desc="inception of train photos at served size")
    return out


def served_thumbnails(ws: Workspace, res: tuple[int, int], images: np.ndarray, size: tuple[int, int],
                      upscale: str | None = None, fmt: str = "jpg", progress: bool = True) -> tuple[np.ndarray, str]:
    """(uint8 N x H x W x 3 thumbnails, upscaler name): samples through generate's and serve's
    path at `size` (W, H): the workspace's upscaler, crop to fill, encoded, then decoded."""
    from neighbourhoods.thumbnails.postprocess import encode, parse_format
    from neighbourhoods.thumbnails.upscalers import get_upscaler

    fmt = parse_format(fmt)
    upscaler = get_upscaler(upscale, workspace=ws.root, res=res)
    out = np.empty((len(images), size[1], size[0], 3), np.uint8)
    for i, im in enumerate(tqdm(images, desc="thumbnails", disable=not progress)):
        data = encode(upscaler.resize(Image.fromarray(np.ascontiguousarray(im)), tuple(size)), fmt)
        out[i] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return out, upscaler.name


def real_photos_at(ws: Workspace, photo_ids: np.ndarray, size: tuple[int, int], progress: bool = True) -> np.ndarray:
    """uint8 N x H x W x 3: catalogued photos read from their files (EXIF-turned), cropped to
    fill `size` (W, H), centred, and resized with Lanczos as ingest does."""
    from neighbourhoods.core import catalog
    from neighbourhoods.thumbnails.upscalers import cover_box

    con = catalog.connect_readonly(ws.catalog_path)
    try:
        paths = {pid: catalog.fs_path(p) for pid, p in con.execute("SELECT id, path FROM photos WHERE status = 'kept'")}
    finally:
        con.close()
    out = np.empty((len(photo_ids), size[1], size[0], 3), np.uint8)
    for i, pid in enumerate(tqdm(photo_ids, desc="real photos at served size", disable=not progress)):
        try:
            with Image.open(paths[int(pid)]) as img:
                img = ImageOps.exif_transpose(img).convert("RGB")
                out[i] = np.asarray(img.resize(size, Image.LANCZOS, box=cover_box(img.size, size)))
        except (OSError, KeyError) as e:
            raise NeighbourhoodsError(f"evaluate --size reads the held-out photos' files: photo {int(pid)} "
                                      f"({paths.get(int(pid), 'not in the catalog')}) failed: {e}") from None
    return out


def _write_novelty_figure_data(path: Path, images: np.ndarray, classes: np.ndarray, class_names: list[str],
                               nearest: dict, novelty: dict, cfg: EvaluateConfig) -> None:
    """The samples most similar to a training photo (by Inception similarity), for the report."""
    order = np.argsort(-nearest["inception"][0], kind="stable")[: cfg.figure_pairs]
    arrays = {"images": images[order], "classes": classes[order].astype(np.int64),
              "class_names": np.array(class_names, dtype=str)}
    for name, (sims, ids) in nearest.items():
        arrays[f"{name}_similarity"] = sims[order].astype(np.float32)
        arrays[f"{name}_photo_id"] = ids[order].astype(np.int64)
        arrays[f"{name}_all_similarity"] = sims.astype(np.float32)
        arrays[f"{name}_holdout_similarity"] = np.asarray(novelty[name]["holdout_similarity"], dtype=np.float32)
        arrays[f"{name}_threshold"] = np.array(novelty[name]["threshold"], dtype=np.float64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def describe(result: dict) -> str:
    q, n = result["quality"], result["novelty"]
    lines = [f"run {result['run']} at {result['images_seen'] / 1000:.1f} kimg, {res_name(tuple(result['res']))}: "
             f"{result['n_generated']} samples vs {result['n_holdout']} held-out photos, scored as "
             f"{result.get('scored_at', 'samples')}",
             f"  FID {q['fid']:.2f}   KID {q['kid']['mean'] * 1000:.2f} ± {q['kid']['std'] * 1000:.2f} (x1e-3)   "
             f"precision {q['precision']:.3f}   recall {q['recall']:.3f}"]
    floor = result.get("real_vs_real_floor")
    if floor:
        lines.append(f"  real-vs-real floor ({floor['n']} training photos): FID {floor['fid']:.2f}   "
                     f"KID {floor['kid']['mean'] * 1000:.2f} ± {floor['kid']['std'] * 1000:.2f}   "
                     f"precision {floor['precision']:.3f}   recall {floor['recall']:.3f}")
    if q.get("within_city_diversity") is not None:
        lines.append(f"  within-city diversity {q['within_city_diversity']:.2f} (1.0 = as varied as the city's "
                     f"real photos; mean over {len(result['per_city'])} cities)")
    for city in result["per_city"]:
        diversity = f", diversity {city['diversity']:.2f}" if "diversity" in city else ""
        lines.append(f"  {city['city']}: KID {city['kid']['mean'] * 1000:.2f} ± {city['kid']['std'] * 1000:.2f} "
                     f"({city['generated']} samples, {city['holdout']} held out{diversity})")
    for name in SPACES:
        s = n[name]
        lines.append(f"  memorised ({name}): {s['memorisation_rate'] * 100:.1f}% above threshold {s['threshold']:.4f} "
                     f"(median nearest similarity {s['nearest_similarity_median']:.4f})")
    lines.append(f"  memorised in either space: {n['either_space_rate'] * 100:.1f}%   "
                 f"({result['timings']['total_s']:.0f} s)   -> {result['path']}")
    return "\n".join(lines)
