"""The training loop: set up once, then one step after another until the budget is spent.

Read top to bottom: what a run sets up, then what one step does, under short comments. The
state that changes from step to step is `TrainState` (counters) and `Nets` (weights and
optimizers); everything else is fixed for the run and lives in `Run`.

Exactness: the data order is a pure function of (seed, images_seen), and every other piece
of randomness comes from RNGs whose states are checkpointed, so `--resume` continues
bit-for-bit (on the same device and world size). A non-finite loss rolls back to the last
checkpoint instead of training on garbage.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from neighbourhoods import models
from neighbourhoods.core.catalog import read_meta
from neighbourhoods.core.cities import CityMap
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import Resolution
from neighbourhoods.core.workspace import Workspace, atomic_write_json
from neighbourhoods.models.runs import (
    ANY_CITY,
    generate_images,
    latest_checkpoint,
    model_args,
    read_config,
    read_model_args,
    save_best,
    save_checkpoint,
)
from neighbourhoods.train import grow, schedule
from neighbourhoods.train.config import (
    BN_STAT_IMAGES,
    GROW_FADE_KIMG,
    KID_IMAGES,
    LAYOUT_WEIGHT,
    MAX_ROLLBACKS,
    TrainConfig,
    describe,
    resolve_run,
    to_json,
)
from neighbourhoods.train.data import BatchReader, TrainingData, load_training_data
from neighbourhoods.train.distributed import Dist, autocast_dtype, pick_device
from neighbourhoods.train.ema import ema_beta, standing_bn_stats, update_ema
from neighbourhoods.train.layouts import fit_layouts
from neighbourhoods.train.logs import (
    Tick,
    deadline,
    open_tensorboard,
    progress_bar,
    progress_grid_path,
    say,
    trim_metrics,
    write_metrics,
    write_progress_grid,
)
from neighbourhoods.train.loss import GANLoss
from neighbourhoods.train.rng import seed_everything
from neighbourhoods.train.state import Nets, TrainState, build_nets, restore, state_dict


@dataclass
class Run:
    """What stays fixed while a run trains."""
    cfg: TrainConfig
    dd: Dist
    device: torch.device
    run_dir: Path
    data: TrainingData
    batch_local: int            # this process's share of each batch
    model_kwargs: dict          # the builder's arguments: the run's model_kwargs, plus the layout prior's size
    writer: object = None       # TensorBoard SummaryWriter on rank 0, else None


@dataclass
class TrainResult:
    run_dir: Path
    G: torch.nn.Module          # the trained generator (this process's copy)
    G_ema: torch.nn.Module      # its moving average, the one that samples
    D: torch.nn.Module
    images_seen: int


def training_loop(ws: Workspace, config: TrainConfig, dd: Dist) -> TrainResult:
    # Resolve the options and the run folder; check them before any data is read.
    run_dir, cfg, notes = resolve_run(ws, config)
    for note in notes:
        say(cfg, dd.main, note)
    device = pick_device(cfg.device, dd)
    if cfg.batch % dd.world:
        raise NeighbourhoodsError(f"--batch {cfg.batch} does not split evenly over {dd.world} processes")

    # Load the data: the train split of the selected photos, memory-mapped.
    data = load_training_data(ws, cfg)
    run = Run(cfg=cfg, dd=dd, device=device, run_dir=run_dir, data=data, batch_local=cfg.batch // dd.world,
              model_kwargs=builder_kwargs(cfg))

    # Construct networks and optimizers (identical init on every rank), then give each rank
    # its own noise and augmentation streams; rank 0 of a single process keeps `seed`.
    nets = build_nets(cfg, len(data.class_names), device, dd, run.model_kwargs)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed shapes: pick the fastest kernels once
    seed_everything(cfg.seed + 1_000_003 * dd.rank)
    loss = build_loss(cfg, nets)
    state = TrainState()

    # Resume from the latest checkpoint, if asked and there is one.
    fresh = True
    if cfg.resume and (run_dir / "checkpoints" / "latest.json").exists():
        saved_args = read_model_args(read_config(run_dir), run_dir / "config.json")
        saved_names = saved_args["class_names"]
        if saved_names != data.class_names:
            raise NeighbourhoodsError(f"the workspace's training classes changed since run {run_dir.name!r} started "
                                      f"({len(saved_names or [])} then, {len(data.class_names)} now): start a new run")
        folder, _ = latest_checkpoint(run_dir)
        saved = restore(nets, state, folder, cfg, dd)
        fresh = False
        if saved["sampler"]["photos"] != len(data.split):
            say(cfg, dd.main, f"warning: {len(data.split)} training photos now, {saved['sampler']['photos']} when the "
                              "checkpoint was written; the data order differs from an uninterrupted run")
        say(cfg, dd.main, f"resuming {run_dir.name} at {state.images_seen:,} images ({folder.name})")
    elif cfg.resume and any(p.name.isdigit() for p in (run_dir / "checkpoints").glob("*")):
        latest_checkpoint(run_dir)   # raises the clear "latest.json is missing" error
    if fresh and cfg.layouts and not cfg.grow_from:   # a pure function of the data and seed: the same on every rank
        prior = nets.G.layouts   # (a grown run takes its source's prior with the weights, below)
        fit = fit_layouts(data.split.images, data.split.rows, data.classes, len(data.class_names),
                          prior.size, cfg.layouts, prior.means.shape[1], seed=cfg.seed)
        for G in (nets.G, nets.G_ema):
            fit.load_into(G)
    if fresh and cfg.grow_from:    # a new grown run: the smaller run's G below the new top block
        source = grow.start_from(nets, ws, cfg, data.class_names)
        say(cfg, dd.main, f"growing run {source.name} to {cfg.res.name}: its G_ema below a new top block, "
                          f"faded in over {GROW_FADE_KIMG:g} kimg; D starts afresh")

    # Write the run folder: config first (atomically), then, for a new run, the initial
    # checkpoint, so there is always a good checkpoint to resume or roll back to.
    if dd.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", run_config(run, nets))
        trim_metrics(run_dir / "metrics.jsonl", state.images_seen)
        run.writer = open_tensorboard(run_dir, state.images_seen)
    dd.barrier()
    say(cfg, dd.main, describe(cfg, run_dir))
    if fresh:
        warn_if_below_photos(ws, cfg, dd)
        say(cfg, dd.main, f"training {cfg.model} at {cfg.res.name} on {len(data.split):,} photos, "
                          f"{len(data.class_names)} classes"
                          + (f" ({ANY_CITY}: {len(data.merged)} cities with < {cfg.min_city_photos} photos)"
                             if data.merged else "") + f" -> {run_dir}")
        save_snapshot(run, nets, state)
        save_progress_grid(run, nets, state)

    workers = cfg.num_workers if cfg.num_workers is not None else int(device.type == "cuda")
    reader = BatchReader(data.split.images, data.split.rows, data.classes, cfg.seed, cfg.mirror, dd.rank, dd.world,
                         workers, pin=device.type == "cuda")
    limit = math.inf if cfg.kimg is None else cfg.kimg * 1000
    stop_at = deadline(cfg)
    if cfg.lr_schedule != "constant":
        say(cfg, dd.main, schedule.describe(cfg.lr_schedule, cfg.lr_g, cfg.lr_d))
    bar, by_time = progress_bar(cfg, dd.main, run_dir.name, state.images_seen, limit)
    started, started_at = time.monotonic(), state.images_seen   # this call's start
    tick = Tick(images=state.images_seen)
    amp_dtype = autocast_dtype(cfg.amp, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    ctrl_c = FirstCtrlC()

    try:
        while state.images_seen < limit:
            # Fetch this rank's share of the next batch of real photos, and noise.
            step_start = time.monotonic()
            uint8_real, labels, _ = reader.get(state.images_seen, cfg.batch)
            real = uint8_real.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
            labels = labels.to(device, non_blocking=True)
            z = torch.randn(run.batch_local, nets.G.z_dim, device=device)

            # One step at this point's rates: D's update, G's update, G_ema towards G.
            set_fade(nets, cfg, state.images_seen)
            set_rates(nets, cfg, state.images_seen)
            terms = train_step(nets, loss, real=real, labels=labels, z=z, autocast=autocast,
                               ema=ema_beta(cfg, state.images_seen + cfg.batch))

            # Agree across ranks on the loss terms and on whether to stop.
            stats = torch.stack([*terms.values(), torch.tensor(float(time.monotonic() >= stop_at or ctrl_c.requested),
                                                               device=device)])
            if dd.world > 1:
                dist.all_reduce(stats)
                stats[:-1] /= dd.world
            *values, stop = stats.cpu().tolist()
            terms = dict(zip(terms, values))
            ld, lg = terms["loss_d"], terms["loss_g"]

            # A non-finite loss: roll back to the last checkpoint, with fresh noise so the same
            # steps are not replayed into the same failure.
            if not (math.isfinite(ld) and math.isfinite(lg)):
                state.rollbacks += 1
                folder, n = latest_checkpoint(run_dir)
                if state.rollbacks > MAX_ROLLBACKS:
                    raise NeighbourhoodsError(
                        f"non-finite loss (loss_d={ld}, loss_g={lg}) at {state.images_seen:,} images, "
                        f"{state.rollbacks} times: giving up; the last good checkpoint is {folder} "
                        "(try a lower --lr-g/--lr-d, or --amp bf16/off)")
                say(cfg, dd.main, f"non-finite loss (loss_d={ld}, loss_g={lg}) at {state.images_seen:,} images: "
                                  f"rolled back to the checkpoint at {n:,} images "
                                  f"(rollback {state.rollbacks} of at most {MAX_ROLLBACKS})")
                kept = state.rollbacks, state.best_kid, state.best_at   # the best on disk stays the best
                restore(nets, state, folder, cfg, dd)
                state.rollbacks, state.best_kid, state.best_at = kept
                rollbacks = state.rollbacks
                seed_everything(cfg.seed + 1_000_003 * dd.rank + 7919 * rollbacks + state.images_seen)
                tick = Tick(images=state.images_seen)
                continue

            # Count the images.
            before = state.images_seen
            state.images_seen += cfg.batch
            after = state.images_seen
            step_time = time.monotonic() - step_start
            state.time_s += step_time
            tick.add(step_time, terms)
            if not bar.disable:
                bar.n = min(bar.total, round(time.monotonic() - started)) if by_time else min(after, int(limit))
                bar.set_postfix(kimg=f"{after / 1000:.1f}", img_s=f"{tick.rate(after):.1f}",
                                loss_d=f"{ld:.3f}", loss_g=f"{lg:.3f}", refresh=True)

            # A time budget's plan, once its rate is known (and saved with the run, for resume).
            if cfg.lr_schedule == "cosine" and after - started_at >= schedule.PLAN_AFTER:
                plan_the_budget(run, nets, after, started_at, time.monotonic() - started, stop_at - time.monotonic(),
                                limit)

            # Log, draw the grid and save a snapshot at their intervals (and at the end).
            done = after >= limit or stop > 0
            if crossed(cfg.tick_every, before, after, done):
                line = tick.line(after, state.time_s)
                # (a run shorter than one interval has no curve, and keeps no best snapshot)
                if crossed(cfg.kid_every, before, after, done) and after >= cfg.kid_every and dd.main:
                    line.update(estimate_and_keep_best(ws, run, nets, state))
                if dd.main:
                    write_metrics(run_dir, run.writer, line)
                tick = Tick(images=after)
            if crossed(cfg.sample_every, before, after, done):
                save_progress_grid(run, nets, state)
            if crossed(cfg.snapshot_every, before, after, done):
                save_snapshot(run, nets, state)
            if stop > 0:
                break

        # Save the final state (a no-op if the last step was just saved) and its grid.
        save_snapshot(run, nets, state)
        if dd.main and not progress_grid_path(run_dir, state.images_seen).exists():
            save_progress_grid(run, nets, state)
    finally:
        ctrl_c.close()
        bar.close()
        reader.close()
        if run.writer is not None:
            run.writer.close()
    if ctrl_c.requested:
        say(cfg, dd.main, f"interrupted: checkpoint at {state.images_seen:,} images; continue with --resume")
    say(cfg, dd.main, f"done: {state.images_seen:,} images in {state.time_s / 60:.1f} min of training -> {run_dir}")
    return TrainResult(run_dir, nets.G, nets.G_ema, nets.D, state.images_seen)


# --- pieces the loop calls ---------------------------------------------------------------------------
def crossed(every: int, before: int, after: int, done: bool) -> bool:
    """Did this step pass a multiple of `every` images (or end the run)? every <= 0: never."""
    return every > 0 and (after // every > before // every or done)


def run_config(run: Run, nets: Nets) -> dict:
    """config.json: the resolved options, the model_args loaders rebuild G from, and the data."""
    cfg, data = run.cfg, run.data
    return {**to_json(cfg), "model": cfg.model, "res": list(cfg.res), "z_dim": int(nets.G.z_dim),
            "class_names": data.class_names,
            "class_counts": np.bincount(data.classes, minlength=len(data.class_names)).tolist(),
            "merged_cities": data.merged, "train_photos": len(data.split),
            # every city of the data -> the class it is drawn from, so pooled cities serve by name
            "city_map": CityMap.build(data.class_names, data.split.label_names).to_json(),
            "grid": {"classes": data.grid_classes, "seeds": data.grid_seeds},
            "model_args": model_args(cfg.model, cfg.res, nets.G.z_dim, data.class_names, run.model_kwargs)}


def warn_if_below_photos(ws: Workspace, cfg: TrainConfig, dd: Dist) -> None:
    """Say so when the photos support an octave or more above the run's resolution: its
    thumbnails will be enlarged, and blur is what a visitor sees first."""
    supported = read_meta(ws.catalog_path, "supported_res")
    if not supported:
        return
    best = Resolution.parse(supported)
    if best.h * best.w >= 4 * cfg.res.h * cfg.res.w:
        say(cfg, dd.main, f"note: training at {cfg.res.name}, but the photos support {best.name} (ingest's photo "
                          f"size): for the website, ingest and train at --res {best.name} (or grow this run "
                          "by an octave later, train --grow-from), or thumbnails are this run's samples enlarged")


def builder_kwargs(cfg: TrainConfig) -> dict:
    """The model builder's arguments: the run's model_kwargs, plus the layout prior's size (the
    prior is fitted at a new run's start, restored on resume)."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.layouts:
        kwargs.update(layouts=cfg.layouts, layout_dim=int(kwargs.get("layout_dim", 32)))
    return kwargs


def build_loss(cfg: TrainConfig, nets: Nets) -> GANLoss:
    """The run's loss: the model's own adversarial loss and the recipe's terms, on these networks."""
    return GANLoss(G=nets.G, G_train=nets.G_train, D=nets.D, D_train=nets.D_train,
                   kind=models.recipe(cfg.model)["loss"], augment=cfg.augment, mode_seeking=cfg.mode_seeking,
                   layout_weight=LAYOUT_WEIGHT)


def set_fade(nets: Nets, cfg: TrainConfig, images_seen: int) -> None:
    """A grown G's (and G_ema's) new top block at this point of the run: faded in linearly over
    GROW_FADE_KIMG, a pure function of images_seen, so resume stays exact."""
    if cfg.grow_from:
        fade = min(1.0, images_seen / 1000 / GROW_FADE_KIMG) if GROW_FADE_KIMG > 0 else 1.0
        for G in (nets.G, nets.G_ema):
            G.fade.fill_(fade)


def set_rates(nets: Nets, cfg: TrainConfig, images_seen: int) -> None:
    """Both optimizers' rates at this point of the run (train/schedule.py): a pure function of
    images_seen and the run's schedule, so resume stays exact."""
    factor = schedule.lr_factor(cfg.lr_schedule, images_seen)
    for opt, base in ((nets.opt_g, cfg.lr_g), (nets.opt_d, cfg.lr_d)):
        for group in opt.param_groups:
            group["lr"] = base * factor


def plan_the_budget(run: Run, nets: Nets, images: int, images_at_start: int, seconds: float, seconds_left: float,
                    limit: float) -> None:
    """A time-budgeted run's plan (schedule.planned_images, at most its --kimg), the same on every
    rank (rank 0's), written into its schedule and config.json, so a resumed run keeps it."""
    plan = min(limit, schedule.planned_images(images, images_at_start, seconds, seconds_left))
    if run.dd.world > 1:
        value = torch.tensor([plan], dtype=torch.float64, device=run.device)
        dist.broadcast(value, 0)
        plan = float(value.item())
    run.cfg.lr_schedule = schedule.planned(run.cfg.lr_schedule, round(plan / 1000, 3))
    if run.dd.main:
        atomic_write_json(run.run_dir / "config.json", run_config(run, nets))
    say(run.cfg, run.dd.main, "planned by the rate so far: "
        + schedule.describe(run.cfg.lr_schedule, run.cfg.lr_g, run.cfg.lr_d))


def train_step(nets: Nets, loss: GANLoss, *, real: torch.Tensor, labels: torch.Tensor, z: torch.Tensor,
               autocast, ema: float) -> dict[str, torch.Tensor]:
    """One training step (the loop's, and bench/speed.py's): G draws the fakes once for both
    updates (as the reference DCGAN loop does), D is updated, then G through the plain D, then
    G_ema moves towards G with decay `ema`. Returns the step's losses and every term in them,
    as detached scalars: loss_d, loss_g, then the loss's own terms."""
    with autocast():
        fakes = loss.fakes(z=z, labels=labels)

    # Update D.
    with autocast():
        loss_d, d_terms = loss.discriminator(real=real, labels=labels, fakes=fakes)
    nets.opt_d.zero_grad(set_to_none=True)
    nets.scaler_d.scale(loss_d).backward()
    nets.scaler_d.step(nets.opt_d)
    nets.scaler_d.update()

    # Update G, through the plain D: its gradients are neither needed nor synced.
    for p in nets.d_params:
        p.requires_grad_(False)
    try:
        with autocast():
            loss_g, g_terms = loss.generator(fakes=fakes)
        nets.opt_g.zero_grad(set_to_none=True)
        nets.scaler_g.scale(loss_g).backward()
        nets.scaler_g.step(nets.opt_g)
        nets.scaler_g.update()
    finally:
        for p in nets.d_params:
            p.requires_grad_(True)

    update_ema(nets.G_ema, nets.G, ema)
    return {"loss_d": loss_d.detach().float(), "loss_g": loss_g.detach().float(),
            **{k: v.float() for k, v in {**d_terms, **g_terms}.items()}}


def calibrate(run: Run, nets: Nets, state: TrainState) -> None:
    """Standing BatchNorm statistics for G_ema before it is saved or sampled (same on every rank)."""
    set_fade(nets, run.cfg, state.images_seen)
    if state.bn_calibrated_at != state.images_seen:
        standing_bn_stats(nets.G_ema, run.data.class_weights, BN_STAT_IMAGES, max(run.batch_local, 64),
                          seed=run.cfg.seed * 7919 + state.images_seen)
        state.bn_calibrated_at = state.images_seen


def save_snapshot(run: Run, nets: Nets, state: TrainState) -> None:
    """A checkpoint of the current state. Collective under DDP: every rank takes part."""
    calibrate(run, nets, state)
    saved = state_dict(nets, state, run.cfg, len(run.data.split), run.dd)
    if run.dd.world > 1:       # BatchNorm statistics drift per rank; keep rank 0's everywhere
        for module in nets.saved().values():
            for b in module.buffers():
                dist.broadcast(b, 0)
    if run.dd.main:
        save_checkpoint(run.run_dir, state.images_seen, nets.saved(), saved, run.cfg.keep_checkpoints)
    run.dd.barrier()


def estimate_and_keep_best(ws: Workspace, run: Run, nets: Nets, state: TrainState) -> dict:
    """The training curve's KID of G_ema (scoring.training_score: KID_IMAGES samples against a
    fixed draw of training photos); where it is the lowest so far, G_ema becomes the run's best
    snapshot (runs.save_best). Returns what metrics.jsonl logs of it."""
    from neighbourhoods.scoring import training_score  # Inception: only when asked

    calibrate(run, nets, state)   # G_ema as it will be saved and sampled: its own BN statistics
    data = run.data
    score = training_score(ws, run.cfg.res, nets.G_ema, data.class_names,
                           city_map=CityMap.build(data.class_names, data.split.label_names), n=KID_IMAGES)
    if score is None:
        return {}
    kid = score["quality"]["kid"]
    if kid["mean"] < state.best_kid:
        state.best_kid, state.best_at = float(kid["mean"]), state.images_seen
        save_best(run.run_dir, state.images_seen, nets.G_ema,
                  {"kid_train": kid["mean"], "kid_train_std": kid["std"], "kid_images": KID_IMAGES})
    return {"kid_train": kid["mean"], "kid_train_std": kid["std"], "best_at": state.best_at}


def save_progress_grid(run: Run, nets: Nets, state: TrainState) -> None:
    """G_ema's samples for the fixed (city, seed) grid: cities down, seeds across (rank 0)."""
    if not run.dd.main:
        return
    calibrate(run, nets, state)
    classes, seeds = run.data.grid_classes, run.data.grid_seeds
    images = generate_images(nets.G_ema, [c for c in classes for _ in seeds], seeds * len(classes))
    write_progress_grid(run.run_dir, state.images_seen, images, [run.data.class_names[c] for c in classes],
                        len(seeds), run.writer)


class FirstCtrlC:
    """The first Ctrl-C asks the loop to finish its step, checkpoint and stop; a second one
    interrupts at once. Signal handlers can only be set from the main thread."""

    def __init__(self):
        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
