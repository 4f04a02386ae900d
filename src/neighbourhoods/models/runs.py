"""Training runs on disk: the run folder format, written and read here and nowhere else.

A run folder (WS/runs/<name>/), written by `train`, read by every later stage:

    config.json                     the resolved TrainConfig; "model_args" (name, res [H, W],
                                    z_dim, class_names in index order, kwargs): all a loader
                                    needs to rebuild G; the same fields also at the top level
                                    (and only there in runs written before model_args); and
                                    class_counts, merged_cities, train_photos, grid
    checkpoints/<images_seen:010d>/ G.safetensors, G_ema.safetensors, D.safetensors, state.pt
    checkpoints/latest.json         {"dir": ..., "images_seen": N}, written atomically, last
    checkpoints/best-<images_seen:010d>.safetensors   G_ema where the training curve's KID was lowest
    checkpoints/best.json           {"file": ..., "images_seen": N, "kid_train": ..., "kid_train_std": ...,
                                    "kid_images": ...}, written
                                    atomically after its weights; what every loader uses unless told
                                    snapshot="last" (train --kid-every)
    samples/progress-<images_seen:010d>.png   fixed-seed grid, one row per city
    metrics.jsonl                   images_seen, time_s, loss_g, loss_d, images_per_s, (kid)
    tensorboard/                    TensorBoard event files
    eval/<images_seen:010d>/        metrics.json and novelty.npz of `evaluate`

Weights are safetensors and state.pt loads with torch.load(weights_only=True): opening a run
never executes code from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from neighbourhoods.core.cities import ANY_CITY as ANY_CITY  # re-exported: train, evaluate use runs.ANY_CITY
from neighbourhoods.core.cities import CityMap
from neighbourhoods.core.errors import NeighbourhoodsError, disk_full_error, is_disk_full
from neighbourhoods.core.latents import latents
from neighbourhoods.core.workspace import Workspace, atomic_path, atomic_write_json, fsync_path

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
    """N x z_dim: row i is the latent of seeds[i] alone (core.latents: no torch needed to redraw it)."""
    return torch.from_numpy(latents(list(seeds), z_dim))


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
    snapshot: str = "last"        # "best" (the training curve's best G_ema), "last" (the latest checkpoint)
                                  # or the images_seen of the kept checkpoint it was asked for

    @property
    def city_map(self) -> CityMap:
        """Every city of the run's data -> the class it is drawn from (pooled cities: ANY_CITY)."""
        return city_map_of(self.config, self.class_names)

    def class_index(self, city: str) -> int:
        """The class `city` is drawn from (core.cities.CityMap); UnknownCity naming close matches."""
        return self.city_map.resolve(city).class_index


def load_generator(run_dir: Path, device: str = "cpu", snapshot: str = "best") -> LoadedGenerator:
    """The run's EMA generator, from safetensors only (never unpickles anything): its best
    snapshot by the training curve's KID (`snapshot` "best", where the run has one), else or with
    "last" its latest checkpoint's."""
    from neighbourhoods import models

    snapshot = str(snapshot)
    if snapshot not in SNAPSHOTS and not snapshot.isdigit():
        raise NeighbourhoodsError(f"unknown snapshot {snapshot!r}: use best, last or the images_seen of a kept "
                                  "checkpoint")
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    args = read_model_args(config, run_dir / "config.json")
    best = best_snapshot(run_dir) if snapshot == "best" else None
    if best is not None:
        path, images_seen = best["path"], int(best["images_seen"])
    elif snapshot.isdigit():   # a kept checkpoint, by its images_seen (the curve of bench/curve.py)
        images_seen = int(snapshot)
        path = Path(run_dir) / "checkpoints" / f"{images_seen:010d}" / "G_ema.safetensors"
        if not path.is_file():
            kept = sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").glob("*") if p.name.isdigit())
            raise NeighbourhoodsError(f"run {run_dir.name!r} keeps no checkpoint at {images_seen:,} images "
                                      f"(kept: {', '.join(f'{k:,}' for k in kept) or 'none'})")
    else:
        folder, images_seen = latest_checkpoint(run_dir)
        path = folder / "G_ema.safetensors"
    model = models.build_generator(args["name"], len(args["class_names"]), tuple(args["res"]), **args["kwargs"])
    load_state_into(model, load_weights(path), path)
    model.to(device).eval().requires_grad_(False)
    start, full = config.get("cond_start_kimg") or 0.0, config.get("cond_full_kimg") or 0.0
    if full > start and images_seen < full * 1000:   # transitional conditioning, removed: its G was mid-fade
        raise NeighbourhoodsError(f"run {Path(run_dir).name!r} stopped while its city signal was fading in "
                                  "(--cond-full-kimg, removed: it lost in its measurement); it can still be "
                                  "sampled at commit 06f09c2")
    return LoadedGenerator(model=model, class_names=list(args["class_names"]), res=tuple(args["res"]),
                           z_dim=int(model.z_dim), images_seen=images_seen, config=config,
                           snapshot="best" if best is not None else snapshot if snapshot.isdigit() else "last")


def sample(gen: LoadedGenerator, class_indices: list[int], seeds: list[int], batch_size: int = 64) -> np.ndarray:
    """uint8 N x H x W x 3; image i depends only on (class_indices[i], seeds[i]) and the weights."""
    if len(class_indices) != len(seeds):
        raise NeighbourhoodsError(f"{len(class_indices)} class indices but {len(seeds)} seeds")
    bad = [c for c in class_indices if not 0 <= int(c) < len(gen.class_names)]
    if bad:
        raise NeighbourhoodsError(f"class index {bad[0]} out of range 0..{len(gen.class_names) - 1}")
    return generate_images(gen.model, class_indices, seeds, batch_size=batch_size)


# --- checkpoints (written by `train`, read by `train --resume` and every loader) ------------------
def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: Path, images_seen: int, nets: dict[str, nn.Module], state: dict, keep: int) -> Path:
    """Write checkpoints/<images_seen:010d>/ via a temporary folder, then latest.json, then prune."""
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"{images_seen:010d}"
    final = ckpts / name
    with contextlib.suppress(NeighbourhoodsError):
        if latest_checkpoint(run_dir)[0] == final:
            return final          # this very state is already the latest checkpoint
    tmp = ckpts / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for key, module in nets.items():
            safetensors.torch.save_file(_tensors(module), str(tmp / f"{key}.safetensors"))
        torch.save(state, tmp / "state.pt")
        for file in tmp.iterdir():
            fsync_path(file)
        fsync_path(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)   # a failed write must not leave 20 MB per retry behind
        if is_disk_full(e):
            raise disk_full_error(ckpts, f"checkpoint {name}") from None
        raise
    if final.exists():            # a complete folder a killed run renamed but never pointed latest.json at
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(ckpts)
    atomic_write_json(ckpts / "latest.json", {"dir": name, "images_seen": images_seen})
    _prune(ckpts, keep=max(1, keep), current=name)
    return final


SNAPSHOTS = ("best", "last")
BEST_FILE = "best.json"


def save_best(run_dir: Path, images_seen: int, G_ema: nn.Module, info: dict) -> Path:
    """Keep G_ema as the run's best snapshot: its weights under their own name first, then
    best.json naming them (atomically), then the previous best's weights go. A kill at any
    moment leaves best.json naming a complete file."""
    ckpts = Path(run_dir) / "checkpoints"
    name = f"best-{images_seen:010d}.safetensors"
    try:
        with atomic_path(ckpts / name) as tmp:
            safetensors.torch.save_file(_tensors(G_ema), str(tmp))
    except BaseException as e:
        if is_disk_full(e):
            raise disk_full_error(ckpts, "the best snapshot") from None
        raise
    atomic_write_json(ckpts / BEST_FILE, {"file": name, "images_seen": int(images_seen), **info})
    for old in ckpts.glob("best-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return ckpts / name


def best_snapshot(run_dir: Path) -> dict | None:
    """best.json of the run with "path" added, or None where the run keeps no best (trained
    without --kid-every, or before best snapshots existed); NeighbourhoodsError if it is torn."""
    ckpts = Path(run_dir) / "checkpoints"
    path = ckpts / BEST_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        weights = ckpts / str(info["file"])
        int(info["images_seen"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise NeighbourhoodsError(f"{path} is corrupt ({e}); delete it to use the latest checkpoint") from None
    if not weights.is_file():
        raise NeighbourhoodsError(f"{path} names {weights.name}, which is missing; delete {path.name} to use the "
                                  "latest checkpoint")
    return {**info, "path": weights}


def _prune(ckpts: Path, keep: int, current: str) -> None:
    done = sorted(p for p in ckpts.iterdir() if p.is_dir() and p.name.isdigit())
    for old in done[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpts.glob(".tmp-*"):   # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """({net: state_dict}, state) of a checkpoint folder; NeighbourhoodsError if anything is torn."""
    nets = {key: load_weights(folder / f"{key}.safetensors") for key in ("G", "G_ema", "D")}
    path = folder / "state.pt"
    if not path.is_file():
        raise NeighbourhoodsError(f"{path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torn zip, wrong format, or something that is not plain data
        raise NeighbourhoodsError(f"{path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or "images_seen" not in state:
        raise NeighbourhoodsError(f"{path} is not a training state")
    return nets, state


# --- config.json -----------------------------------------------------------------------------------
def model_args(name: str, res, z_dim: int, class_names: list[str], kwargs: dict) -> dict:
    """What a loader needs to rebuild G: config.json's "model_args" block (as nanoGPT's)."""
    return {"name": name, "res": list(res), "z_dim": int(z_dim), "class_names": list(class_names),
            "kwargs": dict(kwargs)}


def city_map_of(config: dict, class_names: list[str]) -> CityMap:
    """config.json's city_map (runs written before it: their classes plus merged_cities)."""
    return CityMap.from_json(class_names, config.get("city_map"), config.get("merged_cities", []))


def read_model_args(config: dict, path: Path) -> dict:
    """The run's model_args block; runs written before it existed carry the same fields at the top."""
    if isinstance(config.get("model_args"), dict):
        return config["model_args"]
    try:
        return model_args(config["model"], config["res"], config.get("z_dim", 0), config["class_names"],
                          config.get("model_kwargs", {}))
    except KeyError as e:
        raise NeighbourhoodsError(f"{path} lacks {e}") from None


# --- evaluations (written by `evaluate`, read by `report`) ----------------------------------------
def eval_dir(run_dir: Path, images_seen: int) -> Path:
    """Where `evaluate` writes the metrics of the checkpoint at `images_seen`."""
    return Path(run_dir) / "eval" / f"{int(images_seen):010d}"


def latest_evaluation(run_dir: Path) -> dict | None:
    """The metrics.json of the most advanced checkpoint evaluated, or None."""
    folders = sorted(p for p in (Path(run_dir) / "eval").glob("*") if (p / "metrics.json").is_file())
    if not folders:
        return None
    return json.loads((folders[-1] / "metrics.json").read_text())
