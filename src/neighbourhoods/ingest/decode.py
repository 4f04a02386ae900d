"""Decoding one photo file: read, hash, check, convert to RGB and resize, or say why not.

Runs in ingest's worker processes, so it touches no database and never raises: every failure
becomes one of the short, stable rejection reasons below (documented in docs/ingest.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import imagehash
import numpy as np
import scipy.fftpack  # noqa: F401  imagehash.phash imports it on first use: do it once, before forking workers
from PIL import Image, ImageOps, UnidentifiedImageError

from neighbourhoods.core.images import to_rgb
from neighbourhoods.core.resolution import res_name

# Rejection reasons: short, stable strings users can filter on (documented in docs/ingest.md).
EMPTY_FILE = "empty-file"
NOT_AN_IMAGE = "not-an-image"
UNSUPPORTED_FORMAT = "unsupported-format"
TRUNCATED = "truncated"
UNREADABLE = "unreadable"
TOO_SMALL = "too-small"
TOO_MANY_PIXELS = "too-many-pixels"
MISSING = "missing"   # listed at discovery, gone by the time it was read

# Formats PIL identifies but we refuse: EPS is decoded by running Ghostscript on the file.
REFUSED_FORMATS = {"EPS"}
# Image containers PIL cannot decode here, recognised by their first bytes.
SIGNATURES = ((b"ftypheic", 4), (b"ftypheix", 4), (b"ftyphevc", 4), (b"ftypmif1", 4), (b"ftypavif", 4),
              (b"ftypcrx ", 4), (b"\x00\x00\x00\x0cJXL ", 0), (b"\xff\x0a", 0))
REDUCING_GAP = 2.0       # box-reduce first, then Lanczos over >= 2x the target: near-identical, much faster
PHASH_SIDE = 128         # perceptual hashes are taken from a copy reduced to about this size
DRAFT_MARGIN = 2.0       # decode JPEGs at >= 2x the target size, so the final resize still antialiases


@dataclass(frozen=True)
class DecodeSettings:
    res: tuple[tuple[int, int], ...]   # prepared resolutions, (H, W) each
    fit: str = "crop"                  # crop: centre-crop to the target aspect; pad: letterbox in black
    min_side: int = 32                 # reject photos whose shorter side is smaller
    max_pixels: int = 100_000_000      # reject larger images before decoding them (decompression bombs)

    def key(self) -> str:
        """What decoding depends on; the order resolutions were given in does not count."""
        return json.dumps({**asdict(self), "res": sorted(self.res)}, sort_keys=True)


@contextlib.contextmanager
def _pixel_limit(max_pixels: int):
    """Let PIL open what our own max_pixels check allows: its global limit would raise first."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(max_pixels, 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF and palette chatter
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _sniff_unsupported(head: bytes) -> bool:
    if any(head[off:off + len(sig)] == sig for sig, off in SIGNATURES):
        return True
    text = head[:256].lstrip().lower()
    return text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1   # unreadable EXIF is no reason to lose the photo


def _resize(img: Image.Image, res: tuple[int, int], fit: str) -> np.ndarray:
    th, tw = res
    w, h = img.size
    if fit == "crop":
        if w * th > h * tw:    # wider than the target: trim the sides
            cw = h * tw / th
            box = ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
        else:
            ch = w * th / tw
            box = (0.0, (h - ch) / 2, float(w), (h + ch) / 2)
        out = img.resize((tw, th), Image.LANCZOS, box=box, reducing_gap=REDUCING_GAP)
    else:
        scale = min(tw / w, th / h)
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        out = Image.new("RGB", (tw, th), (0, 0, 0))
        out.paste(img.resize((sw, sh), Image.LANCZOS, reducing_gap=REDUCING_GAP), ((tw - sw) // 2, (th - sh) // 2))
    return np.asarray(out, dtype=np.uint8)


def _draft_size(size: tuple[int, int], settings: DecodeSettings) -> tuple[int, int]:
    """Smallest decode size that still leaves DRAFT_MARGIN x the pixels every target needs."""
    w, h = size
    need = 0.0
    for th, tw in settings.res:
        scale = max(tw / w, th / h) if settings.fit == "crop" else min(tw / w, th / h)
        need = max(need, scale * DRAFT_MARGIN)
    need = min(need, 1.0)
    return max(1, math.ceil(w * need)), max(1, math.ceil(h * need))


def decode_one(task: tuple[int, str, DecodeSettings]) -> dict:
    """Read, hash, check and resize one file. Never raises: failures become a reason."""
    photo_id, path, settings = task
    result = {"id": photo_id, "bytes": None, "sha256": None, "phash": None, "width": None, "height": None,
              "format": None, "status": "rejected", "reason": None, "pixels": {}}
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        result["reason"] = MISSING
        return result
    except OSError:
        result["reason"] = UNREADABLE
        return result
    result["bytes"] = len(data)
    result["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        result["reason"] = EMPTY_FILE
        return result
    with _pixel_limit(settings.max_pixels):
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            result["reason"] = UNSUPPORTED_FORMAT if _sniff_unsupported(data[:512]) else NOT_AN_IMAGE
            return result
        except Image.DecompressionBombError:
            result["reason"] = TOO_MANY_PIXELS
            return result
        except Exception:
            result["reason"] = UNREADABLE
            return result
        result["format"] = img.format
        if img.format in REFUSED_FORMATS:
            result["reason"] = UNSUPPORTED_FORMAT
            return result
        width, height = img.size   # orientation swaps the sides, which changes neither check
        if width * height > settings.max_pixels:
            result["reason"] = TOO_MANY_PIXELS
            return result
        if min(width, height) < settings.min_side:
            result["reason"] = TOO_SMALL
            return result
        try:
            if img.format == "JPEG":   # reading JPEG EXIF is header-only; PNG's would decode the image
                turned = _orientation(img) in (5, 6, 7, 8)
                dw, dh = _draft_size((height, width) if turned else (width, height), settings)
                img.draft(None, (dh, dw) if turned else (dw, dh))
            img.load()
            if _orientation(img) in (5, 6, 7, 8):
                width, height = height, width
            result["width"], result["height"] = width, height
            ImageOps.exif_transpose(img, in_place=True)   # in place: no copy when nothing turns
            img = to_rgb(img)
        except (EOFError, SyntaxError) as e:
            result["reason"] = TRUNCATED if isinstance(e, EOFError) or "truncat" in str(e).lower() else UNREADABLE
            return result
        except OSError as e:
            result["reason"] = TRUNCATED if "truncat" in str(e).lower() else UNREADABLE
            return result
        except Image.DecompressionBombError:
            result["reason"] = TOO_MANY_PIXELS
            return result
        except Exception:
            result["reason"] = UNREADABLE
            return result
    try:
        # one box-reduce shared by every target (the DCT-domain draft did the same for JPEGs)
        dw, dh = _draft_size(img.size, settings)
        factor = min(img.size[0] // dw, img.size[1] // dh)
        base = img.reduce(factor) if factor > 1 else img
        factor = min(base.size) // PHASH_SIDE
        result["phash"] = str(imagehash.phash(base.reduce(factor) if factor > 1 else base))
        result["pixels"] = {res_name(r): _resize(base, r, settings.fit).tobytes() for r in settings.res}
    except Exception:   # never let one odd file stop a run of 200,000
        result["phash"], result["pixels"], result["reason"] = None, {}, UNREADABLE
        return result
    result["status"] = "kept"
    return result
