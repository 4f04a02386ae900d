"""Contact sheets: images of one size laid out in a grid on white, optionally with row names.

    grid(images, columns)                                      sheet as a PIL image
    grid(images, columns, border=2)                            `generate`'s grid.png per city
    grid(images, columns, row_names=names)                     train's progress grid: cities
                                                               down, seeds across, names in a margin
    save_grid(path, images, columns, ...)                      the same, written as PNG atomically

Every tile is followed by `pad` px (between tiles, and after the last one); `border` px more
go before the first row and column. Row names (cut to 24 characters) sit in a left margin
as wide as the longest (at most 160 px).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from neighbourhoods.core.workspace import atomic_path

NAME_CHARS = 24       # row names are cut to this many characters
MAX_MARGIN = 160      # widest name margin, px


def _margin(row_names: Sequence[str], font) -> int:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return min(MAX_MARGIN, 8 + max((int(draw.textlength(name[:NAME_CHARS], font=font)) for name in row_names),
                                   default=0))


def grid(images, columns: int, pad: int = 2, border: int = 0,
         row_names: Sequence[str] | None = None) -> Image.Image:
    """Images (uint8 H x W x 3 arrays, an N x H x W x 3 array, or PIL images, all one size)
    in rows of `columns` (fewer if there are fewer images) -> an RGB sheet.

    With `row_names`, there is one row per name, and the names are drawn in a left margin.
    """
    tiles = [im if isinstance(im, Image.Image) else Image.fromarray(np.ascontiguousarray(im)) for im in images]
    if not tiles:
        raise ValueError("grid of no images")
    w, h = tiles[0].size
    cols = min(columns, len(tiles))
    rows = len(row_names) if row_names is not None else (len(tiles) + cols - 1) // cols
    font = ImageFont.load_default() if row_names is not None else None
    margin = _margin(row_names, font) if row_names is not None else 0
    x0, y0 = margin + border, border
    sheet = Image.new("RGB", (x0 + cols * (w + pad), y0 + rows * (h + pad)), (255, 255, 255))
    if row_names is not None:
        draw = ImageDraw.Draw(sheet)
        for r, name in enumerate(row_names):
            draw.text((4, y0 + r * (h + pad) + h // 2 - 5), name[:NAME_CHARS], fill=(0, 0, 0), font=font)
    for k, tile in enumerate(tiles[:rows * cols]):
        sheet.paste(tile, (x0 + (k % cols) * (w + pad), y0 + (k // cols) * (h + pad)))
    return sheet


def save_grid(path: str | os.PathLike, images, columns: int, pad: int = 2, border: int = 0,
              row_names: Sequence[str] | None = None) -> Image.Image:
    """grid(...) written to `path` as PNG, atomically; returns the sheet."""
    sheet = grid(images, columns, pad=pad, border=border, row_names=row_names)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return sheet
