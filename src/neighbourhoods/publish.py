"""`neighbourhoods publish`: a static set of thumbnails per city, for a website or CDN with no model server.

For every city of the run's data (pooled ones included, each with seeds of its own), N
thumbnails that passed every gate (novelty guard, realism gate, and no two one house: the set
is kept distinct as a whole, one ledger per city), ranked by realism, as files:

    OUT/manifest.json         model fingerprint, size, format, and per city its files (seed, realism, ...)
    OUT/index.html            every city's thumbnails on one page, to look at
    OUT/<city>/<seed>.<fmt>   the thumbnails (the first 256 seeds: the same bytes `serve` gives)

Incremental: a second run into OUT (same model, size and format) keeps every file already
published and adds seeds until each city has N. A listing is mapped to one thumbnail of its
city by `thumbnail_for` (rendezvous hashing: the file whose sha256("<listing>:<seed>") is
highest), so a listing keeps its thumbnail when the set grows unless a new file wins it (about
new / total of the listings move), and no model server is needed to follow the rule.
"""

from __future__ import annotations

import hashlib
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from neighbourhoods.core.cities import slug
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import ThumbSize
from neighbourhoods.core.workspace import atomic_write_bytes, atomic_write_json, make_folder
from neighbourhoods.thumbnails.distinct import Ledger
from neighbourhoods.thumbnails.guard import fill_ledger
from neighbourhoods.thumbnails.pipeline import load_pipeline
from neighbourhoods.thumbnails.postprocess import encode, parse_format

MAX_SEEDS_PER_FILE = 8   # seeds tried per published file before a city is called short


@dataclass
class PublishConfig:
    n: int = 100                          # thumbnails per city
    size: ThumbSize = ThumbSize(256, 192)
    fmt: str = "jpg"
    upscale: str | None = None            # None: the measured best (docs/serve.md)
    realism_quantile: float | None = None   # None: the gate's default; 0: no realism gate
    snapshot: str = "best"


def rank(listing: str, seed: int) -> int:
    """The rendezvous weight of a (listing, seed): the first 8 bytes of sha256("<listing>:<seed>")."""
    return int.from_bytes(hashlib.sha256(f"{listing}:{seed}".encode()).digest()[:8], "big")


def thumbnail_for(manifest: dict, city: str, listing: str) -> str:
    """The published file (relative to the manifest's folder) for a listing of `city`."""
    entry = manifest["cities"].get(city)
    if entry is None:
        raise NeighbourhoodsError(f"no published city {city!r}")
    if not entry["files"]:
        raise NeighbourhoodsError(f"nothing published for {city!r}")
    return max(entry["files"], key=lambda f: rank(str(listing), int(f["seed"])))["file"]


def _read(out: Path) -> dict | None:
    path = out / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NeighbourhoodsError(f"cannot read {path}: {e}") from None


def publish(workspace, run: str, out_dir, config: PublishConfig, progress: bool = True) -> dict:
    """Publish (or extend) OUT; returns the manifest."""
    if not 1 <= config.n <= 100_000:
        raise NeighbourhoodsError(f"-n must be between 1 and 100000, got {config.n}")
    fmt = parse_format(config.fmt)
    out = make_folder(Path(out_dir), "output")
    source, guard, upscaler = load_pipeline(workspace, run, config.upscale, True, progress=progress,
                                            snapshot=config.snapshot, realism_quantile=config.realism_quantile)
    if guard.distinct is None:
        raise NeighbourhoodsError(f"{run} has no rule for distinct listings (an older replica): export it again")
    size = f"{config.size[0]}x{config.size[1]}"
    model = {"model_fingerprint": source.fingerprint, "size": size, "format": fmt, "upscale": upscaler.name,
             "guard": guard.tag}
    old = _read(out)
    if old is not None and {k: old.get(k) for k in model} != model:
        changed = [k for k in model if old.get(k) != model[k]]
        raise NeighbourhoodsError(f"{out} holds a set published with another {', '.join(changed)}: "
                                  "publish into a new folder")
    cities = (old or {}).get("cities", {})
    taken = {c["folder"] for c in cities.values()}
    manifest = {**model, "run": source.label, "snapshot": source.snapshot, "images_seen": source.images_seen,
                "rule": "rendezvous: the file of the city with the highest sha256('<listing>:<seed>')[:8]",
                "cities": cities}
    t0, rendered = time.monotonic(), 0
    names = source.city_map.cities
    with tqdm(total=len(names) * config.n, unit="img", disable=not progress, desc="publish") as bar:
        for name in names:
            match = source.resolve(name)
            entry = cities.setdefault(name, {"folder": slug(name, taken), "draws_from": match.draws_from,
                                             "files": [], "seeds_tried": 0, "short": 0})
            (out / entry["folder"]).mkdir(exist_ok=True)
            have = {f["seed"] for f in entry["files"]}
            bar.update(min(len(have), config.n))
            ledger = Ledger(start=0)
            seed = 0
            # the ledger is rebuilt from seed 0, the same way each time: published seeds come out again,
            # their files are kept, and only new seeds are encoded
            while len(have) < config.n and seed < config.n * MAX_SEEDS_PER_FILE:
                if ledger.next_seed <= seed:   # first attempts drawn in batches of what is still missing
                    fill_ledger(source, match, ledger, seed + min(63, config.n - len(have) - 1), guard)
                s = ledger.samples[seed]
                if not isinstance(s, Exception) and s.passed and s.distinct and seed not in have:
                    rel = f"{entry['folder']}/{seed:06d}.{fmt}"
                    atomic_write_bytes(out / rel, encode(upscaler.resize(Image.fromarray(s.image), tuple(config.size)),
                                                         fmt))
                    entry["files"].append({"seed": seed, "used_seed": s.used_seed, "file": rel,
                                           "realism": s.realism, "similarity": s.similarity})
                    have.add(seed)
                    rendered += 1
                    bar.update(1)
                seed += 1
            entry["seeds_tried"] = max(entry["seeds_tried"], seed)
            entry["short"] = max(0, config.n - len(entry["files"]))
            entry["files"].sort(key=lambda f: (-(f["realism"] or 0.0), f["seed"]))   # ranked: most realistic first
            atomic_write_json(out / "manifest.json", manifest)   # a kill loses at most the city in progress
    manifest["seconds"] = round(time.monotonic() - t0, 1)
    manifest["new_files"] = rendered
    atomic_write_json(out / "manifest.json", manifest)
    atomic_write_bytes(out / "index.html", index_page(manifest).encode())
    return manifest


def index_page(manifest: dict) -> str:
    """A self-contained page: every city's published thumbnails, most realistic first."""
    rows = []
    for city, entry in manifest["cities"].items():
        imgs = "".join(f'<img src="{html.escape(f["file"])}" title="seed {f["seed"]}, realism '
                       f'{(f["realism"] or 0):.2f}" loading="lazy">' for f in entry["files"])
        short = f" ({entry['short']} short)" if entry.get("short") else ""
        rows.append(f"<h2>{html.escape(city)} <small>{len(entry['files'])} thumbnails{short}</small></h2>"
                    f"<div>{imgs}</div>")
    return ("<!doctype html><meta charset=utf-8><title>published thumbnails</title>"
            "<style>body{font:14px sans-serif;margin:1em}img{margin:2px;width:128px}</style>"
            f"<h1>published thumbnails ({html.escape(manifest['size'])} {html.escape(manifest['format'])}, "
            f"model {html.escape(manifest['model_fingerprint'][:12])})</h1>" + "".join(rows))


def describe(manifest: dict, out_dir) -> str:
    files = sum(len(c["files"]) for c in manifest["cities"].values())
    short = [c for c, e in manifest["cities"].items() if e.get("short")]
    return (f"published {files} thumbnails for {len(manifest['cities'])} cities to {out_dir} "
            f"({manifest.get('new_files', 0)} new, {manifest.get('seconds', 0):.0f} s; manifest.json, index.html)"
            + (f"; short of -n in {len(short)} cities (e.g. {short[0]}): every further seed was below the "
               "realism gate or one house with a published one" if short else ""))
