"""From the generator's resolution to thumbnail size: resampling filters and a small SR network.

Options (compared by KID at thumbnail size against real photos of that size; see
docs/serve.md for the numbers and `compare` below for the protocol):

    bicubic        PIL bicubic (the plain baseline)
    lanczos        PIL Lanczos-3
    lanczos-sharp  Lanczos then an unsharp mask whose radius follows the scale factor
    espcn          a small ESPCN-style x2 network (Shi et al. 2016) trained by `train_sr` on real
                   photos (downscaled -> original), applied until the image covers the target,
                   then Lanczos to the exact size. Weights: WS/upscale/espcn-x2.safetensors.

Every option crops to fill (centred) and is deterministic, so thumbnails stay byte-stable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.generate import cover_box

NAMES = ("bicubic", "lanczos", "lanczos-sharp", "espcn")
# The measured best (docs/serve.md, "Upscaling"): espcn where the workspace has its weights,
# else lanczos, the best option that needs none.
DEFAULT = "espcn"
FALLBACK = "lanczos"
SR_FILE = "espcn-x2.safetensors"


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
    channels: int = 32           # width of the feature layers (ESPCN's 64-32 is ~2x slower on CPU for ~no gain here)
    scale: int = 2               # upscale factor of one pass
    patch: int = 64              # HR training patch side, px
    batch: int = 16              # patches per step
    steps: int = 1500            # optimizer steps
    lr: float = 1e-3             # Adam learning rate (cosine-decayed to 0)
    seed: int = 0                # patch sampling and init
    hr_size: tuple[int, int] = (256, 192)   # (W, H) each photo is resized to fill first: the thumbnails' scale


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

        def forward(self, x):  # x: N x 3 x h x w in [0, 1]
            base = nn.functional.interpolate(x, scale_factor=cfg.scale, mode="bicubic", align_corners=False)
            return (base + self.body(x)).clamp(0, 1)

    torch.manual_seed(cfg.seed)
    return ESPCN()


@dataclass
class SRUpscaler:
    name: str
    model: object               # the ESPCN module, eval mode
    scale: int
    fingerprint: str = ""       # name + hash of the weights: retrained weights change thumbnails' ETags

    def _pass(self, arr: np.ndarray) -> np.ndarray:
        import torch
        with torch.inference_mode():
            x = torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None].float() / 255
            y = self.model(x)[0].permute(1, 2, 0).mul(255).round().clamp(0, 255)
        return y.to(torch.uint8).numpy()

    def resize(self, img: Image.Image, size: tuple[int, int]) -> Image.Image:
        img = img.convert("RGB")
        arr = np.asarray(img)
        # x2 passes until the image covers the target, then Lanczos (down) to the exact size
        while max(size[0] / arr.shape[1], size[1] / arr.shape[0]) > 1.2 and arr.shape[0] * arr.shape[1] < 2**20:
            arr = self._pass(arr)
        big = Image.fromarray(arr)
        return big.resize(size, Image.LANCZOS, box=cover_box(big.size, size))


def sr_dir(workspace) -> Path:
    from neighbourhoods.core.workspace import open_workspace
    return open_workspace(workspace).root / "upscale"


def load_sr(path: Path) -> SRUpscaler:
    from safetensors.torch import load_file
    meta = json.loads(path.with_suffix(".json").read_text())
    cfg = SRConfig(**{k: v for k, v in meta["config"].items() if k in SRConfig.__dataclass_fields__})
    model = build_sr(cfg)
    model.load_state_dict(load_file(str(path)))
    model.eval()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return SRUpscaler("espcn", model, cfg.scale, f"espcn:{digest}")


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


def _photo_paths(photos) -> list[Path]:
    if isinstance(photos, (list, tuple)):
        return [Path(p) for p in photos]
    root = Path(photos)
    exts = {".jpg", ".jpeg", ".png", ".webp"}
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in exts)
    if not paths:
        raise NeighbourhoodsError(f"no photos found under {root}")
    return paths


def train_sr(workspace, photos, cfg: SRConfig | None = None, max_photos: int = 2000,
             progress: bool = True) -> dict:
    """Train the x2 ESPCN on real photos (downscaled with Lanczos -> original); write safetensors."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from neighbourhoods.core.workspace import atomic_path, atomic_write_json

    cfg = cfg or SRConfig()
    rng = np.random.default_rng(cfg.seed)
    paths = _photo_paths(photos)
    if len(paths) > max_photos:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), max_photos, replace=False))]
    hr = []
    for p in tqdm(paths, desc="load photos", disable=not progress, unit="img"):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                # the scale of content in a thumbnail, not of the original photo, is what SR must learn
                size = tuple(cfg.hr_size)
                if im.width >= size[0] // 2 and im.height >= size[1] // 2:
                    hr.append(np.asarray(im.resize(size, Image.LANCZOS, box=cover_box(im.size, size))))
        except OSError:
            continue
    if not hr:
        raise NeighbourhoodsError(f"no usable photos (at least half of {cfg.hr_size} px) in {photos}")
    model = build_sr(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    lo = cfg.patch // cfg.scale
    losses = []
    bar = tqdm(range(cfg.steps), desc="train sr", disable=not progress, unit="step")
    for _ in bar:
        xs, ys = [], []
        for _k in range(cfg.batch):
            a = hr[rng.integers(len(hr))]
            y0, x0 = rng.integers(a.shape[0] - cfg.patch + 1), rng.integers(a.shape[1] - cfg.patch + 1)
            patch = Image.fromarray(a[y0:y0 + cfg.patch, x0:x0 + cfg.patch])
            ys.append(np.asarray(patch))
            xs.append(np.asarray(patch.resize((lo, lo), Image.LANCZOS)))
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(np.stack(ys)).permute(0, 3, 1, 2).float() / 255
        loss = torch.nn.functional.l1_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(l1=f"{np.mean(losses[-50:]):.4f}")
    out = sr_dir(workspace)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / SR_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    meta = {"config": asdict(cfg), "photos": str(photos) if not isinstance(photos, (list, tuple)) else
            f"{len(photos)} files", "n_photos": len(hr),
            "final_l1": float(np.mean(losses[-100:]))}
    atomic_write_json((out / SR_FILE).with_suffix(".json"), meta)
    return meta

