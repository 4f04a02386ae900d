"""Benchmark: training images/s of the default model's variants at one resolution, interleaved.

    python bench/speed.py --res 96x128                       # every variant, 5 rounds
    python bench/speed.py --res 96x128 --variants default,grown,compile --rounds 3

What one training step of `train` costs (G forward, D on real and fake, both backward passes,
both Adam steps, the recipe's loss with its mode-seeking term, bf16 autocast where the CPU has
it), on random tensors: quality is not measured here (bench/quality.py is), only the price of
each candidate for "quality per CPU-minute" at the website's size:

    default       the recipe's G and D
    grown         G with the layout `train --grow-from` builds from a default half-size run
                  (its channels plus one slim top block): a cheaper G
    grown-native  ... from a half-size run built with g_grow_octaves 1: the native layout
    for-growing   the default G laid out for growing (g_grow_octaves 1): what the half-size
                  run of grown-native costs, measured at this --res
    feature-1     D's feature network fed the image at its own size (feature_min_side 0; the
                  recipe enlarges it by octaves to >= 96 px on the shorter side: 64 -> 128)
    feature-0.75  ... at 3/4 of its own size (feature_res 0.75)
    feature-0.5   ... at 1/2 of its own size
    channels-last both nets and the images in channels_last memory format
    compile       torch.compile of G and D (the first steps, compiling, are not timed)
    g-wide        G twice as wide below its base (g_min_channels 32: 32 channels at the top
                  level instead of 16, each level up to the 256 cap doubled likewise)

Rounds alternate the variants (A B C A B C ...) so a change in the machine's load hits all of
them alike; the JSON has every round and each variant's median, and its ratio to the default.
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
from neighbourhoods.models import projected  # noqa: E402
from neighbourhoods.nets.devices import autocast_dtype  # noqa: E402
from neighbourhoods.train.loss import GANLoss  # noqa: E402

VARIANTS = ("default", "grown", "grown-native", "for-growing", "feature-1", "feature-0.75", "feature-0.5", "channels-last", "compile", "g-wide")
CLASSES = 26   # socal's training classes at the default --min-city-photos


def make_step(variant: str, res: tuple[int, int], batch: int):
    """A closure running one training step of `variant` on fixed random data."""
    recipe = models.recipe("projected")
    kwargs = dict(recipe.get("model_kwargs", {}))
    if variant in ("grown", "grown-native"):
        small = {**kwargs, "g_grow_octaves": 1} if variant == "grown-native" else kwargs
        kwargs = models.grown_kwargs("projected", (res[0] // 2, res[1] // 2), small)
    if variant == "for-growing":
        kwargs["g_grow_octaves"] = 1
    if variant == "g-wide":
        kwargs["g_min_channels"] = 32
    if variant.startswith("feature-"):
        kwargs.update(feature_res=float(variant.split("-")[1]), feature_min_side=0)
    torch.manual_seed(0)
    G, D = projected.build(CLASSES, res, **kwargs)
    G.train()
    D.train()
    fmt = torch.channels_last if variant == "channels-last" else torch.contiguous_format
    G, D = G.to(memory_format=fmt), D.to(memory_format=fmt)
    g_run, d_run = (torch.compile(G), torch.compile(D)) if variant == "compile" else (G, D)
    loss = GANLoss(recipe["loss"], recipe["augment"], recipe["mode_seeking"], recipe["mode_seeking_space"])
    d_params = D.trainable_parameters()
    opt_g = torch.optim.Adam(G.parameters(), recipe["lr_g"], betas=recipe["betas"])
    opt_d = torch.optim.Adam(d_params, recipe["lr_d"], betas=recipe["betas"])
    dtype = autocast_dtype("auto", torch.device("cpu"))
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext
    real = (torch.rand(batch, 3, *res) * 2 - 1).contiguous(memory_format=fmt)
    labels = torch.randint(0, CLASSES, (batch,))

    def step() -> None:
        z = torch.randn(batch, G.z_dim)
        fake_labels = loss.fake_labels(labels)
        with autocast():
            fake = g_run(z, fake_labels)
            loss_d = loss.discriminator(d_run, real, labels, fake.detach(), fake_labels)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        for p in d_params:
            p.requires_grad_(False)
        with autocast():
            loss_g = loss.generator(d_run, fake, fake_labels, z)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        for p in d_params:
            p.requires_grad_(True)

    return step, sum(p.numel() for p in G.parameters())


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
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a working C++ compiler
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
