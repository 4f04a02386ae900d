"""`neighbourhoods generate`: thumbnails per city on disk, a grid per city, and a manifest.

Every file is what `serve` would answer for the same (city, seed, size, format): both go
through thumbnails/ (source, novelty guard, upscaler, encoder), so the bytes are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from neighbourhoods.core.cities import slug
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.grid import save_grid
from neighbourhoods.core.resolution import ThumbSize
from neighbourhoods.core.workspace import atomic_write_bytes, atomic_write_json, make_folder
from neighbourhoods.thumbnails.distinct import BLOCK, Ledgers
from neighbourhoods.thumbnails.guard import check_seed, render_listings
from neighbourhoods.thumbnails.pipeline import load_pipeline
from neighbourhoods.thumbnails.postprocess import encode, parse_format

GRID_SAMPLES = 64   # thumbnails of a city shown in its grid.png (the first ones)
GRID_COLUMNS = 8


@dataclass
class GenerateConfig:
    n: int = 16                      # samples per city
    seed: int = 0                    # first seed; sample k uses seed + k
    size: ThumbSize = ThumbSize(256, 192)   # thumbnail (W, H)
    fmt: str = "jpg"                 # jpg | png | webp
    upscale: str | None = None       # upscaler name (None: the measured best, see docs/serve.md)
    novelty: bool = True             # drop and replace near-copies of training photos
    guard_device: str = "cpu"        # where the guard's network runs (its first call indexes every photo)
    batch_size: int = 64             # samples per novelty-guard pass (the generator samples one at a time)
    cities: list[str] = field(default_factory=list)   # empty with all_cities=False is an error
    all_cities: bool = False         # one folder per conditioning class
    every_city: bool = False         # one folder per city of the run's data, pooled ones included
    fallback: str | None = None      # "any": a city the data never had is drawn from "(any city)"
    snapshot: str = "best"           # a run's weights: its best snapshot (where it keeps one) or "last"
    realism_quantile: float | None = None   # the realism gate's quantile (None: the default, 0.2; 0: off)


def generate(workspace, run: str, out_dir, config: GenerateConfig, progress: bool = True) -> dict:
    """Write thumbnails per city, a grid per city and manifest.json into out_dir; return the manifest."""
    if config.n < 1 or config.n > 100_000:
        raise NeighbourhoodsError(f"-n must be between 1 and 100000, got {config.n}")
    check_seed(config.seed)
    check_seed(config.seed + config.n - 1)
    fmt = parse_format(config.fmt)
    source, guard, upscaler = load_pipeline(workspace, run, config.upscale, config.novelty, config.guard_device,
                                            progress=progress, snapshot=config.snapshot,
                                            realism_quantile=config.realism_quantile)
    if config.every_city:
        matches = [source.resolve(c) for c in source.city_map.cities]
    elif config.all_cities:
        matches = [source.resolve(c) for c in source.class_names]
    elif config.cities:
        matches = [source.resolve(c, config.fallback) for c in config.cities]
    else:
        raise NeighbourhoodsError("name a city with --city, or use --all-cities or --every-city")
    out = Path(out_dir)
    make_folder(out, "output")
    seeds = list(range(config.seed, config.seed + config.n))
    manifest = {"run": source.label, "snapshot": source.snapshot, "images_seen": source.images_seen, "model_fingerprint": source.fingerprint,
                "generator_res": list(source.res), "size": f"{config.size[0]}x{config.size[1]}", "format": fmt,
                "upscale": upscaler.name, "novelty_guard": None if guard is None else
                {"threshold": guard.threshold, "max_attempts": guard.max_attempts},
                "realism_gate": None if guard is None or guard.realism is None else
                {"quantile": guard.realism.quantile, "classes": guard.realism.summary(source.class_names)},
                "distinct_listings": None if guard is None or guard.distinct is None else
                {"block": BLOCK, "thresholds": dict(zip(source.class_names, guard.distinct.thresholds.tolist()))},
                "cities": {}}
    taken: set[str] = set()
    ledgers = Ledgers(capacity=len(matches) * (len(seeds) // BLOCK + 2))
    # closed before an error propagates: the error is the last line printed, not a half bar
    with tqdm(total=len(matches) * len(seeds), unit="img", disable=not progress, desc="generate") as bar:
        for match in matches:
            folder = slug(match.city, taken)
            (out / folder).mkdir(exist_ok=True)
            files, thumbs, replaced = [], [], 0
            for start in range(0, len(seeds), config.batch_size):
                chunk = seeds[start:start + config.batch_size]
                # a city drawn from a shared class samples seeds of its own (CityMatch.seed); each
                # listing is distinct from the seeds before it in its block (render_listings)
                for seed, s in zip(chunk, render_listings(source, match, chunk, guard, ledgers)):
                    img = upscaler.resize(Image.fromarray(s.image), config.size)
                    rel = f"{folder}/{seed:06d}.{fmt}"
                    atomic_write_bytes(out / rel, encode(img, fmt))
                    if len(thumbs) < GRID_SAMPLES:
                        thumbs.append(img)
                    files.append({"seed": seed, "used_seed": s.used_seed, "file": rel, "similarity": s.similarity,
                                  "realism": s.realism, "passed": s.passed, "distinct": s.distinct})
                    replaced += s.used_seed != s.seed   # the guard swapped a near-copy or an unrealistic sample
                    bar.update(1)
            grid_rel = f"{folder}/grid.png"
            save_grid(out / grid_rel, thumbs, GRID_COLUMNS, pad=2, border=2)
            manifest["cities"][match.city] = {"folder": folder, "grid": grid_rel, "files": files,
                                              "draws_from": match.draws_from, "fallback": match.fallback,
                                              "replaced": replaced}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def describe(manifest: dict, out_dir) -> str:
    n = sum(len(c["files"]) for c in manifest["cities"].values())
    replaced = sum(c["replaced"] for c in manifest["cities"].values())
    files = [f for c in manifest["cities"].values() for f in c["files"]]
    if manifest["novelty_guard"] is None:
        guard = "novelty guard off"
    elif manifest.get("realism_gate") is None:
        guard = f"novelty guard on, {replaced} near-copies replaced; realism gate off"
    else:
        below = sum(not f.get("passed", True) for f in files)
        alike = sum(not f.get("distinct", True) for f in files)
        guard = (f"novelty guard and realism gate on: {replaced} replaced"
                 + (f", {below} served below the gate (no attempt passed)" if below else "")
                 + (f", {alike} one house with an earlier listing (no attempt was distinct)" if alike else ""))
    k = len(manifest["cities"])
    return (f"wrote {n} thumbnails ({manifest['size']} {manifest['format']}, upscale {manifest['upscale']}, "
            f"{guard}) for {k} {'city' if k == 1 else 'cities'} to {out_dir} "
            f"(manifest.json, a grid.png per city)")
