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

from neighbourhoods.core.catalog import read_meta
from neighbourhoods.core.cities import CityMap
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import Resolution
from neighbourhoods.core.workspace import Workspace, atomic_write_json
from neighbourhoods.models import cond_scale
from neighbourhoods.models.runs import (
    ANY_CITY,
    generate_images,
    latest_checkpoint,
    model_args,
    read_config,
    read_model_args,
    save_checkpoint,
)
from neighbourhoods.train import grow
from neighbourhoods.train.config import TrainConfig, describe, resolve_run, to_json
from neighbourhoods.train.data import BatchReader, TrainingData, load_training_data
from neighbourhoods.train.distributed import Dist, autocast_dtype, pick_device
from neighbourhoods.train.ema import ema_beta, standing_bn_stats, update_ema
from neighbourhoods.train.instances import Instances, build_instances, city_embeddings
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
from neighbourhoods.train.loss import GANLoss, paired, photos_spectrum
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
    model_kwargs: dict          # the builder's arguments: the run's model_kwargs, plus the instance bank's size
    instances: Instances | None = None   # instance conditioning's bank and neighbour lists, if on
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
              model_kwargs=dict(cfg.model_kwargs))
    if cfg.instance_k:   # instance conditioning: the photos' features and neighbours (seconds at 64 px)
        dim = int(cfg.model_kwargs.get("instance_dim", 64))
        run.instances = build_instances(cfg.model, data.split.images, data.split.rows, data.classes,
                                        len(data.class_names), cfg.instance_k, dim)
        run.model_kwargs.update(instances=len(data.split), instance_dim=dim)
    if cfg.layouts:   # the layout prior's size; it is fitted below for a new run, restored on resume
        run.model_kwargs.update(layouts=cfg.layouts, layout_dim=int(run.model_kwargs.get("layout_dim", 32)))

    # Construct networks and optimizers (identical init on every rank), then give each rank
    # its own noise and augmentation streams; rank 0 of a single process keeps `seed`.
    nets = build_nets(cfg, len(data.class_names), device, dd, run.model_kwargs)
    if run.instances is not None:
        for G in (nets.G, nets.G_ema):
            run.instances.load_into(G)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed shapes: pick the fastest kernels once
    seed_everything(cfg.seed + 1_000_003 * dd.rank)
    loss = GANLoss(cfg.loss, cfg.augment, cfg.mode_seeking, cfg.mode_seeking_space, spectral=cfg.spectral, lecam=cfg.lecam,
                   feature_mmd=cfg.feature_mmd, layout_weight=cfg.layout_weight,
                   spectrum=photos_spectrum(data.split.images, data.split.rows) if cfg.spectral else None)
    state = TrainState()

    # Resume from the latest checkpoint, if asked and there is one.
    fresh = True
    if cfg.resume and (run_dir / "checkpoints" / "latest.json").exists():
        saved_args = read_model_args(read_config(run_dir), run_dir / "config.json")
        saved_names = saved_args["class_names"]
        if cfg.instance_k and saved_args["kwargs"].get("instances") != len(data.split):
            banked = saved_args["kwargs"].get("instances")
            raise NeighbourhoodsError(f"run {run_dir.name!r} is instance-conditioned on {banked} "
                                      f"training photos and the workspace has {len(data.split)} now: start a new run")
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
    if fresh and cfg.city_init == "features":   # each city starts at its photos' mean feature
        start_cities_from_photos(run, nets)
    if fresh and cfg.grow_from:    # a new grown run: the smaller run's G below the new top block
        source = grow.start_from(nets, ws, cfg, data.class_names)
        say(cfg, dd.main, f"growing run {source.name} to {cfg.res.name}: its G_ema below a new top block, "
                          f"faded in over {cfg.grow_fade_kimg:g} kimg; D starts afresh")

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
                         workers, any_class=data.class_names.index(ANY_CITY) if cfg.any_city_p > 0 else -1,
                         any_p=cfg.any_city_p, pin=device.type == "cuda")
    limit = math.inf if cfg.kimg is None else cfg.kimg * 1000
    stop_at = deadline(cfg)
    bar, by_time = progress_bar(cfg, dd.main, run_dir.name, state.images_seen, limit)
    started = time.monotonic()
    tick = Tick(images=state.images_seen)
    amp_dtype = autocast_dtype(cfg.amp, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    ctrl_c = FirstCtrlC()

    try:
        while state.images_seen < limit:
            # Fetch this rank's share of the next batch of real photos, and noise.
            step_start = time.monotonic()
            uint8_real, labels, photos = reader.get(state.images_seen, cfg.batch)
            real = uint8_real.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
            labels = labels.to(device, non_blocking=True)
            z = torch.randn(run.batch_local, nets.G.z_dim, device=device)
            # Instance conditioning: each real photo is judged beside a neighbour's feature, and
            # its fake is drawn from that neighbour (rows of G's bank; fakes paired like cities).
            real_cond = fake_cond = g_cond = {}
            if run.instances is not None:
                rows = run.instances.conditioning_rows(photos, cfg.seed, state.images_seen + dd.rank).to(device)
                fake_rows = loss.fake_labels(rows)
                bank = nets.G.instances.features
                real_cond, fake_cond = {"instances": bank[rows]}, {"instances": bank[fake_rows]}
                g_cond = {"instances": fake_rows}

            # Weight the city signal (transitional conditioning: 0 = unconditional, then faded in)
            # and, in a grown run, the new top block's image.
            set_schedules(nets, cfg, state.images_seen)
            loss.blur_sigma = d_blur(cfg, state.images_seen)

            # Sample fakes for the real photos' cities (in same-city pairs when mode seeking);
            # one G forward serves both updates, as in the reference DCGAN loop.
            fake_labels = loss.fake_labels(labels)
            layouts = None
            if cfg.layouts:   # the layouts the fakes are drawn on, which G's loss checks them against
                layouts = nets.G.layouts.sample(z, fake_labels)
                if cfg.pair_layouts:   # fake i + N/2 on fake i's layout: mode seeking then asks for two houses on one
                    layouts = paired(layouts)
                g_cond = {**g_cond, "layouts": layouts}
            with autocast():
                fake = nets.G_train(z, fake_labels, **g_cond)

            # Update D.
            with autocast():
                loss_d = loss.discriminator(nets.D_train, real, labels, fake.detach(), fake_labels, real_cond, fake_cond,
                                            state.lecam_anchors)
            nets.opt_d.zero_grad(set_to_none=True)
            nets.scaler_d.scale(loss_d).backward()
            nets.scaler_d.step(nets.opt_d)
            nets.scaler_d.update()

            # Update G, through the plain D: its gradients are neither needed nor synced.
            for p in nets.d_params:
                p.requires_grad_(False)
            try:
                with autocast():
                    loss_g = loss.generator(nets.D, fake, fake_labels, z, fake_cond, real, labels, real_cond, layouts)
                nets.opt_g.zero_grad(set_to_none=True)
                nets.scaler_g.scale(loss_g).backward()
                nets.scaler_g.step(nets.opt_g)
                nets.scaler_g.update()
            finally:
                for p in nets.d_params:
                    p.requires_grad_(True)

            # Agree across ranks on the losses and on whether to stop.
            stats = torch.tensor([loss_d.detach().float().item(), loss_g.detach().float().item(),
                                  float(time.monotonic() >= stop_at or ctrl_c.requested)])
            if dd.world > 1:
                stats = stats.to(device)
                dist.all_reduce(stats)
                stats = stats.cpu()
                stats[:2] /= dd.world
            ld, lg, stop = stats.tolist()

            # A non-finite loss: roll back to the last checkpoint, with fresh noise so the same
            # steps are not replayed into the same failure.
            if not (math.isfinite(ld) and math.isfinite(lg)):
                state.rollbacks += 1
                folder, n = latest_checkpoint(run_dir)
                if state.rollbacks > cfg.max_rollbacks:
                    raise NeighbourhoodsError(
                        f"non-finite loss (loss_d={ld}, loss_g={lg}) at {state.images_seen:,} images, "
                        f"{state.rollbacks} times: giving up; the last good checkpoint is {folder} "
                        "(try a lower --lr-g/--lr-d, or --amp bf16/off)")
                say(cfg, dd.main, f"non-finite loss (loss_d={ld}, loss_g={lg}) at {state.images_seen:,} images: "
                                  f"rolled back to the checkpoint at {n:,} images "
                                  f"(rollback {state.rollbacks} of at most {cfg.max_rollbacks})")
                rollbacks = state.rollbacks
                restore(nets, state, folder, cfg, dd)
                state.rollbacks = rollbacks
                seed_everything(cfg.seed + 1_000_003 * dd.rank + 7919 * rollbacks + state.images_seen)
                tick = Tick(images=state.images_seen)
                continue

            # Count the images and move G_ema towards G.
            before = state.images_seen
            state.images_seen += cfg.batch
            after = state.images_seen
            update_ema(nets.G_ema, nets.G, ema_beta(cfg, after))
            step_time = time.monotonic() - step_start
            state.time_s += step_time
            tick.add(step_time, ld, lg)
            if not bar.disable:
                bar.n = min(bar.total, round(time.monotonic() - started)) if by_time else min(after, int(limit))
                bar.set_postfix(kimg=f"{after / 1000:.1f}", img_s=f"{tick.rate(after):.1f}",
                                loss_d=f"{ld:.3f}", loss_g=f"{lg:.3f}", refresh=True)

            # Log, draw the grid and save a snapshot at their intervals (and at the end).
            done = after >= limit or stop > 0
            if crossed(cfg.tick_every, before, after, done):
                line = tick.line(after, state.time_s)
                if cfg.kid_every > 0 and crossed(cfg.kid_every, before, after, done) and dd.main:
                    from neighbourhoods.metrics.quick_kid import training_kid  # Inception: only when asked
                    kid = training_kid(ws, cfg.res, nets.G_ema, data.class_names, n=cfg.kid_images)
                    if kid is not None:
                        line["kid"], line["kid_std"] = kid
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


def set_schedules(nets: Nets, cfg: TrainConfig, images_seen: int) -> None:
    """Set G's, G_ema's and D's city-signal strength, and a grown G's fade, for this point of
    the run: pure functions of images_seen, so resume stays exact."""
    if cfg.cond_full_kimg > cfg.cond_start_kimg:
        scale = cond_scale(cfg.cond_start_kimg, cfg.cond_full_kimg, images_seen)
        nets.G.cond_scale = nets.G_ema.cond_scale = nets.D.cond_scale = scale
    if cfg.grow_from:
        fade = cond_scale(0.0, cfg.grow_fade_kimg, images_seen)   # the same linear ramp from 0 to 1
        for G in (nets.G, nets.G_ema):
            G.fade.fill_(fade)


def start_cities_from_photos(run: Run, nets: Nets) -> None:
    """G's (and G_ema's) city embeddings set to the classes' mean photo features (the same on
    every rank: a pure function of the data)."""
    data = run.data
    embed = nets.G.embed.weight
    start = city_embeddings(run.cfg.model, data.split.images, data.split.rows, data.classes,
                            len(data.class_names), embed.shape[1])
    with torch.no_grad():
        for G in (nets.G, nets.G_ema):
            G.embed.weight.copy_(torch.from_numpy(start))


def d_blur(cfg: TrainConfig, images_seen: int) -> float:
    """The sigma of D's input blur at this point of the run: d_blur_sigma fading linearly to 0
    at d_blur_kimg, on the same ramp as a grown run's fade (so resume stays exact)."""
    return cfg.d_blur_sigma * (1.0 - cond_scale(0.0, cfg.d_blur_kimg, images_seen))


def calibrate(run: Run, nets: Nets, state: TrainState) -> None:
    """Standing BatchNorm statistics for G_ema before it is saved or sampled (same on every rank)."""
    set_schedules(nets, run.cfg, state.images_seen)
    if state.bn_calibrated_at != state.images_seen:
        standing_bn_stats(nets.G_ema, run.data.class_weights, run.cfg.bn_stat_images, max(run.batch_local, 64),
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
