"""Pixel conversions that every stage reading photos applies the same way (ingest, cluster)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha composited on white, 16-bit scaled, CMYK/palette converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0   # 16-bit samples: 65535 -> 255
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
