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


def resize_bicubic(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 N x H x W x 3 -> float32 N x h x w x 3 in [0, 255]: PIL bicubic per channel (clean-fid)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images N x H x W x 3, got shape {images.shape}")
    out = np.empty((len(images), hw[0], hw[1], 3), dtype=np.float32)
    for i, image in enumerate(images):
        for c in range(3):
            channel = Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))  # mode 'F'
            out[i, ..., c] = np.asarray(channel.resize((hw[1], hw[0]), resample=Image.BICUBIC))
    return np.clip(out, 0.0, 255.0, out=out)


# EfficientNet-Lite0's input size per feature space (metrics.features), None: the images' own
# size. Here, torch-free, so the ONNX replica's guard prepares its input the eager way.
EFFICIENTNET_INPUT = {"efficientnet": (224, 224), "efficientnet-native": None}


def efficientnet_pixels(images: np.ndarray, space: str) -> np.ndarray:
    """uint8 N x H x W x 3 -> float32 N x h x w x 3 in [0, 255]: what `space`'s network sees."""
    hw = EFFICIENTNET_INPUT[space]
    images = np.asarray(images)
    return resize_bicubic(images, hw) if hw is not None else images.astype(np.float32)
