"""Benchmark: training images/s of the default model's variants at one resolution, interleaved.

    python bench/speed.py --res 96x128                       # every variant, 5 rounds
    python bench/speed.py --res 64x64 --variants default,feature-1 --rounds 3

Each variant runs the training loop's own step (`train.loop.train_step`: G's forward, D on real
and fake, both backward passes, both Adam steps, the recipe's loss with its mode-seeking and
layout terms, G_ema's update, bf16 autocast where the CPU has it), with networks, optimizers
and loss built as `train` builds them (`build_nets`, `GANLoss`), on random photos: quality is
not measured here (bench/quality.py is), only the price of each candidate:

    default       the recipe's G and D (with its 16-component layout prior, unfitted)
    grown         G with the layout `train --grow-from` builds from a default half-size run
                  (its channels plus one slim top block): a cheaper G
    grown-native  ... from a half-size run built with g_grow_octaves 1: the native layout
    for-growing   the default G laid out for growing (g_grow_octaves 1): what the half-size
                  run of grown-native costs, measured at this --res
    feature-1     D's feature network fed the image at its own size (feature_min_side 0; the
                  recipe enlarges it by octaves to >= 96 px on the shorter side: 64 -> 128)
    g-wide        G twice as wide below its base (g_min_channels 32)

Rounds alternate the variants (A B C A B C ...) so a change in the machine's load hits all of
them alike; the JSON has every round and each variant's median, and its ratio to the default.
channels_last (0.77x) and torch.compile (fails on the loop's pattern) were measured and dropped
(docs/experiments.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from neighbourhoods import models  # noqa: E402
from neighbourhoods.core.resolution import parse_res, res_name  # noqa: E402
from neighbourhoods.core.workspace import atomic_write_json  # noqa: E402
from neighbourhoods.nets.devices import Dist, autocast_dtype  # noqa: E402
from neighbourhoods.train.config import TrainConfig, resolve_config  # noqa: E402
from neighbourhoods.train.ema import ema_beta  # noqa: E402
from neighbourhoods.train.loop import build_loss, builder_kwargs, train_step  # noqa: E402
from neighbourhoods.train.state import build_nets  # noqa: E402

VARIANTS = ("default", "grown", "grown-native", "for-growing", "feature-1", "g-wide")
CLASSES = 26   # socal's training classes at the default --min-city-photos


def make_step(variant: str, res: tuple[int, int], batch: int):
    """A closure running one step of the training loop for `variant` on fixed random photos."""
    kwargs = models.recipe_kwargs("projected", res)
    if variant in ("grown", "grown-native"):
        small = models.recipe_kwargs("projected", (res[0] // 2, res[1] // 2))
        small = {**small, "g_grow_octaves": 1} if variant == "grown-native" else small
        kwargs = models.grown_kwargs("projected", (res[0] // 2, res[1] // 2), small)
    if variant == "for-growing":
        kwargs["g_grow_octaves"] = 1
    if variant == "g-wide":
        kwargs["g_min_channels"] = 32
    if variant == "feature-1":
        kwargs["feature_min_side"] = 0
    cfg = resolve_config(TrainConfig(res=res, batch=batch, model_kwargs=kwargs))
    device = torch.device("cpu")
    nets = build_nets(cfg, CLASSES, device, Dist(0, 1, 0), builder_kwargs(cfg))   # layout prior unfitted: same cost
    loss = build_loss(cfg, nets)
    dtype = autocast_dtype(cfg.amp, device)
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext
    real = torch.rand(batch, 3, *res) * 2 - 1
    labels = torch.randint(0, CLASSES, (batch,))
    beta = ema_beta(cfg, 100_000)

    def step() -> None:
        z = torch.randn(batch, nets.G.z_dim)
        train_step(nets, loss, real=real, labels=labels, z=z, autocast=autocast, ema=beta)

    return step, sum(p.numel() for p in nets.G.parameters())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--res", type=parse_res, default=(96, 128), help="HxW (default 96x128, the website's)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--batch", type=int, default=32, help="images per step (the recipe's 32)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "speed.json")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, g_params, failed = {}, {}, {}
    for v in variants:
        step, g_params[v] = make_step(v, args.res, args.batch)
        t = time.perf_counter()
        try:
            for _ in range(3):   # warm-up (and compilation) untimed
                step()
        except Exception as e:  # noqa: BLE001 - a variant that cannot step is reported, not fatal
            failed[v] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"{v}: failed ({failed[v]})", flush=True)
            continue
        steps[v] = step
        print(f"{v}: warmed up in {time.perf_counter() - t:.0f} s", flush=True)
    variants = [v for v in variants if v in steps]
    rounds: dict[str, list[float]] = {v: [] for v in variants}
    load_start = os.getloadavg()
    for r in range(args.rounds):
        for v in variants:
            t = time.perf_counter()
            for _ in range(args.steps):
                steps[v]()
            rounds[v].append(args.steps * args.batch / (time.perf_counter() - t))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v} {rounds[v][-1]:.1f}" for v in variants), flush=True)
    medians = {v: statistics.median(rounds[v]) for v in variants}
    base = medians.get("default")
    result = {"res": res_name(args.res), "batch": args.batch, "steps_per_round": args.steps, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "amp": str(autocast_dtype("auto", torch.device("cpu"))),
              "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "variants": {v: {"images_per_s_median": medians[v], "images_per_s_rounds": rounds[v],
                               "g_params": g_params[v],
                               "ratio_to_default": medians[v] / base if base else None} for v in variants},
              "failed": failed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    for v in variants:
        ratio = f" ({medians[v] / base:.2f}x default)" if base else ""
        print(f"{v}: {medians[v]:.1f} img/s{ratio}, G {g_params[v] / 1e6:.2f} M parameters")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
