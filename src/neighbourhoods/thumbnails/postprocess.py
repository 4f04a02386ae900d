"""From a sample to thumbnail bytes: upscale and crop to fill, then encode with fixed options.

Same sample, size, format and upscaler: same bytes (ETags name them; PIPELINE_VERSION changes
them when resizing or encoding does).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.thumbnails.upscalers import get_upscaler

PIPELINE_VERSION = "3"   # bump when sampling/resizing/encoding changes, so ETags change with the bytes
                         # (2: samples drawn one per generator call, source.SAMPLE_BATCH;
                         #  3: latents from core.latents, the same with or without torch)

# format name -> (PIL format, media type, save options). Fixed options: same input, same bytes.
FORMATS: dict[str, tuple[str, str, dict]] = {
    "jpg": ("JPEG", "image/jpeg", {"quality": 90, "subsampling": "4:2:0"}),
    "png": ("PNG", "image/png", {"compress_level": 6}),
    "webp": ("WEBP", "image/webp", {"quality": 85, "method": 4}),
}
FORMAT_ALIASES = {"jpeg": "jpg"}


def parse_format(text: str) -> str:
    fmt = FORMAT_ALIASES.get(str(text).lower().strip(), str(text).lower().strip())
    if fmt not in FORMATS:
        raise NeighbourhoodsError(f"bad format {text!r}: expected one of {', '.join(FORMATS)}")
    return fmt


def media_type(fmt: str) -> str:
    return FORMATS[fmt][1]


def encode(img: Image.Image, fmt: str) -> bytes:
    pil_format, _, options = FORMATS[fmt]
    buf = io.BytesIO()
    img.save(buf, pil_format, **options)
    return buf.getvalue()


def thumbnail(image: np.ndarray, size: tuple[int, int], fmt: str, upscaler=None) -> bytes:
    """Sample (H x W x 3 uint8) -> encoded thumbnail of `size` (W, H), cropped to fill.

    `upscaler`: one of upscalers.get_upscaler (None: the best one that needs no weights).
    """
    up = upscaler if upscaler is not None else get_upscaler(None)
    img = up.resize(Image.fromarray(np.ascontiguousarray(image)), size)
    return encode(img, fmt)
