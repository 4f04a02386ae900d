"""`neighbourhoods train`: a city-conditioned GAN trained on the workspace's prepared photos.

The loop follows StyleGAN2-ADA's conventions: progress is counted in images shown (kimg), not
epochs; G_ema (an exponential moving average of G, with a ramp-up so short runs are not
dominated by the random init) is what samples and gets served; snapshots of weights and of a
fixed-seed sample grid are taken at image intervals; metrics go to metrics.jsonl and
TensorBoard. The run folder format is documented in runs.py.

Exactness: the data order is a pure function of (seed, images_seen), and every other piece of
randomness comes from RNGs whose states are checkpointed, so `resume` continues bit-for-bit
(on the same device and world size). Checkpoints are written to a temporary folder and
renamed; latest.json is replaced atomically last, so a kill at any moment leaves the last
good checkpoint usable. A non-finite loss rolls back to the last checkpoint instead of
training on garbage.

Scale: CPU by default; `device="cuda"` adds mixed precision; under `torchrun` (WORLD_SIZE > 1)
each process trains on its shard of every batch, gradients averaged by
DistributedDataParallel, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neighbourhoods import models
from neighbourhoods.core import prepared
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.models.runs import (ANY_CITY, generate_images, latest_checkpoint, load_state_into,
                   load_weights, read_config)
from neighbourhoods.core.workspace import Workspace, atomic_path, atomic_write_json, atomic_write_text, fsync_path, open_workspace


from neighbourhoods.core.resolution import res_name


@dataclass
class TrainConfig:
    model: str = "projected"                  # registered model name (models.MODELS): "projected" or "dcgan"
    res: tuple[int, int] = (64, 64)           # (H, W) to train at; prepared data must exist at it (4:3 e.g. (48, 64))
    run: str | None = None                    # run folder under WS/runs; None = "<model>-<H>x<W>"
    resume: bool = False                      # continue the run from its latest checkpoint
    batch: int | None = None                  # images per step, summed over all processes; None = the model's recipe, else 64
    kimg: float | None = 500.0                # stop when this many thousand images have been shown in total (None = no limit)
    minutes: float | None = None              # stop after this many minutes of training in this call (None = no limit)
    lr_g: float | None = None                 # Adam learning rate of G; None = the model's recipe
    lr_d: float | None = None                 # Adam learning rate of D; None = the model's recipe
    betas: tuple[float, float] | None = None  # Adam betas of both; None = the model's recipe
    loss: str | None = None                   # "bce" (non-saturating) or "hinge"; None = models.LOSSES[model]
    augment: str | None = None                # DiffAugment policy for real and fake images before D, e.g. "color,translation,cutout"; "" = off; None = the model's recipe
    mirror: bool | None = None                # random left-right flips of the real photos; None = the model's recipe
    ema_kimg: float | None = None             # half-life of the EMA of G, in thousands of images (0 = G_ema is a copy of G); None = the model's recipe, else 10
    ema_rampup: float | None = 0.05           # EMA half-life at most this fraction of the images seen so far (None = no ramp-up)
    seed: int = 0                             # seeds weights, data order, noise and augmentation
    min_city_photos: int = 50                 # cities with fewer training photos share the "(any city)" class, which also serves unknown cities
    mode_seeking: float | None = None         # weight of the mode-seeking term in G's loss (MSGAN; 0 = off); None = the model's recipe, else 0
    any_city_p: float | None = None           # fraction of all photos also shown as "(any city)", so that class learns every city's mix; None = the model's recipe, else 0
    model_kwargs: dict = field(default_factory=dict)  # extra arguments of the model's builder (widths, z_dim, ...)
    snapshot_every: int = 20_000              # images between checkpoints (one is also written at the start and the end)
    sample_every: int = 10_000                # images between fixed-seed sample grids
    tick_every: int = 1_000                   # images between metrics.jsonl / TensorBoard lines
    kid_every: int = 0                        # images between KID estimates during training (0 = off; costs ~1 min per 1000 images on a CPU)
    kid_images: int = 300                     # samples per KID estimate (against all held-out photos)
    bn_stat_images: int = 512                 # before each snapshot, G_ema's BatchNorm statistics are re-estimated from this many samples (0 = keep G's)
    keep_checkpoints: int = 3                 # most recent checkpoints kept on disk
    grid_rows: int = 12                       # cities in the sample grid (those with the most photos)
    grid_seeds: int = 8                       # fixed seeds per city in the sample grid (columns)
    num_workers: int = 1                      # background threads reading batches from the memory-mapped arrays (0 = inline)
    device: str = "cpu"                       # "cpu", "cuda" or "cuda:N" (under torchrun: cuda:LOCAL_RANK)
    threads: int | None = None                # CPU threads torch may use (None = its default, one per core; 1 is faster on a busy machine)
    amp: str = "bf16"                         # CUDA only: "bf16", "fp16" (with a GradScaler) or "off"; the CPU trains in fp32
    max_rollbacks: int = 3                    # non-finite losses tolerated (each rolls back to the last checkpoint) before giving up
    progress: bool = True                     # show a progress bar and messages


# Fields that define a run: on resume they come from the run's config.json, whatever is passed.
RUN_FIELDS = ("model", "res", "batch", "lr_g", "lr_d", "betas", "loss", "augment", "mirror", "ema_kimg",
              "ema_rampup", "seed", "min_city_photos", "any_city_p", "mode_seeking", "model_kwargs", "grid_rows", "grid_seeds")
DEFAULT_BATCH = 64
DEFAULT_EMA_KIMG = 10.0
DEFAULT_LR = 2e-4
DEFAULT_BETAS = (0.0, 0.99)


@dataclass
class TrainResult:
    run_dir: Path
    G: nn.Module            # the trained generator (this process's copy)
    G_ema: nn.Module        # its moving average, the one that samples
    D: nn.Module
    images_seen: int


def train(workspace: Workspace | str | os.PathLike, config: TrainConfig) -> Path:
    """Train (or resume) a run as `config` says; returns the run folder."""
    return train_models(workspace, config).run_dir


# --- configuration -------------------------------------------------------------------------------
def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill the fields left at None from the model's recipe, and check the rest."""
    recipe = models.recipe(config.model)
    values = asdict(config)
    values["res"] = tuple(config.res)
    for key in ("batch", "lr_g", "lr_d", "betas", "loss", "augment", "mirror", "ema_kimg", "any_city_p", "mode_seeking"):
        if values[key] is None:
            values[key] = recipe.get(key)
    values["batch"] = int(values["batch"] if values["batch"] is not None else DEFAULT_BATCH)
    values["lr_g"] = float(values["lr_g"] if values["lr_g"] is not None else DEFAULT_LR)
    values["lr_d"] = float(values["lr_d"] if values["lr_d"] is not None else DEFAULT_LR)
    values["betas"] = tuple(float(b) for b in (values["betas"] if values["betas"] is not None else DEFAULT_BETAS))
    values["ema_kimg"] = float(values["ema_kimg"] if values["ema_kimg"] is not None else DEFAULT_EMA_KIMG)
    values["augment"] = values["augment"] or ""
    values["mirror"] = bool(values["mirror"])
    values["any_city_p"] = float(values["any_city_p"] or 0.0)
    values["mode_seeking"] = float(values["mode_seeking"] or 0.0)
    cfg = TrainConfig(**values)
    if cfg.loss not in ("bce", "hinge"):
        raise NeighbourhoodsError(f"unknown loss {cfg.loss!r}: use bce or hinge")
    if cfg.augment:
        from neighbourhoods.train.augment import parse_policy
        try:
            parse_policy(cfg.augment)
        except ValueError as e:
            raise NeighbourhoodsError(str(e)) from None
    if cfg.batch < 1:
        raise NeighbourhoodsError(f"--batch must be at least 1 (got {cfg.batch})")
    if cfg.kimg is not None and cfg.kimg <= 0 or cfg.minutes is not None and cfg.minutes <= 0:
        raise NeighbourhoodsError("--kimg and --minutes must be positive")
    if cfg.kimg is None and cfg.minutes is None:
        raise NeighbourhoodsError("give --kimg or --minutes: training would never stop")
    if cfg.mode_seeking < 0:
        raise NeighbourhoodsError(f"--mode-seeking must be >= 0 (got {cfg.mode_seeking})")
    if cfg.amp not in ("bf16", "fp16", "off"):
        raise NeighbourhoodsError(f"unknown --amp {cfg.amp!r}: use bf16, fp16 or off")
    return cfg


def _config_from_json(saved: dict) -> dict:
    out = {f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved}
    out["res"] = tuple(out["res"])
    if out.get("betas") is not None:
        out["betas"] = tuple(out["betas"])
    return out


# --- conditioning classes ------------------------------------------------------------------------
def class_map(label_names: list[str], labels: np.ndarray, min_city_photos: int,
              always_any: bool = False) -> tuple[list[str], np.ndarray, list[str]]:
    """(class_names, class of each photo, merged city names).

    Cities with at least `min_city_photos` photos keep their own class, in labels.json order;
    the rest (and unlabelled photos) share ANY_CITY, appended last, so a city with a handful of
    photos cannot collapse to copies of them.
    """
    counts = np.bincount(labels[labels >= 0], minlength=len(label_names))
    own = [i for i, n in enumerate(counts) if n >= min_city_photos and label_names[i] != ANY_CITY]
    class_names = [label_names[i] for i in own]
    lut = np.full(len(label_names) + 1, -1, dtype=np.int64)   # the extra last slot: label -1 (none)
    lut[own] = np.arange(len(own))
    merged = [label_names[i] for i, n in enumerate(counts) if n > 0 and lut[i] < 0]
    if always_any or (lut[labels] < 0).any():
        class_names.append(ANY_CITY)
        lut[lut < 0] = len(class_names) - 1
    return class_names, lut[labels], merged


# --- data ------------------------------------------------------------------------------------------
class BatchReader:
    """Batches from the memory-mapped arrays, in an order that depends only on (seed, position).

    Position p (= images shown before it) maps to photo perm_e[p mod N] of epoch e = p div N,
    perm_e a seeded permutation: every photo once per epoch, and resuming at images_seen needs
    no sampler state. Rank r of W takes every W-th image of each global batch. Only a batch's
    worth of pixels is ever in memory, whatever the dataset size.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, classes: np.ndarray, seed: int, mirror: bool,
                 rank: int, world: int, workers: int, any_class: int = -1, any_p: float = 0.0, pin: bool = False):
        self.images, self.rows, self.classes = images, rows, classes
        self.pin = pin   # page-locked batches copy to a GPU asynchronously
        self.any_class, self.any_p = any_class, any_p
        self.seed, self.mirror, self.rank, self.world = seed, mirror, rank, world
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers) if workers > 0 else None
        self._pending: dict[tuple[int, int], Future] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._lock:
            if epoch not in self._epochs:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(len(self.rows), generator=g).numpy()
                flips = torch.randint(0, 2, (len(self.rows),), generator=g).numpy().astype(bool)
                as_any = torch.rand(len(self.rows), generator=g).numpy() < self.any_p
                self._epochs[epoch] = (perm, flips, as_any)
                while len(self._epochs) > 3:
                    self._epochs.popitem(last=False)
            return self._epochs[epoch]

    def _load(self, position: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.rows)
        pos = np.arange(position, position + batch)[self.rank::self.world]
        picks, flips, as_any = [], [], []
        for p in pos:
            perm, flip, anyc = self._epoch(int(p) // n)
            picks.append(perm[p % n])
            flips.append(flip[p % n])
            as_any.append(anyc[p % n])
        picks = np.array(picks, dtype=np.int64)
        x = np.stack([self.images[self.rows[i]] for i in picks])          # N x H x W x 3 uint8
        if self.mirror:
            x[np.array(flips)] = x[np.array(flips), :, ::-1]
        labels = self.classes[picks].copy()
        if self.any_class >= 0:
            labels[np.array(as_any)] = self.any_class
        x, labels = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
        return (x.pin_memory(), labels.pin_memory()) if self.pin else (x, labels)

    def get(self, position: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the global batch starting at `position`; prefetches the next one."""
        key = (position, batch)
        future = self._pending.pop(key, None)
        out = future.result() if future is not None else self._load(position, batch)
        if self._pool is not None:
            for stale in list(self._pending):   # after a rollback the old prefetches are of no use
                if stale[0] < position:
                    self._pending.pop(stale)
            nxt = (position + batch, batch)
            if nxt not in self._pending:
                self._pending[nxt] = self._pool.submit(self._load, *nxt)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# --- losses ----------------------------------------------------------------------------------------
def _terms(logits) -> list[torch.Tensor]:
    """D may return one tensor or a list (one per scale); every loss averages over them."""
    return [t.float() for t in (logits if isinstance(logits, (list, tuple)) else [logits])]


def d_loss(kind: str, real_logits, fake_logits) -> torch.Tensor:
    real, fake = _terms(real_logits), _terms(fake_logits)
    if kind == "bce":   # BCE with logits: -log sigmoid(real) - log(1 - sigmoid(fake))
        parts = [F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real, fake)]
    else:
        parts = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)]
    return sum(parts) / len(parts)


def pair_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels whose second half repeats the first, so fake i and fake i + N/2 share a city."""
    half = labels.shape[0] // 2
    out = labels.clone()
    out[half:2 * half] = labels[:half]
    return out


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """MSGAN (Mao et al., CVPR 2019): penalise fakes that differ less than their latents do.

    Pairs fake i with fake i + N/2 (same city, see pair_labels); the term is the mean over
    pairs of 1 / (mean |x1 - x2| / mean |z1 - z2|), large when two latents give one image.
    """
    half = fake.shape[0] // 2
    if half == 0:
        return fake.new_zeros(())
    dx = (fake[:half].float() - fake[half:2 * half].float()).abs().flatten(1).mean(1)
    dz = (z[:half].float() - z[half:2 * half].float()).abs().mean(1)
    return (1.0 / (dx / dz + 1e-5)).mean()


def g_loss(kind: str, fake_logits) -> torch.Tensor:
    fake = _terms(fake_logits)
    if kind == "bce":   # non-saturating: -log sigmoid(fake)
        parts = [F.softplus(-f).mean() for f in fake]
    else:
        parts = [-f.mean() for f in fake]
    return sum(parts) / len(parts)


# --- EMA -------------------------------------------------------------------------------------------
def ema_beta(config: TrainConfig, images_seen: int) -> float:
    """Per-step decay: half-life ema_kimg, capped at ema_rampup x images seen (StyleGAN2-ADA)."""
    ema_nimg = config.ema_kimg * 1000
    if config.ema_rampup is not None:
        ema_nimg = min(ema_nimg, images_seen * config.ema_rampup)
    return 0.5 ** (config.batch / max(ema_nimg, 1e-8))


@torch.no_grad()
def update_ema(G_ema: nn.Module, G: nn.Module, beta: float) -> None:
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):   # BatchNorm statistics: copied, as StyleGAN does
        b_ema.copy_(b)


@torch.no_grad()
def standing_bn_stats(G_ema: nn.Module, class_weights: np.ndarray, images: int, batch: int, seed: int) -> None:
    """Re-estimate G_ema's BatchNorm running statistics for G_ema's own weights.

    G_ema is an average of G's weights, but G's running statistics belong to G's weights of the
    last few steps; sampling in eval mode with them drifts from what the network does with
    batch statistics (the "standing statistics" of BigGAN). Averaging the batch statistics of
    `images` samples, drawn for the training classes' mix, makes eval-mode samples (which do
    not depend on the batch) match train-mode ones. Uses its own RNG: the run's streams are
    left untouched, so resume stays exact.
    """
    norms = [m for m in G_ema.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or images <= 0:
        return
    device = next(G_ema.parameters()).device
    g = torch.Generator().manual_seed(seed)
    probs = torch.as_tensor(class_weights, dtype=torch.float64)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None   # cumulative average over the batches below
    G_ema.train()
    try:
        for start in range(0, images, batch):
            n = min(batch, images - start)
            z = torch.randn(n, G_ema.z_dim, generator=g).to(device)
            labels = torch.multinomial(probs, n, replacement=True, generator=g).to(device)
            G_ema(z, labels)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        G_ema.eval()


# --- RNG state (as tensors and lists, so state.pt loads with weights_only=True) ---------------------
def capture_rng() -> dict:
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


# --- distributed -----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False    # we called init_process_group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (gloo on CPU, nccl on CUDA)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def _device(config: TrainConfig, dd: Dist) -> torch.device:
    if config.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NeighbourhoodsError("--device cuda asked for, but torch sees no CUDA GPU here")
        return torch.device("cuda", dd.local_rank) if dd.world > 1 else torch.device(config.device)
    if config.device != "cpu":
        raise NeighbourhoodsError(f"unknown --device {config.device!r}: use cpu or cuda")
    return torch.device("cpu")


# --- checkpoints -----------------------------------------------------------------------------------
def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: Path, images_seen: int, nets: dict[str, nn.Module], state: dict, keep: int) -> Path:
    """Write checkpoints/<images_seen:010d>/ via a temporary folder, then latest.json, then prune."""
    from safetensors.torch import save_file

    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"{images_seen:010d}"
    final = ckpts / name
    with contextlib.suppress(NeighbourhoodsError):
        if latest_checkpoint(run_dir)[0] == final:
            return final          # this very state is already the latest checkpoint
    tmp = ckpts / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for key, module in nets.items():
        save_file(_tensors(module), str(tmp / f"{key}.safetensors"))
    torch.save(state, tmp / "state.pt")
    for file in tmp.iterdir():
        fsync_path(file)
    fsync_path(tmp)
    if final.exists():            # a complete folder a killed run renamed but never pointed latest.json at
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(ckpts)
    atomic_write_json(ckpts / "latest.json", {"dir": name, "images_seen": images_seen})
    _prune(ckpts, keep=max(1, keep), current=name)
    return final


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


# --- sample grid -----------------------------------------------------------------------------------
def grid_rows_for(class_names: list[str], classes: np.ndarray, rows: int) -> list[int]:
    """The `rows` classes with the most training photos, in class order."""
    counts = np.bincount(classes, minlength=len(class_names))
    top = sorted(np.argsort(-counts, kind="stable")[:rows].tolist())
    return [int(c) for c in top]


def save_grid(path: Path, images: np.ndarray, row_names: list[str], columns: int) -> np.ndarray:
    """Cities down, seeds across, city names in a left margin."""
    from PIL import Image, ImageDraw, ImageFont

    n, h, w, _ = images.shape
    font = ImageFont.load_default()
    pad = 2
    margin = min(160, 8 + max((int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(name[:24], font=font))
                               for name in row_names), default=0))
    canvas = Image.new("RGB", (margin + columns * (w + pad), len(row_names) * (h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(row_names):
        draw.text((4, r * (h + pad) + h // 2 - 5), name[:24], fill=(0, 0, 0), font=font)
        for c in range(columns):
            canvas.paste(Image.fromarray(images[r * columns + c]), (margin + c * (w + pad), r * (h + pad)))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return np.asarray(canvas)


# --- KID during training --------------------------------------------------------------------------
def training_kid(ws: Workspace, config: TrainConfig, G_ema: nn.Module, class_names: list[str]) -> tuple[float, float] | None:
    """KID (mean, std) of G_ema against the held-out photos, or None where none are held out.

    The one call site of the evaluate stage's scorer during training (every config.kid_every
    images): same Inception features and protocol as `neighbourhoods evaluate`, fixed seeds.
    """
    from neighbourhoods.evaluate import training_kid as evaluate_kid

    return evaluate_kid(ws, tuple(config.res), G_ema, class_names, n=config.kid_images)


# --- one step --------------------------------------------------------------------------------------
@dataclass
class StepNets:
    G: nn.Module
    D: nn.Module
    G_train: nn.Module          # G, or G wrapped in DistributedDataParallel
    D_train: nn.Module          # likewise D
    d_params: list              # D's trainable parameters (not a frozen feature net)
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler


def train_step(n: StepNets, real: torch.Tensor, labels: torch.Tensor, z: torch.Tensor, loss: str, aug,
               autocast, mode_seeking: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One D update, then one G update; returns (loss_d, loss_g) of this process.

    One G forward serves both updates, as in the reference DCGAN loop; fakes are drawn for the
    real photos' cities (with mode seeking: the first half's cities, twice, so fakes come in
    same-city pairs). `aug` (DiffAugment or identity) sees real and fake alike.
    """
    fake_labels = pair_labels(labels) if mode_seeking else labels
    with autocast():
        fake = n.G_train(z, fake_labels)
        loss_d = d_loss(loss, n.D_train(aug(real), labels), n.D_train(aug(fake.detach()), fake_labels))
    n.opt_d.zero_grad(set_to_none=True)
    n.scaler_d.scale(loss_d).backward()
    n.scaler_d.step(n.opt_d)
    n.scaler_d.update()

    for p in n.d_params:
        p.requires_grad_(False)
    try:
        with autocast():   # through the plain D: its gradients are neither needed nor synced
            loss_g = g_loss(loss, n.D(aug(fake), fake_labels))
            if mode_seeking:
                loss_g = loss_g + mode_seeking * mode_seeking_loss(fake, z)
        n.opt_g.zero_grad(set_to_none=True)
        n.scaler_g.scale(loss_g).backward()
        n.scaler_g.step(n.opt_g)
        n.scaler_g.update()
    finally:
        for p in n.d_params:
            p.requires_grad_(True)
    return loss_d, loss_g


# --- the loop --------------------------------------------------------------------------------------
def _say(config: TrainConfig, dd: Dist, message: str) -> None:
    if config.progress and dd.main:
        from tqdm import tqdm
        tqdm.write(message)


def _prepare_run(ws: Workspace, config: TrainConfig, dd: Dist) -> tuple[Path, TrainConfig]:
    name = config.run or f"{config.model}-{res_name(tuple(config.res))}"
    if not name or "/" in name or name.startswith("."):
        raise NeighbourhoodsError(f"bad run name {name!r}: use a plain folder name")
    run_dir = ws.run_dir(name)
    if config.resume:
        if not (run_dir / "config.json").is_file():
            raise NeighbourhoodsError(f"nothing to resume: {run_dir} has no config.json; drop --resume to start it")
        saved = _config_from_json(read_config(run_dir))
        saved.setdefault("mode_seeking", 0.0)   # runs from before the option trained without the term
        passed = asdict(config)
        ignored = [k for k in RUN_FIELDS if k in saved and passed[k] is not None
                   and passed[k] != getattr(TrainConfig(), k) and _canon(passed[k]) != _canon(saved[k])]
        if ignored:
            _say(config, dd, f"note: resuming with the run's own {', '.join(f'{k}={saved[k]}' for k in ignored)}")
        merged = {**passed, **{k: saved[k] for k in RUN_FIELDS if k in saved}, "run": name}
        return run_dir, resolve_config(TrainConfig(**merged))
    if (run_dir / "config.json").is_file():
        raise NeighbourhoodsError(f"run {name!r} already exists in {ws.runs_dir}: pass --resume to continue it, "
                                  "or --run NEW_NAME to start another")
    cfg = resolve_config(config)
    cfg.run = name
    return run_dir, cfg


def _canon(value):
    return list(value) if isinstance(value, tuple) else value


def train_models(workspace: Workspace | str | os.PathLike, config: TrainConfig) -> TrainResult:
    """train(), returning this process's networks too (tests compare DDP ranks with it)."""
    ws = workspace if isinstance(workspace, Workspace) else open_workspace(workspace)
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(max(1, config.threads))
    dd = init_distributed(config.device)
    try:
        return _train(ws, config, dd)
    finally:
        torch.set_num_threads(threads)
        if dd.owns_group:
            dist.destroy_process_group()


def _train(ws: Workspace, config: TrainConfig, dd: Dist) -> TrainResult:
    from tqdm import tqdm

    run_dir, cfg = _prepare_run(ws, config, dd)
    device = _device(cfg, dd)
    if cfg.batch % dd.world:
        raise NeighbourhoodsError(f"--batch {cfg.batch} does not split evenly over {dd.world} processes")
    batch_local = cfg.batch // dd.world

    # Data: the train split of the selected photos, memory-mapped.
    split = prepared.load_split(ws, tuple(cfg.res), "train")
    if len(split) == 0:
        raise NeighbourhoodsError(f"no training photos at {res_name(cfg.res)} (is everything held out or deselected?)")
    if split.images.shape[1:3] != tuple(cfg.res):
        raise NeighbourhoodsError(f"prepared arrays are {split.images.shape[1]}x{split.images.shape[2]}, not {res_name(cfg.res)}")
    class_names, classes, merged = class_map(split.label_names, split.labels, cfg.min_city_photos,
                                             always_any=cfg.any_city_p > 0)
    grid_classes = grid_rows_for(class_names, classes, cfg.grid_rows)
    grid_seeds = list(range(cfg.grid_seeds))

    # Networks: identical init on every rank.
    seed_everything(cfg.seed)
    G, D = models.build(cfg.model, len(class_names), tuple(cfg.res), **cfg.model_kwargs)
    G_ema = copy.deepcopy(G)
    G.to(device).train()
    D.to(device).train()
    G_ema.to(device).eval().requires_grad_(False)
    d_params = [p for p in D.parameters() if p.requires_grad]   # a frozen feature net stays out
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=cfg.betas)
    opt_d = torch.optim.Adam(d_params, lr=cfg.lr_d, betas=cfg.betas)
    use_amp = device.type == "cuda" and cfg.amp != "off"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed shapes: pick the fastest kernels once
    amp_dtype = torch.float16 if cfg.amp == "fp16" else torch.bfloat16
    scaler_g = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.amp == "fp16")
    scaler_d = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.amp == "fp16")
    G_train, D_train = G, D
    if dd.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        # broadcast_buffers=False: D runs twice (real, fake) before one backward; re-broadcasting
        # BatchNorm buffers in between would modify tensors autograd saved.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})   # renamed in torch 2.13
        G_train = DDP(G, device_ids=ids, **no_sync)
        D_train = DDP(D, device_ids=ids, **no_sync)
    # Ranks draw different noise and augmentations; rank 0 of a single process keeps `seed`.
    seed_everything(cfg.seed + 1_000_003 * dd.rank)

    if cfg.augment:
        from neighbourhoods.train.augment import diffaugment

        def aug(x: torch.Tensor) -> torch.Tensor:
            return diffaugment(x, cfg.augment)
    else:
        def aug(x: torch.Tensor) -> torch.Tensor:
            return x

    nets = {"G": G, "G_ema": G_ema, "D": D}
    info = {"images_seen": 0, "time_s": 0.0, "rollbacks": 0}

    def state_dict() -> dict:
        rng = capture_rng()
        if dd.world > 1:
            per_rank = [None] * dd.world
            dist.all_gather_object(per_rank, rng)
        else:
            per_rank = [rng]
        return {"format": 1, "images_seen": info["images_seen"], "time_s": info["time_s"],
                "rollbacks": info["rollbacks"], "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                "scaler_g": scaler_g.state_dict(), "scaler_d": scaler_d.state_dict(),
                "ema": {"ema_kimg": cfg.ema_kimg, "ema_rampup": cfg.ema_rampup},
                "augment": {"policy": cfg.augment, "mirror": cfg.mirror},
                "sampler": {"seed": cfg.seed, "position": info["images_seen"], "photos": len(split),
                            "world": dd.world},
                "rng": per_rank}

    def restore(folder: Path) -> dict:
        weights, state = load_checkpoint(folder)
        for key, module in nets.items():
            load_state_into(module, weights[key], folder / f"{key}.safetensors")
        try:
            opt_g.load_state_dict(state["opt_g"])
            opt_d.load_state_dict(state["opt_d"])
            scaler_g.load_state_dict(state["scaler_g"])
            scaler_d.load_state_dict(state["scaler_d"])
            info.update(images_seen=int(state["images_seen"]), time_s=float(state["time_s"]),
                        rollbacks=int(state["rollbacks"]))
            rngs = state["rng"]
        except (KeyError, ValueError, RuntimeError) as e:
            raise NeighbourhoodsError(f"{folder / 'state.pt'} does not fit this run ({e})") from None
        if len(rngs) == dd.world:
            restore_rng(rngs[dd.rank])
        else:   # a different process count cannot continue the same random streams
            seed_everything(cfg.seed + 1_000_003 * dd.rank + info["images_seen"])
        return state

    class_weights = np.bincount(classes, minlength=len(class_names)) / len(classes)
    calibrated = {"at": -1}

    def calibrate() -> None:
        """Standing BatchNorm statistics for G_ema before it is saved or sampled (same on every rank)."""
        if calibrated["at"] != info["images_seen"]:
            standing_bn_stats(G_ema, class_weights, cfg.bn_stat_images, max(batch_local, 64),
                              seed=cfg.seed * 7919 + info["images_seen"])
            calibrated["at"] = info["images_seen"]

    def checkpoint() -> None:
        calibrate()
        state = state_dict()   # collective under DDP: every rank takes part
        if dd.world > 1:       # BatchNorm statistics drift per rank; keep rank 0's everywhere
            for module in nets.values():
                for b in module.buffers():
                    dist.broadcast(b, 0)
        if dd.main:
            save_checkpoint(run_dir, info["images_seen"], nets, state, cfg.keep_checkpoints)
        dd.barrier()

    def grid() -> None:
        if dd.main:
            calibrate()
            images = generate_images(G_ema, [c for c in grid_classes for _ in grid_seeds], grid_seeds * len(grid_classes))
            path = run_dir / "samples" / f"progress-{info['images_seen']:010d}.png"
            sheet = save_grid(path, images, [class_names[c] for c in grid_classes], len(grid_seeds))
            if writer is not None:
                writer.add_image("samples", sheet, info["images_seen"], dataformats="HWC")

    # The run folder: config first (atomically), then the initial checkpoint, so there is
    # always a good checkpoint to resume or roll back to.
    fresh = True
    if cfg.resume and (run_dir / "checkpoints" / "latest.json").exists():
        saved_names = read_config(run_dir).get("class_names")
        if saved_names != class_names:
            raise NeighbourhoodsError(f"the workspace's training classes changed since run {run_dir.name!r} started "
                                      f"({len(saved_names or [])} then, {len(class_names)} now): start a new run")
        folder, _ = latest_checkpoint(run_dir)
        state = restore(folder)
        fresh = False
        if state["sampler"]["photos"] != len(split):
            _say(cfg, dd, f"warning: {len(split)} training photos now, {state['sampler']['photos']} when the "
                          "checkpoint was written; the data order differs from an uninterrupted run")
        _say(cfg, dd, f"resuming {run_dir.name} at {info['images_seen']:,} images ({folder.name})")
    elif cfg.resume and any(p.name.isdigit() for p in (run_dir / "checkpoints").glob("*")):
        latest_checkpoint(run_dir)   # raises the clear "latest.json is missing" error
    if dd.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", {
            **_jsonable(asdict(cfg)), "model": cfg.model, "res": list(cfg.res), "z_dim": int(G.z_dim),
            "class_names": class_names, "class_counts": np.bincount(classes, minlength=len(class_names)).tolist(),
            "merged_cities": merged, "train_photos": len(split),
            "grid": {"classes": grid_classes, "seeds": grid_seeds}})
        _trim_metrics(run_dir / "metrics.jsonl", info["images_seen"])
    dd.barrier()
    writer = None
    if dd.main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=info["images_seen"] or None)
    if fresh:
        _say(cfg, dd, f"training {cfg.model} at {res_name(cfg.res)} on {len(split):,} photos, {len(class_names)} classes"
                      + (f" ({ANY_CITY}: {len(merged)} cities with < {cfg.min_city_photos} photos)" if merged else "")
                      + f" -> {run_dir}")
        checkpoint()
        grid()

    reader = BatchReader(split.images, split.rows, classes, cfg.seed, cfg.mirror, dd.rank, dd.world, cfg.num_workers,
                         any_class=class_names.index(ANY_CITY) if cfg.any_city_p > 0 else -1, any_p=cfg.any_city_p,
                         pin=device.type == "cuda")
    limit = math.inf if cfg.kimg is None else cfg.kimg * 1000
    deadline = math.inf if cfg.minutes is None else time.monotonic() + cfg.minutes * 60
    by_time = deadline != math.inf and (limit == math.inf or cfg.minutes is not None)
    bar = tqdm(total=(round(cfg.minutes * 60) if by_time else int(limit)),
               initial=0 if by_time else min(info["images_seen"], int(limit)),
               unit="img", unit_scale=True, dynamic_ncols=True, disable=not (cfg.progress and dd.main),
               desc=f"train {run_dir.name}",
               # a time budget: the bar fills with seconds; images/s and kimg are in the postfix
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}" if by_time else None)
    start = time.monotonic()
    tick = {"busy": 0.0, "images": info["images_seen"], "loss_d": 0.0, "loss_g": 0.0, "steps": 0}
    interrupted = {"flag": False}
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):   # first Ctrl-C: finish the step, checkpoint, stop
            if interrupted["flag"]:
                raise KeyboardInterrupt
            interrupted["flag"] = True
        old_handler = signal.signal(signal.SIGINT, on_sigint)
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if use_amp else contextlib.nullcontext
    step_nets = StepNets(G, D, G_train, D_train, d_params, opt_g, opt_d, scaler_g, scaler_d)

    try:
        while info["images_seen"] < limit:
            step_start = time.monotonic()
            uint8_real, labels = reader.get(info["images_seen"], cfg.batch)
            real = uint8_real.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
            labels = labels.to(device, non_blocking=True)
            z = torch.randn(batch_local, G.z_dim, device=device)

            loss_d, loss_g = train_step(step_nets, real, labels, z, cfg.loss, aug, autocast, cfg.mode_seeking)

            stats = torch.stack([loss_d.detach().float(), loss_g.detach().float()]).cpu()
            stop = float(time.monotonic() >= deadline or interrupted["flag"])
            stats = torch.cat([stats, torch.tensor([stop])])
            if dd.world > 1:
                stats = stats.to(device)
                dist.all_reduce(stats)
                stats = stats.cpu()
                stats[:2] /= dd.world
            ld, lg, stop = stats.tolist()
            if not (math.isfinite(ld) and math.isfinite(lg)):
                info["rollbacks"] += 1
                folder, n = latest_checkpoint(run_dir)
                if info["rollbacks"] > cfg.max_rollbacks:
                    raise NeighbourhoodsError(
                        f"non-finite loss (loss_d={ld}, loss_g={lg}) at {info['images_seen']:,} images, "
                        f"{info['rollbacks']} times: giving up; the last good checkpoint is {folder} "
                        "(try a lower --lr-g/--lr-d, or --amp bf16/off)")
                _say(cfg, dd, f"non-finite loss (loss_d={ld}, loss_g={lg}) at {info['images_seen']:,} images: "
                              f"rolled back to the checkpoint at {n:,} images "
                              f"(rollback {info['rollbacks']} of at most {cfg.max_rollbacks})")
                rollbacks = info["rollbacks"]
                restore(folder)
                info["rollbacks"] = rollbacks
                # Fresh noise, so the same steps are not replayed into the same failure.
                seed_everything(cfg.seed + 1_000_003 * dd.rank + 7919 * rollbacks + info["images_seen"])
                tick.update(busy=0.0, images=info["images_seen"], loss_d=0.0, loss_g=0.0, steps=0)
                continue

            before = info["images_seen"]
            info["images_seen"] += cfg.batch
            after = info["images_seen"]
            update_ema(G_ema, G, ema_beta(cfg, after))
            step_time = time.monotonic() - step_start
            info["time_s"] += step_time
            tick["busy"] += step_time
            tick["loss_d"] += ld
            tick["loss_g"] += lg
            tick["steps"] += 1
            if bar.disable:
                pass
            elif by_time:
                bar.n = min(bar.total, round(time.monotonic() - start))
            else:
                bar.n = min(after, int(limit))
            if not bar.disable:
                bar.set_postfix(kimg=f"{after / 1000:.1f}", img_s=f"{(after - tick['images']) / max(tick['busy'], 1e-9):.1f}",
                                loss_d=f"{ld:.3f}", loss_g=f"{lg:.3f}", refresh=True)

            done = after >= limit or stop > 0
            crossed = lambda every: every > 0 and (after // every > before // every or done)   # noqa: E731
            if crossed(cfg.tick_every):
                rate = (after - tick["images"]) / max(tick["busy"], 1e-9)   # training steps only, not snapshots
                line = {"images_seen": after, "time_s": round(info["time_s"], 3),
                        "loss_g": tick["loss_g"] / tick["steps"], "loss_d": tick["loss_d"] / tick["steps"],
                        "images_per_s": round(rate, 2)}
                if cfg.kid_every > 0 and crossed(cfg.kid_every) and dd.main:
                    kid = training_kid(ws, cfg, G_ema, class_names)
                    if kid is not None:
                        line["kid"], line["kid_std"] = kid
                if dd.main:
                    with open(run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(line) + "\n")
                    for key in ("loss_g", "loss_d", "images_per_s", "kid"):
                        if key in line:
                            writer.add_scalar(f"train/{key}", line[key], after)
                tick.update(busy=0.0, images=after, loss_d=0.0, loss_g=0.0, steps=0)
            if crossed(cfg.sample_every):
                grid()
            if crossed(cfg.snapshot_every):
                checkpoint()
            if stop > 0:
                break
        checkpoint()   # no-op if the last step was just saved
        if dd.main and not (run_dir / "samples" / f"progress-{info['images_seen']:010d}.png").exists():
            grid()
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        bar.close()
        reader.close()
        if writer is not None:
            writer.close()
    if interrupted["flag"]:
        _say(cfg, dd, f"interrupted: checkpoint at {info['images_seen']:,} images; continue with --resume")
    _say(cfg, dd, f"done: {info['images_seen']:,} images in {info['time_s'] / 60:.1f} min of training -> {run_dir}")
    return TrainResult(run_dir, G, G_ema, D, info["images_seen"])


def _jsonable(values: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _trim_metrics(path: Path, images_seen: int) -> None:
    """Drop lines a killed run logged past the checkpoint we resume from."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["images_seen"] <= images_seen:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue   # a line torn by the kill
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))
