"""From the generator's resolution to thumbnail size: resampling filters and a small SR network.

Options (compared by KID at thumbnail size against real photos of that size; see
docs/serve.md for the numbers and bench/upscale.py for the protocol):

    bicubic        PIL bicubic (the plain baseline)
    lanczos        PIL Lanczos-3
    lanczos-sharp  Lanczos then an unsharp mask whose radius follows the scale factor
    espcn          a small ESPCN-style x2 network (Shi et al. 2016), trained by `neighbourhoods
                   upscale` (upscale.train_sr) on real photos (downscaled -> original), applied
                   until the image covers the target, then Lanczos to the exact size.
                   Weights: WS/upscale/espcn-x2.safetensors.

Every option crops to fill (centred, cover_box) and is deterministic, so thumbnails stay
byte-stable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.workspace import open_workspace

NAMES = ("bicubic", "lanczos", "lanczos-sharp", "espcn")
# The measured best (docs/serve.md, "Upscaling"): espcn where the workspace has its weights,
# else lanczos, the best option that needs none.
DEFAULT = "espcn"
FALLBACK = "lanczos"
SR_FILE = "espcn-x2.safetensors"


# --- resampling ------------------------------------------------------------------------------
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


@dataclass
class Resample:
    name: str
    filter: int                 # PIL resampling filter
    sharpen: bool = False       # unsharp mask after resizing

    @property
    def fingerprint(self) -> str:
        return self.name

    def resize(self, img: Image.Image, size: tuple[int, int]) -> Image.Image:
        out = img.convert("RGB").resize(size, self.filter, box=cover_box(img.size, size))
        if self.sharpen:
            scale = max(size[0] / img.width, size[1] / img.height)
            if scale > 1.2:
                # the blur Lanczos leaves grows with the scale factor; so does the mask's radius
                out = out.filter(ImageFilter.UnsharpMask(radius=0.5 * scale, percent=70, threshold=2))
        return out


# --- the SR network ---------------------------------------------------------------------------
@dataclass
class SRConfig:
    """The network's shape (channels, scale: what load_sr needs) and upscale.train_sr's recipe."""
    channels: int = 32           # width of the feature layers (ESPCN's 64-32 is ~2x slower on CPU for ~no gain here)
    scale: int = 2               # upscale factor of one pass
    patch: int = 64              # HR training patch side, px
    batch: int = 16              # patches per step
    steps: int = 1500            # optimizer steps
    lr: float = 1e-3             # Adam learning rate (cosine-decayed to 0)
    seed: int = 0                # patch sampling and init
    hr_size: tuple[int, int] = (256, 192)   # (W, H) each photo is resized to fill first: the thumbnails' scale


def _cubic_taps(t: float, a: float = -0.75) -> list[float]:
    """Weights of the samples at floor - 1 .. floor + 2 for a point t past the floor (torch's a)."""
    def near(x: float) -> float:
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_phases(scale: int):
    """3 * scale**2 x 1 x 5 x 5 filters: a depthwise conv of the edge-padded (by 2) image with
    them, then PixelShuffle(scale), is F.interpolate(x, scale_factor=scale, mode="bicubic",
    align_corners=False). Output pixel s*i + p samples input i + (p + 0.5)/s - 0.5; torch clamps
    reads at the border, which is the edge padding."""
    import math

    import torch

    taps = torch.zeros(scale, 5, dtype=torch.float64)
    for p in range(scale):
        d = (p + 0.5) / scale - 0.5
        f = math.floor(d)
        for k, w in zip(range(f - 1, f + 3), _cubic_taps(d - f)):
            taps[p, k + 2] += w
    phases = torch.einsum("pi,qj->pqij", taps, taps).reshape(scale * scale, 1, 5, 5)
    return phases.repeat(3, 1, 1, 1).float()   # channel c * s*s + p * s + q, as PixelShuffle reads


def build_sr(cfg: SRConfig):
    import torch
    from torch import nn

    class ESPCN(nn.Module):
        """Predicts the residual over bicubic upsampling; sub-pixel convolution does the upsampling."""

        def __init__(self):
            super().__init__()
            c = cfg.channels
            self.body = nn.Sequential(
                nn.Conv2d(3, c, 5, padding=2), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(c, 3 * cfg.scale ** 2, 3, padding=1), nn.PixelShuffle(cfg.scale))
            # bicubic upsampling as a fixed depthwise conv: the same numbers as F.interpolate's
            # (to 1e-6), but an ONNX Conv, where onnxruntime's cubic Resize cost 11 of the replica's
            # 16 ms per 128x96 pass. Not persistent: derived, so the weight files are unchanged.
            self.register_buffer("bicubic", bicubic_phases(cfg.scale), persistent=False)

        def forward(self, x):  # x: N x 3 x h x w in [0, 1]
            padded = nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
            base = nn.functional.pixel_shuffle(nn.functional.conv2d(padded, self.bicubic, groups=3), cfg.scale)
            return (base + self.body(x)).clamp(0, 1)

    torch.manual_seed(cfg.seed)
    return ESPCN()


@dataclass
class SRUpscaler:
    name: str
    network: Callable[[np.ndarray], np.ndarray]   # float32 1 x 3 x h x w in [0, 1] -> 1 x 3 x sh x sw in [0, 1]
    scale: int
    fingerprint: str = ""       # name + hash of the weights: retrained weights change thumbnails' ETags
    model: object = None        # the ESPCN module (torch; None in an ONNX replica, which runs `network` only)

    def _pass(self, arr: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(arr).transpose(2, 0, 1)[None], dtype=np.float32) / 255
        y = self.network(x)[0].transpose(1, 2, 0)
        return np.clip(np.round(y * 255), 0, 255).astype(np.uint8)

    def resize(self, img: Image.Image, size: tuple[int, int]) -> Image.Image:
        img = img.convert("RGB")
        arr = np.asarray(img)
        # x2 passes until the image covers the target, then Lanczos (down) to the exact size
        while max(size[0] / arr.shape[1], size[1] / arr.shape[0]) > 1.2 and arr.shape[0] * arr.shape[1] < 2**20:
            arr = self._pass(arr)
        big = Image.fromarray(arr)
        return big.resize(size, Image.LANCZOS, box=cover_box(big.size, size))


def sr_dir(workspace) -> Path:
    """Where a workspace keeps the SR weights (WS/upscale/)."""
    return open_workspace(workspace).root / "upscale"


def load_sr(path: Path) -> SRUpscaler:
    from safetensors.torch import load_file
    meta = json.loads(path.with_suffix(".json").read_text())
    cfg = SRConfig(**{k: v for k, v in meta["config"].items() if k in SRConfig.__dataclass_fields__})
    model = build_sr(cfg)
    model.load_state_dict(load_file(str(path)))
    model.eval()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    def network(x: np.ndarray) -> np.ndarray:
        import torch
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return SRUpscaler("espcn", network, cfg.scale, f"espcn:{digest}", model=model)


def get_upscaler(name: str | None, workspace=None, res=None):
    """The upscaler called `name` (None: DEFAULT, falling back to FALLBACK without SR weights)."""
    wanted = name or DEFAULT
    if wanted == "bicubic":
        return Resample("bicubic", Image.BICUBIC)
    if wanted == "lanczos":
        return Resample("lanczos", Image.LANCZOS)
    if wanted == "lanczos-sharp":
        return Resample("lanczos-sharp", Image.LANCZOS, sharpen=True)
    if wanted == "espcn":
        path = sr_dir(workspace) / SR_FILE if workspace is not None else None
        if path is not None and path.is_file():
            return load_sr(path)
        if name is None:  # the default falls back quietly; an explicit request is an error
            return get_upscaler(FALLBACK)
        raise NeighbourhoodsError("upscaler 'espcn' needs trained weights: run `neighbourhoods upscale "
                                  "--workspace WS --train PHOTOS` first (or pick bicubic, lanczos, lanczos-sharp)")
    raise NeighbourhoodsError(f"unknown upscaler {wanted!r}: expected one of {', '.join(NAMES)}")
