"""Training runs on disk, and loading a trained generator from one.

A run folder (WS/runs/<name>/), written by train.py:

    config.json                     the TrainConfig, plus "model", "res" [H, W], "z_dim",
                                    "class_names" (conditioning classes in index order)
    checkpoints/<images_seen:010d>/ G.safetensors, G_ema.safetensors, D.safetensors, state.pt
    checkpoints/latest.json         {"dir": ..., "images_seen": N}, written atomically, last
    samples/progress-<images_seen:010d>.png   fixed-seed grid, one row per city
    metrics.jsonl                   images_seen, time_s, loss_g, loss_d, images_per_s, (kid)
    tensorboard/                    TensorBoard event files

Weights are safetensors and state.pt loads with torch.load(weights_only=True): opening a run
never executes code from it.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.workspace import Workspace

ANY_CITY = "(any city)"   # the shared class of cities too small to train alone; serves unknown cities too
CHECKPOINT_FILES = ("G.safetensors", "G_ema.safetensors", "D.safetensors", "state.pt")


def resolve_run(ws: Workspace, run: str) -> Path:
    """A run name under WS/runs, or a path to a run folder; NeighbourhoodsError if it is not one."""
    candidates = [ws.run_dir(run)] if "/" not in run and run not in (".", "..") else []
    candidates.append(Path(run).expanduser())
    for path in candidates:
        if (path / "config.json").is_file():
            return path.resolve()
    have = sorted(p.name for p in ws.runs_dir.iterdir() if (p / "config.json").is_file()) if ws.runs_dir.is_dir() else []
    raise NeighbourhoodsError(f"no training run {run!r} in {ws.runs_dir} (have: {', '.join(have) or 'none'}); "
                              "run `neighbourhoods train` first")


def read_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NeighbourhoodsError(f"{path} is missing: not a training run") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NeighbourhoodsError(f"{path} is corrupt ({e})") from None


def latest_checkpoint(run_dir: Path) -> tuple[Path, int]:
    """(checkpoint folder, images_seen) named by checkpoints/latest.json, with all its files present."""
    ckpts = Path(run_dir) / "checkpoints"
    latest = ckpts / "latest.json"
    if not latest.is_file():
        raise NeighbourhoodsError(f"{Path(run_dir).name}: no checkpoint yet ({latest} is missing)")
    try:
        info = json.loads(latest.read_text())
        folder, images_seen = ckpts / str(info["dir"]), int(info["images_seen"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise NeighbourhoodsError(f"{latest} is corrupt ({e}); point it at a complete folder in {ckpts}") from None
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise NeighbourhoodsError(f"checkpoint {folder} is incomplete (missing {', '.join(missing)}); "
                                  f"{_older_hint(ckpts, folder)}")
    return folder, images_seen


def _older_hint(ckpts: Path, bad: Path) -> str:
    older = sorted(p.name for p in ckpts.iterdir() if p.is_dir() and p.name.isdigit() and p.name < bad.name)
    if not older:
        return "no older checkpoint to fall back to"
    return (f"to fall back to the previous one, write {{\"dir\": \"{older[-1]}\", \"images_seen\": {int(older[-1])}}} "
            f"into {ckpts / 'latest.json'}")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a state dict; NeighbourhoodsError (not a traceback) if torn or missing."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise NeighbourhoodsError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:   # safetensors raises its own error types for torn headers/data
        raise NeighbourhoodsError(f"{path} is corrupt ({type(e).__name__}: {e}); "
                                  f"{_older_hint(path.parent.parent, path.parent)}") from None


def load_state_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise NeighbourhoodsError(f"{path} does not fit the run's model ({str(e).splitlines()[0]})") from None


def noise_for_seeds(seeds: list[int], z_dim: int) -> torch.Tensor:
    """N x z_dim: row i is N(0, 1) noise from torch.Generator().manual_seed(seeds[i]) alone."""
    rows = [torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows) if rows else torch.zeros(0, z_dim)


def to_uint8_tensor(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W in [-1, 1] -> N x H x W x 3 uint8 tensor (also inside exported graphs)."""
    x = (images.float().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N x 3 x H x W in [-1, 1] -> N x H x W x 3 uint8 array."""
    return to_uint8_tensor(images.detach()).cpu().numpy()


@torch.no_grad()
def generate_images(model: nn.Module, class_indices: list[int], seeds: list[int], batch_size: int = 64) -> np.ndarray:
    """Images from `model` (in eval mode) for (class, seed) pairs, uint8 N x H x W x 3."""
    device = next(model.parameters()).device
    labels = torch.as_tensor(list(class_indices), dtype=torch.long)
    z = noise_for_seeds(list(seeds), model.z_dim)
    out = []
    for i in range(0, len(labels), batch_size):
        out.append(to_uint8(model(z[i:i + batch_size].to(device), labels[i:i + batch_size].to(device))))
    if not out:
        raise NeighbourhoodsError("nothing to sample: no class indices given")
    return np.concatenate(out)


@dataclass
class LoadedGenerator:
    model: nn.Module              # G with the EMA weights, in eval mode
    class_names: list[str]        # conditioning classes in index order
    res: tuple[int, int]          # (H, W) it generates
    z_dim: int
    images_seen: int              # training progress of the loaded checkpoint
    config: dict = field(repr=False)   # the run's config.json

    def class_index(self, city: str) -> int:
        """Index of `city` (exact, then case-insensitive); NeighbourhoodsError naming close matches."""
        if city in self.class_names:
            return self.class_names.index(city)
        folded = [name.casefold() for name in self.class_names]
        if city.casefold() in folded:
            return folded.index(city.casefold())
        close = difflib.get_close_matches(city.casefold(), folded, n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(self.class_names[folded.index(c)] for c in close)}" if close else ""
        fallback = f"; {ANY_CITY!r} stands for cities not trained on" if ANY_CITY in self.class_names else ""
        raise NeighbourhoodsError(f"unknown city {city[:200]!r}{hint}{fallback}")


def load_generator(run_dir: Path, device: str = "cpu") -> LoadedGenerator:
    """The run's latest EMA generator, from safetensors only (never unpickles anything)."""
    from neighbourhoods import models

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    folder, images_seen = latest_checkpoint(run_dir)
    try:
        model = models.build_generator(config["model"], len(config["class_names"]), tuple(config["res"]),
                                       **config.get("model_kwargs", {}))
    except KeyError as e:
        raise NeighbourhoodsError(f"{run_dir / 'config.json'} lacks {e}") from None
    path = folder / "G_ema.safetensors"
    load_state_into(model, load_weights(path), path)
    model.to(device).eval().requires_grad_(False)
    return LoadedGenerator(model=model, class_names=list(config["class_names"]), res=tuple(config["res"]),
                           z_dim=int(model.z_dim), images_seen=images_seen, config=config)


def sample(gen: LoadedGenerator, class_indices: list[int], seeds: list[int], batch_size: int = 64) -> np.ndarray:
    """uint8 N x H x W x 3; image i depends only on (class_indices[i], seeds[i]) and the weights."""
    if len(class_indices) != len(seeds):
        raise NeighbourhoodsError(f"{len(class_indices)} class indices but {len(seeds)} seeds")
    bad = [c for c in class_indices if not 0 <= int(c) < len(gen.class_names)]
    if bad:
        raise NeighbourhoodsError(f"class index {bad[0]} out of range 0..{len(gen.class_names) - 1}")
    return generate_images(gen.model, class_indices, seeds, batch_size=batch_size)
