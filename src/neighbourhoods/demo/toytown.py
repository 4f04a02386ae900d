"""Toy town: a small, deterministic photo collection the project draws itself.

Every stage can be demonstrated and tested without real photos. Like a real listing feed it
mixes house exteriors with interior-like rooms and floorplan-like drawings, all labelled with
the listing's city. Exteriors differ by city in the ways a city-conditioned generator should
learn (wall and roof colours, roof shape, vegetation, sky, ground) and vary within a city
(position, size, windows, door, trees, clouds) so there is something to learn at all.

    photos_dir, labels_csv = draw_toytown("/tmp/toy")   # photos/NNNN.jpg + labels.csv

labels.csv has columns file, city, kind (exterior / interior / floorplan); `kind` is ground
truth that ingest ignores and tests of clustering can check against.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from neighbourhoods.core.workspace import atomic_write_bytes

SIZE = (128, 96)   # width x height of the written photos: 4:3, like listing thumbnails
SCALE = 2          # drawn at twice the size, then downsampled with an antialiasing filter


@dataclass(frozen=True)
class CityStyle:
    sky: tuple[int, int, int]                  # top of the sky gradient
    ground: tuple[int, int, int]               # lawn, sand, ...
    walls: tuple[tuple[int, int, int], ...]    # wall colours houses pick from
    roofs: tuple[tuple[int, int, int], ...]    # roof colours
    roof_shape: str                            # gable / flat / hip
    vegetation: str                            # conifer / palm / round / none
    interior_wall: tuple[int, int, int]        # back wall colour of rooms


CITY_STYLES: dict[str, CityStyle] = {
    "Pinecrest": CityStyle(sky=(120, 150, 185), ground=(60, 115, 55),
                           walls=((120, 72, 40), (150, 95, 55), (95, 60, 45)),
                           roofs=((55, 55, 60), (75, 70, 70)), roof_shape="gable",
                           vegetation="conifer", interior_wall=(190, 160, 120)),
    "Sunvale": CityStyle(sky=(95, 170, 235), ground=(215, 190, 140),
                         walls=((235, 215, 180), (225, 195, 160), (240, 230, 210)),
                         roofs=((185, 80, 50), (170, 95, 60)), roof_shape="flat",
                         vegetation="palm", interior_wall=(235, 220, 195)),
    "Harborview": CityStyle(sky=(160, 200, 230), ground=(150, 175, 120),
                            walls=((245, 245, 245), (170, 200, 225), (200, 220, 235)),
                            roofs=((60, 90, 140), (90, 100, 115)), roof_shape="hip",
                            vegetation="round", interior_wall=(215, 230, 240)),
    "Brickton": CityStyle(sky=(150, 160, 175), ground=(95, 140, 70),
                          walls=((150, 55, 40), (135, 65, 50), (165, 75, 55)),
                          roofs=((40, 40, 45), (70, 50, 45)), roof_shape="gable",
                          vegetation="round", interior_wall=(225, 215, 200)),
}

KIND_MIX = (("exterior", 0.7), ("interior", 0.2), ("floorplan", 0.1))  # share of each kind per city


def _jitter(colour, rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)


def _vertical_gradient(draw: ImageDraw.ImageDraw, box, top, bottom) -> None:
    x0, y0, x1, y1 = box
    for y in range(y0, y1):
        t = (y - y0) / max(1, y1 - y0 - 1)
        draw.line([(x0, y), (x1, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))


def _tree(draw, x, base, h, kind, rng) -> None:
    green = _jitter((45, 110, 50), rng, 20)
    trunk = _jitter((95, 65, 40), rng, 10)
    if kind == "conifer":
        draw.rectangle([x - h // 20, base - h // 6, x + h // 20, base], fill=trunk)
        for i in range(3):
            w = h // 3 - i * h // 14
            top = base - h + i * h // 5
            draw.polygon([(x, top), (x - w, top + h // 2), (x + w, top + h // 2)], fill=_jitter((30, 85, 45), rng, 10))
    elif kind == "palm":
        draw.line([(x, base), (x + h // 10, base - h)], fill=_jitter((120, 95, 60), rng, 10), width=max(2, h // 14))
        cx, cy = x + h // 10, base - h
        for dx, dy in ((-1, 0.3), (1, 0.3), (-0.7, -0.4), (0.7, -0.4), (0, -0.6)):
            draw.line([(cx, cy), (cx + dx * h // 3, cy + dy * h // 4)], fill=_jitter((50, 130, 50), rng, 15), width=max(2, h // 16))
    elif kind == "round":
        draw.rectangle([x - h // 16, base - h // 2, x + h // 16, base], fill=trunk)
        r = h // 3
        draw.ellipse([x - r, base - h, x + r, base - h + 2 * r], fill=green)


def draw_exterior(style: CityStyle, rng: random.Random) -> Image.Image:
    w, h = SIZE[0] * SCALE, SIZE[1] * SCALE
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    horizon = int(h * rng.uniform(0.55, 0.7))
    sky = _jitter(style.sky, rng, 12)
    _vertical_gradient(d, (0, 0, w, horizon), sky, tuple(min(255, c + 50) for c in sky))
    _vertical_gradient(d, (0, horizon, w, h), _jitter(style.ground, rng, 12),
                       tuple(max(0, c - 35) for c in style.ground))
    for _ in range(rng.randint(0, 3)):  # clouds
        cx, cy, r = rng.randint(0, w), rng.randint(5, horizon // 2), rng.randint(8, 20)
        d.ellipse([cx - 2 * r, cy - r, cx + 2 * r, cy + r], fill=_jitter((245, 245, 248), rng, 6))

    # the house: width, height, position and openings vary within a city
    hw, hh = int(w * rng.uniform(0.38, 0.6)), int(h * rng.uniform(0.25, 0.38))
    x0 = rng.randint(int(w * 0.05), w - hw - int(w * 0.05))
    base = horizon + rng.randint(4, 20)
    y0 = base - hh
    wall = _jitter(rng.choice(style.walls), rng, 12)
    roof = _jitter(rng.choice(style.roofs), rng, 10)
    d.rectangle([x0, y0, x0 + hw, base], fill=wall, outline=tuple(max(0, c - 60) for c in wall))
    roof_h = int(hh * rng.uniform(0.45, 0.75))
    if style.roof_shape == "gable":
        d.polygon([(x0 - 6, y0), (x0 + hw // 2, y0 - roof_h), (x0 + hw + 6, y0)], fill=roof)
    elif style.roof_shape == "hip":
        inset = hw // 4
        d.polygon([(x0 - 6, y0), (x0 + inset, y0 - roof_h * 2 // 3), (x0 + hw - inset, y0 - roof_h * 2 // 3),
                   (x0 + hw + 6, y0)], fill=roof)
    else:  # flat roof with a tile band
        d.rectangle([x0 - 4, y0 - 8, x0 + hw + 4, y0 + 2], fill=roof)

    door_w, door_h = hw // 7, int(hh * 0.55)
    door_x = x0 + rng.randint(hw // 8, hw - hw // 8 - door_w)
    d.rectangle([door_x, base - door_h, door_x + door_w, base], fill=_jitter((90, 55, 35), rng, 25))
    n_windows = rng.randint(2, 4)
    win = hw // 8
    win_y = y0 + hh // 5
    for i in range(n_windows):
        wx = x0 + (i + 1) * hw // (n_windows + 1) - win // 2
        if abs(wx + win // 2 - (door_x + door_w // 2)) < win:
            continue
        d.rectangle([wx, win_y, wx + win, win_y + win], fill=_jitter((70, 100, 130), rng, 15), outline=(240, 240, 240), width=2)
    if rng.random() < 0.4:  # garage
        gx = x0 + hw
        gw = hw // 3
        d.rectangle([gx, base - hh * 2 // 3, gx + gw, base], fill=wall, outline=tuple(max(0, c - 60) for c in wall))
        d.rectangle([gx + 4, base - hh // 2, gx + gw - 4, base], fill=_jitter((200, 200, 200), rng, 15))

    if style.vegetation != "none":
        for _ in range(rng.randint(1, 4)):
            tx = rng.choice([rng.randint(0, max(1, x0 - 10)), rng.randint(min(w - 1, x0 + hw + 10), w)])
            _tree(d, tx, base + rng.randint(0, 15), rng.randint(h // 4, h // 2), style.vegetation, rng)
    return img


def draw_interior(style: CityStyle, rng: random.Random) -> Image.Image:
    w, h = SIZE[0] * SCALE, SIZE[1] * SCALE
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    wall = _jitter(style.interior_wall, rng, 15)
    side = tuple(max(0, c - 35) for c in wall)
    floor = _jitter(rng.choice([(150, 105, 65), (190, 185, 175), (120, 80, 50)]), rng, 15)
    bx0, by0 = int(w * rng.uniform(0.18, 0.3)), int(h * rng.uniform(0.12, 0.22))
    bx1, by1 = w - int(w * rng.uniform(0.18, 0.3)), int(h * rng.uniform(0.6, 0.72))
    d.rectangle([0, 0, w, h], fill=side)
    d.polygon([(0, h), (bx0, by1), (bx1, by1), (w, h)], fill=floor)
    for i in range(1, 8):  # floor boards converge to the back wall: a room's perspective
        fx = i * w // 8
        d.line([(fx, h), (bx0 + (bx1 - bx0) * i // 8, by1)], fill=tuple(max(0, c - 25) for c in floor), width=1)
    d.polygon([(0, 0), (bx0, by0), (bx1, by0), (w, 0)], fill=(245, 245, 240))  # ceiling
    d.rectangle([bx0, by0, bx1, by1], fill=wall)
    # window on the back wall with outside light
    ww, wh = (bx1 - bx0) // 3, (by1 - by0) // 2
    wx = rng.randint(bx0 + 5, bx1 - ww - 5)
    d.rectangle([wx, by0 + 10, wx + ww, by0 + 10 + wh], fill=(215, 235, 250), outline=(250, 250, 250), width=3)
    # furniture: a sofa or a table, and a lamp
    sofa = _jitter(rng.choice([(110, 110, 120), (150, 60, 50), (70, 90, 120), (200, 190, 170)]), rng, 15)
    sx = rng.randint(bx0 - 20, bx1 - 70)
    d.rectangle([sx, by1 - 30, sx + 80, by1 + 15], fill=sofa)
    d.rectangle([sx, by1 - 45, sx + 80, by1 - 25], fill=tuple(max(0, c - 20) for c in sofa))
    if rng.random() < 0.6:
        tx = rng.randint(20, w - 80)
        d.rectangle([tx, h - 50, tx + 60, h - 42], fill=(100, 70, 45))
        d.rectangle([tx + 5, h - 42, tx + 10, h - 15], fill=(80, 55, 35))
        d.rectangle([tx + 50, h - 42, tx + 55, h - 15], fill=(80, 55, 35))
    lx = rng.choice([bx0 + 8, bx1 - 20])
    d.line([(lx + 6, by1), (lx + 6, by1 - 50)], fill=(60, 60, 60), width=2)
    d.polygon([(lx, by1 - 50), (lx + 12, by1 - 50), (lx + 9, by1 - 65), (lx + 3, by1 - 65)], fill=(250, 235, 190))
    return img


def draw_floorplan(style: CityStyle, rng: random.Random) -> Image.Image:
    del style  # floorplans look alike everywhere, as in real listings
    w, h = SIZE[0] * SCALE, SIZE[1] * SCALE
    img = Image.new("RGB", (w, h), (252, 252, 250))
    d = ImageDraw.Draw(img)
    x0, y0 = rng.randint(10, 30), rng.randint(10, 25)
    x1, y1 = w - rng.randint(10, 30), h - rng.randint(10, 25)
    ink = (25, 25, 30)
    d.rectangle([x0, y0, x1, y1], outline=ink, width=4)
    # split the outline into rooms with interior walls, each with a door gap and swing arc
    cuts_x = sorted(rng.sample(range(x0 + 40, x1 - 40), k=rng.randint(1, 2)))
    cut_y = rng.randint(y0 + 40, y1 - 40)
    for cx in cuts_x:
        gap = rng.randint(cut_y + 10, y1 - 30)
        d.line([(cx, y0), (cx, gap)], fill=ink, width=3)
        d.line([(cx, gap + 20), (cx, y1)], fill=ink, width=3)
        d.arc([cx - 20, gap - 20 + 20, cx + 20, gap + 20 + 20], 270, 360, fill=ink, width=1)
    gap = rng.randint(x0 + 10, x1 - 40)
    d.line([(x0, cut_y), (gap, cut_y)], fill=ink, width=3)
    d.line([(gap + 22, cut_y), (x1, cut_y)], fill=ink, width=3)
    for _ in range(rng.randint(2, 5)):  # fixtures: small rectangles and circles
        fx, fy = rng.randint(x0 + 8, x1 - 25), rng.randint(y0 + 8, y1 - 20)
        if rng.random() < 0.5:
            d.rectangle([fx, fy, fx + rng.randint(8, 20), fy + rng.randint(6, 14)], outline=ink, width=1)
        else:
            d.ellipse([fx, fy, fx + 10, fy + 10], outline=ink, width=1)
    return img


DRAWERS = {"exterior": draw_exterior, "interior": draw_interior, "floorplan": draw_floorplan}


def _finish(img: Image.Image, rng: random.Random) -> Image.Image:
    """Downsample with antialiasing and add sensor-like noise, so JPEGs are not flat fills."""
    img = img.filter(ImageFilter.GaussianBlur(0.6)).resize(SIZE, Image.LANCZOS)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 3.0, (SIZE[1], SIZE[0], 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def draw_toytown(out_dir, cities: tuple[str, ...] = ("Pinecrest", "Sunvale", "Harborview"),
                 per_city: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Draw `per_city` photos for each city into out_dir/photos and write out_dir/labels.csv.

    Same arguments, same bytes: the drawing depends only on (seed, city, index). Cities not in
    CITY_STYLES get a style derived from their name. Returns (photos_dir, labels_csv).
    """
    out = Path(out_dir)
    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    rows = []
    n = 0
    for city in cities:
        style = CITY_STYLES.get(city) or _style_for(city, seed)
        counts = [int(round(per_city * share)) for _, share in KIND_MIX]
        counts[0] = per_city - sum(counts[1:])
        kinds = [kind for (kind, _), c in zip(KIND_MIX, counts) for _ in range(c)]
        for i, kind in enumerate(kinds):
            rng = random.Random(f"{seed}/{city}/{i}")
            img = _finish(DRAWERS[kind](style, rng), rng)
            n += 1
            name = f"{n:04d}.jpg"
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            _write_if_changed(photos / name, buf.getvalue())
            rows.append((name, city, kind))
    labels = out / "labels.csv"
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["file", "city", "kind"])
    writer.writerows(rows)
    _write_if_changed(labels, text.getvalue().encode("utf-8"))
    return photos, labels


def _write_if_changed(path: Path, data: bytes) -> None:
    """Leave identical files untouched, so drawing again does not make ingest see changed files."""
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(path, data)


def _style_for(city: str, seed: int) -> CityStyle:
    rng = random.Random(f"style/{seed}/{city}")
    base = rng.choice(list(CITY_STYLES.values()))
    return CityStyle(sky=_jitter(base.sky, rng, 30), ground=_jitter(base.ground, rng, 30),
                     walls=tuple(_jitter(c, rng, 50) for c in base.walls),
                     roofs=tuple(_jitter(c, rng, 50) for c in base.roofs),
                     roof_shape=rng.choice(["gable", "flat", "hip"]),
                     vegetation=rng.choice(["conifer", "palm", "round", "none"]),
                     interior_wall=_jitter(base.interior_wall, rng, 20))
