"""Thumbnails from a trained generator: sample, guard novelty, upscale, crop, encode.

One request is (city, seed, size, format) and always yields the same bytes: the sample depends
only on (city index, seed) and the weights (runs.sample), the novelty guard replaces a
too-similar sample by the one of the next derived seed (so the replacement is deterministic
too), and resizing and encoding are deterministic. `serve` and `generate` share this module.

Sizes are given as WxH (web convention, e.g. 256x192), unlike training resolutions (HxW).
"""

from __future__ import annotations

import difflib
import hashlib
import io
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from neighbourhoods.core.errors import NeighbourhoodsError

MAX_SIDE = 1024          # largest thumbnail side served or written, in pixels
MIN_SIDE = 8             # smallest
MAX_SEED = 2**63 - 1     # seeds are non-negative 63-bit integers (torch.Generator takes them all)
PIPELINE_VERSION = "1"   # bump when resizing/encoding changes, so ETags change with the bytes

# format name -> (PIL format, media type, save options). Fixed options: same input, same bytes.
FORMATS: dict[str, tuple[str, str, dict]] = {
    "jpg": ("JPEG", "image/jpeg", {"quality": 90, "subsampling": "4:2:0"}),
    "png": ("PNG", "image/png", {"compress_level": 6}),
    "webp": ("WEBP", "image/webp", {"quality": 85, "method": 4}),
}
FORMAT_ALIASES = {"jpeg": "jpg"}


def parse_size(text: str, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """'256x192' -> (256, 192): WIDTH x height, as thumbnails are usually given."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*", str(text))
    if not m:
        raise NeighbourhoodsError(f"bad size {text!r}: expected WxH, e.g. 256x192")
    w, h = int(m.group(1)), int(m.group(2))
    if not (MIN_SIDE <= w <= max_side and MIN_SIDE <= h <= max_side):
        raise NeighbourhoodsError(f"bad size {text!r}: each side must be between {MIN_SIDE} and {max_side} px")
    return w, h


def parse_format(text: str) -> str:
    fmt = FORMAT_ALIASES.get(str(text).lower().strip(), str(text).lower().strip())
    if fmt not in FORMATS:
        raise NeighbourhoodsError(f"bad format {text!r}: expected one of {', '.join(FORMATS)}")
    return fmt


def check_seed(seed: int) -> int:
    if not (0 <= int(seed) <= MAX_SEED):
        raise NeighbourhoodsError(f"bad seed {seed}: expected an integer from 0 to {MAX_SEED}")
    return int(seed)


def derived_seed(seed: int, attempt: int) -> int:
    """The seed tried at `attempt` (0: the requested one) when the novelty guard rejects a sample."""
    if attempt == 0:
        return seed
    digest = hashlib.sha256(f"novelty-retry:{seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def _norm(name: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def match_city(city: str, names: list[str]) -> int:
    """Index of `city` in `names`: exact, else case/space-insensitive; else an error naming close matches."""
    if city in names:
        return names.index(city)
    folded = [_norm(n) for n in names]
    key = _norm(city)
    if folded.count(key) == 1:
        return folded.index(key)
    raise UnknownCity(city, close_matches(city, names))


def close_matches(city: str, names: list[str], n: int = 5) -> list[str]:
    by_norm = {}
    for name in names:
        by_norm.setdefault(_norm(name), name)
    hits = difflib.get_close_matches(_norm(city)[:200], list(by_norm), n=n, cutoff=0.5)
    return [by_norm[h] for h in hits]


class UnknownCity(NeighbourhoodsError):
    def __init__(self, city: str, matches: list[str]):
        self.city, self.matches = city, matches
        hint = f"; close matches: {', '.join(matches)}" if matches else ""
        super().__init__(f"unknown city {city[:200]!r}{hint}")


class NoNovelSample(NeighbourhoodsError):
    """Every derived seed gave a sample too close to a training photo (a memorising generator)."""


# --- the generator behind the thumbnails -----------------------------------------------------
@dataclass
class Source:
    """What thumbnails need from a generator: names, resolution and a deterministic sampler."""
    class_names: list[str]                                   # conditioning classes, index order
    res: tuple[int, int]                                     # (H, W) the generator outputs
    sample: Callable[[list[int], list[int]], np.ndarray]     # (class indices, seeds) -> N x H x W x 3 uint8
    fingerprint: str                                         # hash of the weights: names the model in ETags
    label: str = ""                                          # where it came from, for /healthz and manifests
    images_seen: int = 0

    def class_index(self, city: str) -> int:
        return match_city(city, self.class_names)


def _weights_fingerprint(module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def load_source(workspace, run: str, device: str = "cpu", batch_size: int = 64) -> Source:
    """A run (name under WS/runs or a path) via runs.load_generator, or an exported .pt2 file."""
    path = Path(run)
    if path.suffix == ".pt2" or path.is_file():
        from neighbourhoods.export import load_exported
        return load_exported(path)
    from neighbourhoods.models import runs
    from neighbourhoods.core.workspace import open_workspace

    ws = open_workspace(workspace)
    run_dir = runs.resolve_run(ws, run)
    gen = runs.load_generator(run_dir, device=device)

    def sample(class_indices: list[int], seeds: list[int]) -> np.ndarray:
        return runs.sample(gen, list(class_indices), list(seeds), batch_size=batch_size)

    return Source(class_names=list(gen.class_names), res=tuple(gen.res), sample=sample,
                  fingerprint=_weights_fingerprint(gen.model), label=str(run_dir),
                  images_seen=int(gen.images_seen))


# --- novelty guard ---------------------------------------------------------------------------
@dataclass
class Guard:
    """Drops samples whose nearest training photo is more similar than `threshold`."""
    similarity: Callable[[np.ndarray], np.ndarray]   # N x H x W x 3 uint8 -> N max cosine similarities
    threshold: float                                 # memorisation threshold (similarity above it: a near-copy)
    max_attempts: int = 8                            # derived seeds tried before giving up
    label: str = ""


def load_guard(workspace, source: Source, max_attempts: int = 8, progress: bool = True) -> Guard:
    """The novelty guard of novelty.py for this workspace (training photos at the generator's res).

    The first call embeds every training and held-out photo (a progress bar; cached in
    WS/embeddings), later ones read the cache.
    """
    from neighbourhoods.metrics import novelty
    from neighbourhoods.core.workspace import open_workspace

    ws = open_workspace(workspace)
    try:
        index = novelty.load_index(ws, source.res, progress=progress)
    except NeighbourhoodsError as e:
        raise NeighbourhoodsError(f"novelty guard: {e} (or turn the guard off with --no-novelty-guard)") from None
    return Guard(similarity=index.max_similarity, threshold=float(index.threshold),
                 max_attempts=max_attempts, label=index.describe())


@dataclass
class Sample:
    image: np.ndarray       # H x W x 3 uint8 at the generator's resolution
    seed: int               # the requested seed
    used_seed: int          # the seed actually sampled (differs when the guard replaced a near-copy)
    similarity: float | None = None   # max cosine similarity to a training photo (None: guard off)


def render_samples(source: Source, class_indices: list[int], seeds: list[int],
                   guard: Guard | None = None) -> list[Sample]:
    """Samples for (class, seed) pairs, replacing near-copies of training photos deterministically.

    Each pair is tried with derived_seed(seed, 0), (seed, 1), ... until its sample passes the
    guard; attempts run batched across pairs, so a request's bytes never depend on its neighbours.
    """
    n = len(class_indices)
    out: list[Sample | None] = [None] * n
    todo = list(range(n))
    attempts = 1 if guard is None else guard.max_attempts
    for attempt in range(attempts):
        if not todo:
            break
        used = [derived_seed(seeds[i], attempt) for i in todo]
        images = source.sample([class_indices[i] for i in todo], used)
        if guard is None:
            for j, i in enumerate(todo):
                out[i] = Sample(images[j], seeds[i], used[j])
            todo = []
            break
        sims = np.asarray(guard.similarity(images), dtype=np.float64)
        still = []
        for j, i in enumerate(todo):
            if sims[j] <= guard.threshold:
                out[i] = Sample(images[j], seeds[i], used[j], float(sims[j]))
            else:
                still.append(i)
        todo = still
    if todo:
        raise NoNovelSample(
            f"no novel sample for seed {seeds[todo[0]]} after {attempts} attempts: every one was closer "
            f"to a training photo than the memorisation threshold; the generator memorises, retrain it")
    return out  # type: ignore[return-value]


# --- post-processing -------------------------------------------------------------------------
def cover_box(src_wh: tuple[int, int], dst_wh: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred box of the source with the destination's aspect (crop to fill, never pad)."""
    sw, sh = src_wh
    dw, dh = dst_wh
    if sw * dh > sh * dw:      # source wider than target: crop the sides
        cw = sh * dw / dh
        x0 = (sw - cw) / 2
        return (x0, 0.0, x0 + cw, float(sh))
    ch = sw * dh / dw
    y0 = (sh - ch) / 2
    return (0.0, y0, float(sw), y0 + ch)


def encode(img: Image.Image, fmt: str) -> bytes:
    pil_format, _, options = FORMATS[fmt]
    buf = io.BytesIO()
    img.save(buf, pil_format, **options)
    return buf.getvalue()


def thumbnail(image: np.ndarray, size: tuple[int, int], fmt: str, upscaler=None) -> bytes:
    """Sample (H x W x 3 uint8) -> encoded thumbnail of `size` (W, H), cropped to fill."""
    from neighbourhoods.upscale import get_upscaler

    up = upscaler if upscaler is not None else get_upscaler(None)
    img = up.resize(Image.fromarray(np.ascontiguousarray(image)), size)
    return encode(img, fmt)


def media_type(fmt: str) -> str:
    return FORMATS[fmt][1]


# --- the `generate` verb ---------------------------------------------------------------------
def slug(name: str, taken: set[str]) -> str:
    """A file-system-safe folder name for a city, unique within `taken`."""
    base = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    base = re.sub(r"[^A-Za-z0-9]+", "-", base).strip("-").lower()[:60] or "city"
    out, k = base, 2
    while out in taken:
        out, k = f"{base}-{k}", k + 1
    taken.add(out)
    return out


def grid(thumbs: list[Image.Image], columns: int = 8, pad: int = 2) -> Image.Image:
    w, h = thumbs[0].size
    cols = min(columns, len(thumbs))
    rows = (len(thumbs) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for k, t in enumerate(thumbs):
        sheet.paste(t, (pad + (k % cols) * (w + pad), pad + (k // cols) * (h + pad)))
    return sheet


@dataclass
class GenerateConfig:
    n: int = 16                      # samples per city
    seed: int = 0                    # first seed; sample k uses seed + k
    size: tuple[int, int] = (256, 192)   # thumbnail (W, H)
    fmt: str = "jpg"                 # jpg | png | webp
    upscale: str | None = None       # upscaler name (None: the measured best, see docs/serve.md)
    novelty: bool = True             # drop and replace near-copies of training photos
    batch_size: int = 64             # generator batch
    cities: list[str] = field(default_factory=list)   # empty with all_cities=False is an error
    all_cities: bool = False         # one folder per conditioning class


def generate(workspace, run: str, out_dir, config: GenerateConfig, progress: bool = True) -> dict:
    """Write thumbnails per city, a grid per city and manifest.json into out_dir; return the manifest."""
    from tqdm import tqdm

    from neighbourhoods.upscale import get_upscaler
    from neighbourhoods.core.workspace import atomic_path, atomic_write_bytes, atomic_write_json

    if config.n < 1 or config.n > 100_000:
        raise NeighbourhoodsError(f"-n must be between 1 and 100000, got {config.n}")
    check_seed(config.seed)
    check_seed(config.seed + config.n - 1)
    fmt = parse_format(config.fmt)
    source = load_source(workspace, run, batch_size=config.batch_size)
    guard = load_guard(workspace, source) if config.novelty else None
    upscaler = get_upscaler(config.upscale, workspace=workspace, res=source.res)
    if config.all_cities:
        indices = list(range(len(source.class_names)))
    elif config.cities:
        indices = [source.class_index(c) for c in config.cities]
    else:
        raise NeighbourhoodsError("name a city with --city, or use --all-cities")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(config.seed, config.seed + config.n))
    manifest = {"run": source.label, "images_seen": source.images_seen, "model_fingerprint": source.fingerprint,
                "generator_res": list(source.res), "size": f"{config.size[0]}x{config.size[1]}", "format": fmt,
                "upscale": upscaler.name, "novelty_guard": None if guard is None else
                {"threshold": guard.threshold, "max_attempts": guard.max_attempts},
                "cities": {}}
    taken: set[str] = set()
    bar = tqdm(total=len(indices) * len(seeds), unit="img", disable=not progress, desc="generate")
    for ci in indices:
        name = source.class_names[ci]
        folder = slug(name, taken)
        (out / folder).mkdir(exist_ok=True)
        files, thumbs = [], []
        for start in range(0, len(seeds), config.batch_size):
            chunk = seeds[start:start + config.batch_size]
            for s in render_samples(source, [ci] * len(chunk), chunk, guard):
                img = upscaler.resize(Image.fromarray(s.image), config.size)
                rel = f"{folder}/{s.seed:06d}.{fmt}"
                atomic_write_bytes(out / rel, encode(img, fmt))
                if len(thumbs) < 64:
                    thumbs.append(img)
                files.append({"seed": s.seed, "used_seed": s.used_seed, "file": rel,
                              "similarity": s.similarity})
                bar.update(1)
        grid_rel = f"{folder}/grid.png"
        with atomic_path(out / grid_rel) as tmp:
            grid(thumbs).save(tmp, "PNG")
        manifest["cities"][name] = {"folder": folder, "grid": grid_rel, "files": files,
                                    "replaced": sum(f["seed"] != f["used_seed"] for f in files)}
    bar.close()
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def describe(manifest: dict, out_dir) -> str:
    n = sum(len(c["files"]) for c in manifest["cities"].values())
    replaced = sum(c["replaced"] for c in manifest["cities"].values())
    guard = "off" if manifest["novelty_guard"] is None else f"on, {replaced} near-copies replaced"
    k = len(manifest["cities"])
    return (f"wrote {n} thumbnails ({manifest['size']} {manifest['format']}, upscale {manifest['upscale']}, "
            f"novelty guard {guard}) for {k} {'city' if k == 1 else 'cities'} to {out_dir} "
            f"(manifest.json, a grid.png per city)")
