"""The two image sizes of the project, each with one parser and one name.

- `Resolution` (H x W, written "96x128"): what a generator outputs and what training,
  prepared arrays and evaluation work at. Height first, as tensors are laid out.
- `ThumbSize` (W x H, written "256x192"): what a website asks for. Width first, as web and
  image tools give sizes.

Both are NamedTuples, so `h, w = res` and `res == (64, 64)` work wherever a plain pair did.
Which resolutions a model can build is the model's to declare (models.check_res); the rule
they share, res = base x 2^k, is `up_levels` here.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from neighbourhoods.core.errors import NeighbourhoodsError

_PAIR = re.compile(r"\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*")
MIN_RES_SIDE, MAX_RES_SIDE = 8, 4096       # prepared arrays / training
MIN_THUMB_SIDE, MAX_THUMB_SIDE = 8, 1024   # thumbnails written or served


def _pair(value, what: str, text_form: str, pair_form: str) -> tuple[int, int]:
    """Two integers from 'AxB' or from a pair, in the order given; NeighbourhoodsError otherwise."""
    if isinstance(value, str):
        m = _PAIR.fullmatch(value)
        if not m:
            raise NeighbourhoodsError(f"bad {what} {value!r}: expected {text_form}")
        return int(m.group(1)), int(m.group(2))
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise NeighbourhoodsError(f"bad {what} {value!r}: expected {pair_form}") from None
    return a, b


class Resolution(NamedTuple):
    """Height x width of generated or prepared images."""
    h: int
    w: int

    @classmethod
    def parse(cls, value) -> Resolution:
        """'96x128', (96, 128) or a Resolution -> Resolution; NeighbourhoodsError otherwise."""
        h, w = _pair(value, "resolution", "HxW, e.g. 64x64 or 96x128", "(height, width)")
        if not (MIN_RES_SIDE <= h <= MAX_RES_SIDE and MIN_RES_SIDE <= w <= MAX_RES_SIDE):
            raise NeighbourhoodsError(f"bad resolution {h}x{w}: each side must be between {MIN_RES_SIDE} "
                                      f"and {MAX_RES_SIDE}")
        return cls(h, w)

    @property
    def name(self) -> str:
        return f"{self.h}x{self.w}"

    def __str__(self) -> str:
        return self.name

    def up_levels(self, min_levels: int = 0, max_base_side: int | None = None) -> tuple[int, Resolution]:
        """(k, base): self = base x 2^k, k as large as keeps every base side >= 3.

        The shape every generator here grows by (64x64 -> 4, 4x4; 96x128 -> 5, 3x4). A model
        declares what it can build with `min_levels` and `max_base_side`; ValueError otherwise.
        """
        k = 0
        while (self.h % 2 ** (k + 1) == 0 and self.w % 2 ** (k + 1) == 0
               and min(self.h, self.w) // 2 ** (k + 1) >= 3):
            k += 1
        base = Resolution(self.h // 2 ** k, self.w // 2 ** k)
        if k < min_levels or (max_base_side is not None and max(base) > max_base_side):
            raise ValueError(f"resolution {self.name} is not {level_rule(min_levels, max_base_side)} "
                             "(e.g. 32x32, 64x64, 48x64, 96x128, 192x256)")
        return k, base


def level_rule(min_levels: int, max_base_side: int | None) -> str:
    sides = f"3-{max_base_side}" if max_base_side is not None else "3 or more"
    return (f"a base of {sides} px a side times 2^k with k >= {min_levels}, "
            f"so each side a multiple of {2 ** min_levels}")


class ThumbSize(NamedTuple):
    """Width x height of a thumbnail as the website asks for it."""
    w: int
    h: int

    @classmethod
    def parse(cls, value, max_side: int = MAX_THUMB_SIDE) -> ThumbSize:
        """'256x192' (width first) or (256, 192) -> ThumbSize; NeighbourhoodsError otherwise."""
        w, h = _pair(value, "size", "WxH, e.g. 256x192", "(width, height)")
        if not (MIN_THUMB_SIDE <= w <= max_side and MIN_THUMB_SIDE <= h <= max_side):
            raise NeighbourhoodsError(f"bad size {value!r}: each side must be between {MIN_THUMB_SIDE} "
                                      f"and {max_side} px")
        return cls(w, h)

    @property
    def name(self) -> str:
        return f"{self.w}x{self.h}"

    def __str__(self) -> str:
        return self.name


def parse_res(text: str) -> Resolution:
    """argparse type for --res HxW."""
    return Resolution.parse(text)


def res_name(res) -> str:
    """'HxW' of a Resolution or an (H, W) pair: folder and run names."""
    return Resolution.parse(res).name


# Aspects a generator is built at (base H x W, doubled k times): square, 4:3 landscape, 3:4 portrait.
_BASES = ((4, 4), (3, 4), (4, 3))


def supported_resolution(width: int, height: int, min_levels: int = 2) -> Resolution | None:
    """The largest resolution of the photos' nearest aspect that a `width` x `height` photo
    covers without enlarging (socal's 128x96 photos: 96x128), or None if below 16 px."""
    aspect = width / max(height, 1)
    base = min(_BASES, key=lambda b: abs(b[1] / b[0] - aspect))
    k = min_levels
    while base[0] * 2 ** (k + 1) <= height and base[1] * 2 ** (k + 1) <= width:
        k += 1
    res = Resolution(base[0] * 2 ** k, base[1] * 2 ** k)
    return res if res.h <= height and res.w <= width else None
