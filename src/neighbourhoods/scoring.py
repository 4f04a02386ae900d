"""How good is a generator, and is it new? The one scoring protocol of the project.

`neighbourhoods evaluate`, bench/quality.py and the training curve's KID (TrainConfig.kid_every)
all score a generator through `score` here, so a figure of one is reproduced by another:

- which cities: the held-out split's proportions (`allocate`, largest remainder), each held-out
  photo's city mapped to the class the run draws it from through the run's city map (a city
  without a class of its own is drawn from "(any city)": `class_of_label`);
- which seeds: a class's k samples have seeds seed .. seed + k - 1 (its first k listings, as
  `generate` draws them), samples in class order;
- which size: the samples at the run's resolution, or (`size` W x H) the thumbnails as generate
  and serve make them (`served_thumbnails`: the upscaler, crop to fill, encoded, decoded again)
  against the held-out photos read from their files and cropped to fill that size
  (`real_photos_at`);
- which spaces: quality in the standard FID Inception space (metrics/features.py); novelty in
  each of `novelty_spaces` (Inception, EfficientNet-Lite0 at 224 and at the images' own size);
- what: FID, KID (mean and std over random subsets), precision/recall (k=3), per-city KID,
  within-city diversity and near-duplicate share (same-city sample pairs more alike, in the
  Inception space, than the 99th percentile of the city's held-out photo pairs) for cities with at least `min_city_holdout` held-out photos, the
  real-vs-real floor (min(n, #train) training photos against the held-out ones: what a perfect
  generator would score at this n), and novelty (each sample's nearest training photo, the
  memorisation rate against a threshold calibrated on the held-out photos).

Every part but KID can be switched off (ScoringConfig): the training curve's estimate
(`training_score`) is KID alone on a few hundred samples, at the same protocol otherwise, so
`neighbourhoods evaluate --n 300` of the same weights gives the same KID.

`score_run` scores a run's latest generator and writes what `report` reads:
WS/runs/<run>/eval/<images_seen:010d>/metrics.json (metrics-WxH.json for a served size, beside
it) and novelty.npz (the most train-like samples beside their nearest photos).
"""

from __future__ import annotations

import functools
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

from neighbourhoods.core.cities import CityMap
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.prepared import load_label_names, load_split
from neighbourhoods.core.resolution import res_name
from neighbourhoods.core.workspace import Workspace, atomic_path, atomic_write_json, open_workspace
from neighbourhoods.metrics import scores as metrics
from neighbourhoods.metrics.features import SPACES, FeatureSpace, load_space, photo_features, split_features
from neighbourhoods.metrics.novelty import NoveltyIndex, memorisation_rate
from neighbourhoods.models import runs
from neighbourhoods.models.runs import eval_dir
from neighbourhoods.thumbnails.guard import BELOW_GATE, NEAR_COPY, SAME_HOUSE
from neighbourhoods.thumbnails.realism import QUANTILE as REALISM_QUANTILE

NOVELTY_FILE = "novelty.npz"


@dataclass
class ScoringConfig:
    n: int = 2000                 # generated samples (the real side is every held-out photo)
    against: str = "holdout"      # the real photos: "holdout", or "train" (a fixed draw of TRAIN_REFERENCE
                                  # training photos: the training curve, which picks the best snapshot, so
                                  # the held-out photos judge only the snapshot it picked)
    seed: int = 0                 # a class's k samples use seed .. seed + k - 1; also KID's subsets, the floor's draw
    size: tuple[int, int] | None = None   # (W, H): score thumbnails as served at this size (None: the samples)
    upscale: str | None = None    # the upscaler of the served path (None: what generate and serve use)
    fmt: str = "jpg"              # the served encoding (decoded again before scoring)
    kid_subsets: int = 100        # KID: random subsets averaged (their std is reported)
    kid_subset_size: int = 1000   # KID: rows drawn per subset, capped by the smaller set
    fid: bool = True              # FID (a 2048 x 2048 eigendecomposition: seconds on a CPU)
    precision_recall: bool = True  # precision and recall, k-th nearest-neighbour balls
    pr_k: int = 3                 # precision/recall: k-th nearest neighbour radius
    per_city: bool = True         # per-city KID and within-city diversity
    min_city_holdout: int = 25    # ... for cities with at least this many held-out photos
    near_duplicate_percentile: float = 99.0   # same-city pairs above this percentile of the city's real pairs' similarity
    floor: bool = True            # the real-vs-real floor (reads min(n, #train) training photos)
    novelty_spaces: tuple[str, ...] = SPACES   # nearest training photo in each space; () = no novelty
    percentile: float = 99.0      # memorisation threshold: percentile of held-out photos' nearest-train similarity
    figure_pairs: int = 24        # most train-like samples kept (with their nearest photos) for the report
    batch_size: int = 32          # images per feature-network batch
    device: str = "cpu"           # "cpu" or "cuda[:N]" for the generator and the feature networks
    gated: bool = False           # also score the set as served through the guard (novelty + realism gate)
    realism_quantile: float = REALISM_QUANTILE   # ... with the realism gate at this quantile (0: the novelty guard alone)


TRAIN_REFERENCE = 2000   # training photos the training curve is measured against (a fixed draw)


def training_config(n: int = 300, seed: int = 0, device: str = "cpu") -> ScoringConfig:
    """The training curve's estimate: KID alone (no FID, precision/recall, cities, floor, novelty),
    against training photos."""
    return ScoringConfig(n=n, seed=seed, device=device, against="train", fid=False, precision_recall=False,
                         per_city=False, floor=False, novelty_spaces=())


# --- which cities, which seeds ------------------------------------------------------------------
def class_of_label(label_names: list[str], class_names: list[str], city_map: CityMap | None = None) -> np.ndarray:
    """For each workspace label (and -1 = no label, at the end): the run's class, or -1 if none.

    Through the run's city map (a pooled city -> "(any city)"); without one, every label that is
    not a class is drawn from "(any city)" where the run has it.
    """
    return (city_map or CityMap.build(class_names)).class_lut(label_names)


def allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Split n over classes in proportion to `counts` (largest remainder, deterministic)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise NeighbourhoodsError("no held-out photos of any city the run was trained on")
    exact = counts / counts.sum() * n
    out = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - out), kind="stable")[: n - out.sum()]:
        out[i] += 1
    return out


def sample_plan(holdout_class: np.ndarray, n_classes: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(class, seed) of each of the n samples: classes in the proportions of `holdout_class`
    (each held-out photo's class, -1 for none), in class order; a class's k samples have seeds
    seed .. seed + k - 1, its first k listings as generate gives them."""
    usable = holdout_class >= 0
    per_class = allocate(np.bincount(holdout_class[usable], minlength=n_classes), n)
    starts = np.repeat(np.cumsum(per_class) - per_class, per_class)
    return np.repeat(np.arange(n_classes), per_class), seed + np.arange(n, dtype=np.int64) - starts


def sample_images(model: torch.nn.Module, classes: np.ndarray, seeds: np.ndarray, progress: bool = True) -> np.ndarray:
    """uint8 N x H x W x 3 from `model` in eval mode (its train/eval mode is restored after)."""
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in tqdm(range(0, len(classes), 256), desc="sampling", unit="chunk", disable=not progress):
            chunks.append(runs.generate_images(model, classes[start:start + 256].tolist(),
                                               seeds[start:start + 256].tolist(), batch_size=64))
        return np.concatenate(chunks)
    finally:
        model.train(was_training)


# --- the served path ----------------------------------------------------------------------------
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
            raise NeighbourhoodsError(f"scoring at a served size reads the photos' files: photo {int(pid)} "
                                      f"({paths.get(int(pid), 'not in the catalog')}) failed: {e}") from None
    return out


def served_real_features(ws: Workspace, photo_ids: np.ndarray, size: tuple[int, int], space: FeatureSpace,
                         progress: bool = True) -> np.ndarray:
    """Features of photos at a served size (real_photos_at), cached per workspace and size in
    WS/embeddings/eval-<space>-served-<W>x<H>.npz like the prepared photos' (metrics/features.py)."""
    photos = real_photos_at(ws, photo_ids, size, progress)
    path = ws.embeddings_dir / f"eval-{space.name}-served-{size[0]}x{size[1]}.npz"
    return photo_features(ws, (size[1], size[0]), photos, np.arange(len(photos)), np.asarray(photo_ids, np.int64),
                          space, progress=progress, path=path)


# --- the real side ------------------------------------------------------------------------------
@dataclass
class RealSide:
    """The held-out photos (and the floor's training photos) in the Inception space, at the scored size;
    against="train": the training photos' fixed draw in their place."""
    label_names: list[str]         # the workspace's labels
    holdout: np.ndarray            # float32 features of every selected held-out photo (or the training draw)
    holdout_labels: np.ndarray     # their labels (-1: none)
    n_train: int                   # selected training photos
    floor: np.ndarray | None       # features of min(n, n_train) training photos (config.seed's draw), or None


def _train_features(ws: Workspace, res: tuple[int, int], train, rows: np.ndarray, cfg: ScoringConfig,
                    space: FeatureSpace, progress: bool) -> np.ndarray:
    """Features of the training photos `rows` at the scored size (the prepared arrays, or the files
    cropped to cfg.size)."""
    if cfg.size is None:
        return photo_features(ws, res, train.images, train.rows[rows], train.photo_ids[rows], space, progress=progress)
    return served_real_features(ws, train.photo_ids[rows], tuple(cfg.size), space, progress)


def real_side(ws: Workspace, res: tuple[int, int], cfg: ScoringConfig, progress: bool = True) -> RealSide:
    if cfg.against not in ("holdout", "train"):
        raise NeighbourhoodsError(f"unknown real side {cfg.against!r}: use holdout or train")
    space = load_space("inception", device=cfg.device, batch_size=cfg.batch_size)
    train = load_split(ws, res, "train")
    if cfg.against == "train":   # a fixed draw of training photos (not the seed's: the curve's yardstick stays put)
        if len(train) < 2:
            raise NeighbourhoodsError(f"only {len(train)} training photos at {res_name(res)}")
        rows = np.sort(np.random.default_rng(0).choice(len(train), min(TRAIN_REFERENCE, len(train)), replace=False))
        return RealSide(label_names=load_label_names(ws), holdout=_train_features(ws, res, train, rows, cfg, space,
                                                                                  progress),
                        holdout_labels=train.labels[rows], n_train=len(train), floor=None)
    holdout = load_split(ws, res, "holdout")
    if len(holdout) < 2:
        raise NeighbourhoodsError(
            f"only {len(holdout)} held-out photos at {res_name(res)}: scoring needs photos the run never "
            "trained on; re-run ingest with --holdout > 0 (cities need at least --holdout-min photos)")
    floor_rows = np.random.default_rng(cfg.seed).choice(len(train), min(cfg.n, len(train)), replace=False)
    if cfg.size is None:
        feats = split_features(ws, res, "holdout", space, progress=progress)[0]
    else:
        feats = served_real_features(ws, holdout.photo_ids, tuple(cfg.size), space, progress)
    floor = _train_features(ws, res, train, floor_rows, cfg, space, progress) if cfg.floor and len(floor_rows) else None
    return RealSide(label_names=load_label_names(ws), holdout=feats, holdout_labels=holdout.labels, n_train=len(train),
                    floor=floor)


# --- the sheet of the set as served -------------------------------------------------------------
SHEET_CITIES, SHEET_COLUMNS = 4, 6   # the cities with the most samples; tiles per row
SHORT = {NEAR_COPY: "near-copy of a photo", BELOW_GATE: "below the realism gate",
         SAME_HOUSE: "same house as a listing before"}   # guard.Sample.rejected -> its caption


def sheet_file(size: tuple[int, int] | None) -> str:
    """served.jpg for the samples' own size; served-WxH.jpg for thumbnails at (W, H), beside metrics."""
    return "served.jpg" if size is None else f"served-{size[0]}x{size[1]}.jpg"


def _captioned(image: np.ndarray, caption: str) -> Image.Image:
    tile = Image.fromarray(np.ascontiguousarray(image))
    if caption:
        draw = ImageDraw.Draw(tile)
        draw.rectangle((0, tile.height - 14, tile.width, tile.height), fill=(0, 0, 0))
        draw.text((3, tile.height - 13), caption, fill=(255, 255, 255))
    return tile


def served_sheet(ws: Workspace, res: tuple[int, int], drawn: np.ndarray, samples: list, classes: np.ndarray,
                 holdout_class: np.ndarray, class_names: list[str], cfg: ScoringConfig) -> Image.Image:
    """What the gates do, to look at: for each of the SHEET_CITIES cities with the most samples, four
    rows of SHEET_COLUMNS at the scored size: held-out photos, the first samples as drawn, the same
    listings as served (replacements captioned), and first attempts the guard rejected (with why)."""
    from neighbourhoods.core.grid import grid

    size = tuple(cfg.size) if cfg.size is not None else (res[1], res[0])
    counts = np.bincount(classes, minlength=len(class_names))
    picks = [int(c) for c in np.argsort(-counts, kind="stable")[:SHEET_CITIES] if counts[c]]
    holdout_ids = load_split(ws, res, "holdout").photo_ids
    blank = np.full((size[1], size[0], 3), 255, np.uint8)

    def at_size(images: np.ndarray) -> np.ndarray:
        if not len(images):
            return images
        if cfg.size is None:
            return images
        return served_thumbnails(ws, res, images, size, cfg.upscale, cfg.fmt, progress=False)[0]

    def row(tiles: list) -> list:
        return (tiles + [Image.fromarray(blank)] * SHEET_COLUMNS)[:SHEET_COLUMNS]

    tiles, names = [], []
    for c in picks:
        mine = np.flatnonzero(classes == c)
        shown = mine[:SHEET_COLUMNS]
        rejected = [i for i in mine if samples[i].rejected][:SHEET_COLUMNS]
        photos = holdout_ids[holdout_class == c][:SHEET_COLUMNS]
        real = real_photos_at(ws, photos, size, progress=False) if len(photos) else []
        served = at_size(np.stack([samples[i].image for i in shown]))
        notes = ["" if samples[i].used_seed == samples[i].seed else
                 "no attempt passed the gate" if not samples[i].passed else
                 "no attempt was another house" if not samples[i].distinct else
                 f"replaced: {SHORT[samples[i].rejected]}" for i in shown]
        tiles += row([_captioned(im, "") for im in real])
        tiles += row([_captioned(im, "") for im in at_size(drawn[shown])])
        tiles += row([_captioned(im, note) for im, note in zip(served, notes)])
        tiles += row([_captioned(im, SHORT[samples[i].rejected]) for im, i in zip(at_size(drawn[rejected]), rejected)])
        n_rejected = sum(bool(samples[i].rejected) for i in mine)
        names += [f"{class_names[c]}: held out", "  as drawn", "  as served", f"  rejected: {n_rejected}"]
    return grid(tiles, SHEET_COLUMNS, pad=3, border=3, row_names=names)


# --- the score ----------------------------------------------------------------------------------
@dataclass
class Scores:
    figures: dict                  # what metrics.json holds: quality, floor, per-city, novelty, ...
    images: np.ndarray             # the samples scored, uint8 N x H x W x 3 at the run's resolution
    classes: np.ndarray            # each sample's class (sample_plan gives its seed)
    nearest: dict = field(default_factory=dict)   # space -> (similarity, photo id) of each sample's nearest train photo
    holdout_similarity: dict = field(default_factory=dict)   # space -> the held-out photos' (the calibration)
    sheet: Image.Image | None = None    # config.gated: the sheet of the set as drawn, as served and rejected


def _kid(real: np.ndarray, gen: np.ndarray, cfg: ScoringConfig) -> dict:
    mean, std = metrics.kid(real, gen, subsets=cfg.kid_subsets, subset_size=cfg.kid_subset_size, seed=cfg.seed)
    return {"mean": mean, "std": std, "subset_size": int(min(cfg.kid_subset_size, len(real), len(gen)))}


def _quality(real: np.ndarray, gen: np.ndarray, cfg: ScoringConfig) -> dict:
    out = {"fid": metrics.fid(real, gen) if cfg.fid else None, "kid": _kid(real, gen, cfg),
           "precision": None, "recall": None}
    if cfg.precision_recall:
        out["precision"], out["recall"] = metrics.precision_recall(real, gen, k=cfg.pr_k)
    return out


def _per_city(real: RealSide, lut: np.ndarray, usable: np.ndarray, classes: np.ndarray, g: np.ndarray,
              class_names: list[str], cfg: ScoringConfig) -> list[dict]:
    """KID, within-city diversity and near-duplicate share of each city with enough held-out photos."""
    cities = []
    for label, name in enumerate(real.label_names if cfg.per_city else []):
        rows = (real.holdout_labels == label) & usable
        cls = int(lut[label])
        if rows.sum() < cfg.min_city_holdout or cls < 0 or class_names[cls] != name:
            continue
        city_gen = g[classes == cls]
        if len(city_gen) < 2:
            continue
        cities.append({"city": name, "holdout": int(rows.sum()), "generated": int(len(city_gen)),
                       "kid": _kid(real.holdout[rows], city_gen, cfg),
                       "diversity": metrics.diversity_ratio(real.holdout[rows], city_gen),
                       "near_duplicates": metrics.near_duplicate_share(real.holdout[rows], city_gen,
                                                                       cfg.near_duplicate_percentile)})
    return cities


def _city_summary(quality: dict, cities: list[dict]) -> None:
    # Within-city variety (1.0 = as varied as the city's real photos) and the share of same-city
    # sample pairs that are one house ((100 - percentile) % for the real photos), over those cities.
    quality["within_city_diversity"] = float(np.mean([c["diversity"] for c in cities])) if cities else None
    quality["near_duplicates"] = float(np.mean([c["near_duplicates"] for c in cities])) if cities else None


def gate_samples(ws: Workspace, res: tuple[int, int], model: torch.nn.Module, class_names: list[str],
                 city_map: CityMap | None, classes: np.ndarray, seeds: np.ndarray, cfg: ScoringConfig,
                 progress: bool = True) -> tuple[list, object]:
    """The (class, seed) pairs as generate and serve give them: through the guard (novelty guard,
    realism gate at cfg.realism_quantile, distinct listings: each class's seeds are its listings,
    so a block's seeds before the first one asked for are drawn too), replaced seeds and all.
    (Samples, guard)."""
    from neighbourhoods.core.cities import CityMatch
    from neighbourhoods.thumbnails.distinct import Ledgers
    from neighbourhoods.thumbnails.guard import load_guard, render_listings
    from neighbourhoods.thumbnails.source import Source

    def sample(c, s):
        return runs.generate_images(model, list(c), list(s), batch_size=64)

    source = Source(list(class_names), tuple(res), sample, fingerprint="", city_map=city_map)
    guard = load_guard(ws.root, source, progress=progress, device=cfg.device, realism_quantile=cfg.realism_quantile)
    was_training = model.training
    model.eval()
    try:
        out: list = [None] * len(classes)
        ledgers = Ledgers(capacity=10 ** 6)
        for c in tqdm(np.unique(classes), desc="gating", unit="city", disable=not progress):
            # each class as the city of its own name: its seeds are listings, distinct within their block
            rows = np.flatnonzero(classes == c)
            match = CityMatch(class_names[c], int(c), class_names[c], False)
            for i, s in zip(rows, render_listings(source, match, seeds[rows].tolist(), guard, ledgers)):
                out[i] = s
        return out, guard
    finally:
        model.train(was_training)


def score(ws: Workspace, res: tuple[int, int], model: torch.nn.Module, class_names: list[str],
          city_map: CityMap | None = None, config: ScoringConfig | None = None, progress: bool = True,
          real: RealSide | None = None) -> Scores:
    """Score the generator `model` (classes `class_names`, drawing the data's cities through
    `city_map`) at `res` against the workspace's held-out photos, by the protocol of the module
    doc. `real`: the real side already computed (real_side) for this config's size and seed."""
    cfg = config or ScoringConfig()
    least = max(cfg.pr_k + 1, 2) if cfg.precision_recall else 2
    if cfg.n < least:
        raise NeighbourhoodsError(f"--n {cfg.n} is too small: need at least {least} samples")
    unknown = [s for s in cfg.novelty_spaces if s not in SPACES]
    if unknown:
        raise NeighbourhoodsError(f"unknown feature space {unknown[0]!r}; choose from {', '.join(SPACES)}")
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    # The real side, then which cities and seeds to sample.
    real = real or real_side(ws, res, cfg, progress)
    lut = class_of_label(real.label_names, class_names, city_map)
    holdout_class = lut[real.holdout_labels]            # labels of -1 index the lut's last slot
    usable = holdout_class >= 0
    classes, seeds = sample_plan(holdout_class, len(class_names), cfg.n, cfg.seed)
    timings["real_features_s"] = time.monotonic() - t0

    # The samples, and their Inception features: of the samples themselves, or (size) of the
    # thumbnails as generate and serve make them.
    t = time.monotonic()
    images = sample_images(model, classes, seeds, progress)
    timings["sampling_s"] = time.monotonic() - t
    t = time.monotonic()
    inception = load_space("inception", device=cfg.device, batch_size=cfg.batch_size)
    native = {}
    upscaler = None
    if cfg.size is None:
        native["inception"] = g = inception.extract(images, progress=progress, desc="inception features of samples")
    else:
        thumbs, upscaler = served_thumbnails(ws, res, images, tuple(cfg.size), cfg.upscale, cfg.fmt, progress)
        g = inception.extract(thumbs, progress=progress, desc="inception of thumbnails")
    timings["sample_features_s"] = time.monotonic() - t

    # Quality against the held-out photos; the floor; per city.
    t = time.monotonic()
    real_inc = real.holdout[usable]
    quality = _quality(real_inc, g, cfg)
    floor = None
    if real.floor is not None and len(real.floor) > cfg.pr_k:
        floor = {"n": int(len(real.floor)), **_quality(real_inc, real.floor, cfg)}
    cities = _per_city(real, lut, usable, classes, g, class_names, cfg)
    _city_summary(quality, cities)
    timings["quality_s"] = time.monotonic() - t

    # The gated set: the same pairs as generate and serve give them (guard.render_samples), scored
    # the same way beside the ungated one; only replaced samples need new features.
    gated = samples = sheet = None
    if cfg.gated:
        t = time.monotonic()
        samples, guard = gate_samples(ws, res, model, class_names, city_map, classes, seeds, cfg, progress)
        gated_images = np.stack([s.image for s in samples])
        replaced = np.array([s.used_seed != s.seed for s in samples])
        g_gated = g.copy()
        if replaced.any():
            new = gated_images[replaced]
            if cfg.size is not None:
                new, _ = served_thumbnails(ws, res, new, tuple(cfg.size), cfg.upscale, cfg.fmt, progress)
            g_gated[replaced] = inception.extract(new, progress=progress, desc="inception of replacements")
        gated = {"realism_quantile": cfg.realism_quantile, "guard": guard.label,
                 "replaced": int(replaced.sum()), "accepted_share": float(1 - replaced.mean()),
                 "below_gate": int(sum(not s.passed for s in samples)),
                 "not_distinct": int(sum(not s.distinct for s in samples)), **_quality(real_inc, g_gated, cfg)}
        gated_cities = _per_city(real, lut, usable, classes, g_gated, class_names, cfg)
        _city_summary(gated, gated_cities)
        by_name = {c["city"]: c for c in gated_cities}
        for c in cities:
            if c["city"] in by_name:
                cls = class_names.index(c["city"])
                c["gated"] = {k: by_name[c["city"]][k] for k in ("kid", "diversity", "near_duplicates")}
                c["gated"]["accepted_share"] = float(1 - replaced[classes == cls].mean())
        if cfg.against == "holdout":
            sheet = served_sheet(ws, res, images, samples, classes, holdout_class, class_names, cfg)
        timings["gated_s"] = time.monotonic() - t

    # Novelty: of the samples themselves (it is about the generator, whatever the size served).
    t = time.monotonic()
    novelty, nearest, holdout_similarity = {}, {}, {}
    gated_flagged = np.zeros(cfg.n, dtype=bool)
    for name in cfg.novelty_spaces:
        space = load_space(name, device=cfg.device, batch_size=cfg.batch_size)
        if name not in native:
            native[name] = space.extract(images, progress=progress, desc=f"{name} features of samples")
        index = NoveltyIndex.build(ws, res, space=name, percentile=cfg.percentile, progress=progress,
                                   device=cfg.device, extractor=space)
        sims, ids = index.nearest_to_features(native[name])
        nearest[name], holdout_similarity[name] = (sims, ids), index.holdout_similarity
        if gated is not None:   # the set as served: only its replaced samples need new features
            features = native[name].copy()
            if replaced.any():
                features[replaced] = space.extract(gated_images[replaced], progress=progress,
                                                   desc=f"{name} features of replacements")
            gated_sims = index.nearest_to_features(features)[0]
            gated.setdefault("memorised", {})[name] = memorisation_rate(gated_sims, index.threshold)
            gated_flagged = gated_flagged | (gated_sims > index.threshold)
        novelty[name] = {"threshold": index.threshold, "memorisation_rate": memorisation_rate(sims, index.threshold),
                         "nearest_similarity_median": float(np.median(sims)),
                         "nearest_similarity_max": float(sims.max()),
                         "holdout_calibration_photos": int(len(index.holdout_photo_ids)),
                         "excluded_near_duplicates": index.excluded_near_duplicates}
    if novelty:
        flagged = np.zeros(cfg.n, dtype=bool)
        for name, (sims, _) in nearest.items():
            flagged |= sims > novelty[name]["threshold"]
        novelty["either_space_rate"] = float(flagged.mean())
        if gated is not None:
            gated["memorised_any_space"] = float(gated_flagged.mean())
    timings["novelty_s"] = time.monotonic() - t
    timings["total_s"] = time.monotonic() - t0

    figures = {
        "res": list(res), "n_generated": int(cfg.n), "n_holdout": int(usable.sum()), "n_train": int(real.n_train),
        "holdout_without_class": int((~usable).sum()),
        "feature_protocol": {name: load_space(name, device=cfg.device, batch_size=cfg.batch_size).protocol
                             for name in ("inception", *cfg.novelty_spaces)},
        "config": asdict(cfg), "scored_at": scored_at(cfg, res, upscaler),
        "quality": quality, "gated": gated, "real_vs_real_floor": floor, "per_city": cities,
        "novelty": novelty or None,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return Scores(figures=figures, images=images, classes=classes, nearest=nearest,
                  holdout_similarity=holdout_similarity, sheet=sheet)


def scored_at(cfg: ScoringConfig, res: tuple[int, int], upscaler: str | None = None) -> str:
    if cfg.size is None:
        return f"{res_name(res)} samples"
    return f"{cfg.size[0]}x{cfg.size[1]} thumbnails ({upscaler or cfg.upscale}, {cfg.fmt})"


def score_run(workspace: Workspace | str, run: str | Path, config: ScoringConfig | None = None,
              progress: bool = True, write: bool = True, snapshot: str = "best") -> dict:
    """Score a run's generator (`score`): its best snapshot where it keeps one, else (or with
    `snapshot` "last") its latest; with `write`, into its eval folder (module doc). Returns the
    figures with the run's name, folder, snapshot, images seen and (written) the file's path."""
    cfg = config or ScoringConfig()
    ws = workspace if isinstance(workspace, Workspace) else open_workspace(workspace)
    run_dir = runs.resolve_run(ws, str(run))
    gen = runs.load_generator(run_dir, device=cfg.device, snapshot=snapshot)
    scores = score(ws, tuple(gen.res), gen.model, gen.class_names, gen.city_map, cfg, progress=progress)
    result = {"run": run_dir.name, "run_dir": str(run_dir), "snapshot": gen.snapshot,
              "images_seen": int(gen.images_seen), **scores.figures}
    if write:
        out_dir = eval_dir(run_dir, gen.images_seen)
        if scores.nearest:
            write_novelty_figure(out_dir / NOVELTY_FILE, scores, gen.class_names, cfg.figure_pairs)
        if scores.sheet is not None:
            with atomic_path(out_dir / sheet_file(cfg.size)) as tmp:
                scores.sheet.save(tmp, format="JPEG", quality=90)
            result["sheet"] = str(out_dir / sheet_file(cfg.size))
        result["path"] = str(out_dir / metrics_file(cfg.size))
        atomic_write_json(out_dir / metrics_file(cfg.size), result)
    return result


@functools.lru_cache(maxsize=2)
def _training_real_side(ws_root: str, res: tuple[int, int], n: int, seed: int, device: str) -> RealSide | None:
    # Cached per process: training scores every kid_every images, and rereading the feature
    # cache (every photo's features) each time would cost more than the KID itself.
    try:
        return real_side(Workspace(Path(ws_root)), res, training_config(n, seed, device), progress=False)
    except NeighbourhoodsError:
        return None


def training_score(ws: Workspace | str, res: tuple[int, int], G_ema: torch.nn.Module, class_names: list[str],
                   city_map: CityMap | None = None, n: int = 300, seed: int = 0) -> dict | None:
    """The training curve's estimate: `score` of G_ema with training_config(n, seed) (KID alone,
    n samples, against a fixed draw of training photos, no novelty), or None where the draw has
    no photo of the run's classes.

    Returns the figures; ["quality"]["kid"] holds "mean" and "std". The same fixed seeds every
    call, so the curve moves only with the weights; `neighbourhoods evaluate --against train
    --n n --seed seed` of a snapshot's G_ema gives the same KID.
    """
    ws = ws if isinstance(ws, Workspace) else open_workspace(ws)
    device = str(next(G_ema.parameters()).device)
    real = _training_real_side(str(ws.root), tuple(res), n, seed, device)
    if real is None or not (class_of_label(real.label_names, class_names, city_map)[real.holdout_labels] >= 0).any():
        return None
    return score(ws, tuple(res), G_ema, class_names, city_map, training_config(n, seed, device), progress=False,
                 real=real).figures


# --- what score_run writes, for report ----------------------------------------------------------
def metrics_file(size: tuple[int, int] | None) -> str:
    """metrics.json for the samples; metrics-WxH.json for thumbnails served at (W, H), beside it."""
    return "metrics.json" if size is None else f"metrics-{size[0]}x{size[1]}.json"


def write_novelty_figure(path: Path, scores: Scores, class_names: list[str], pairs: int = 24) -> None:
    """The samples most similar to a training photo (by the first space's similarity), for the report."""
    first = next(iter(scores.nearest))
    order = np.argsort(-scores.nearest[first][0], kind="stable")[:pairs]
    arrays = {"images": scores.images[order], "classes": scores.classes[order].astype(np.int64),
              "class_names": np.array(class_names, dtype=str)}
    for name, (sims, ids) in scores.nearest.items():
        arrays[f"{name}_similarity"] = sims[order].astype(np.float32)
        arrays[f"{name}_photo_id"] = ids[order].astype(np.int64)
        arrays[f"{name}_all_similarity"] = sims.astype(np.float32)
        arrays[f"{name}_holdout_similarity"] = np.asarray(scores.holdout_similarity[name], dtype=np.float32)
        arrays[f"{name}_threshold"] = np.array(scores.figures["novelty"][name]["threshold"], dtype=np.float64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def evaluations(run_dir: Path, images_seen: int | None = None) -> list[dict]:
    """What score_run wrote for the snapshot at `images_seen` (None: the most advanced one
    scored): the samples' metrics.json first (if any), then each served size's metrics-WxH.json."""
    folders = sorted(p for p in (Path(run_dir) / "eval").glob("*") if any(p.glob("metrics*.json")))
    if images_seen is not None:
        folders = [p for p in folders if p.name == f"{int(images_seen):010d}"]
    if not folders:
        return []
    files = sorted(folders[-1].glob("metrics*.json"), key=lambda p: (p.name != "metrics.json", p.name))
    return [json.loads(p.read_text()) for p in files]
