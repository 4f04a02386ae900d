"""`neighbourhoods upscale`: train the x2 ESPCN upscaler on real photos (downscaled -> original).

The upscalers themselves (bicubic, lanczos, lanczos-sharp, espcn), which `generate` and
`serve` apply, are thumbnails/upscalers.py; this trains the weights espcn loads from
WS/upscale/espcn-x2.safetensors.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.locks import writing_workspace
from neighbourhoods.core.workspace import atomic_path, atomic_write_json
from neighbourhoods.thumbnails.upscalers import SR_FILE, SRConfig, build_sr, cover_box, sr_dir


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
    """Train the x2 ESPCN on real photos (downscaled with Lanczos -> original); write safetensors.
    Holds the workspace lock while it does."""
    with writing_workspace(Path(workspace), "upscale"):
        return _train_sr_locked(workspace, photos, cfg, max_photos, progress)


def _train_sr_locked(workspace, photos, cfg: SRConfig | None, max_photos: int, progress: bool) -> dict:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

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



def ensure_sr(workspace, progress: bool = True, steps: int | None = None) -> dict | None:
    """Train the workspace's upscaler on its own kept training photos unless it has one: the
    step of the website path (train, then serve) that makes `espcn` the served default.
    Returns the training metadata, or None when the weights were already there."""
    from neighbourhoods.core import catalog
    from neighbourhoods.core.workspace import open_workspace

    ws = open_workspace(workspace)
    if (sr_dir(ws.root) / SR_FILE).is_file():
        return None
    con = catalog.connect(ws.catalog_path)
    try:
        paths = [catalog.fs_path(r[0]) for r in con.execute("SELECT path FROM photos WHERE status = 'kept' AND "
                                           "(split IS NULL OR split != 'holdout') ORDER BY id")]
    finally:
        con.close()
    if not paths:
        return None
    return train_sr(ws.root, paths, SRConfig() if steps is None else SRConfig(steps=steps), progress=progress)
