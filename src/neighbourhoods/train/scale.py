"""Rules for bigger machines: batch, learning rates and EMA on GPUs, and a budget in GPU-hours.

The recipe (models/projected.py TRAIN_DEFAULTS) was measured on a 2-core CPU: batch 32, Adam at
1e-3, G_ema's half-life 10 kimg. A GPU is idle at batch 32 (its step costs about what batch 64's
does), so on CUDA, for every option the user leaves out:

- batch: GPU_BATCH (64) per GPU, summed over the processes under torchrun;
- learning rates: the recipe's x sqrt(batch / recipe batch), Adam's square-root rule (Malladi et
  al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022), at most
  MAX_LR (2e-3 lost to 1e-3 at batch 32 on KID and precision: docs/experiments.md);
- G_ema's half-life: the recipe's x batch / recipe batch, so it spans as many steps as on a CPU
  (StyleGAN2-ADA's rule, ema_kimg = batch x 10 / 32);
- a budget in GPU-hours (--gpu-hours H) is H x 60 / GPUs minutes of wall clock per process.

None of this was measured on a GPU here (the project's machine has none); `WORLD_SIZE=N
neighbourhoods train --dry-run --device cuda` prints what a run on N GPUs would use, and docs/train.md gives the commands to
measure it on one.
"""

from __future__ import annotations

import math
import os

from neighbourhoods.core.errors import NeighbourhoodsError

GPU_BATCH = 64      # images per GPU per step
MAX_LR = 2e-3       # the scaled rates stop here


def processes() -> int:
    """How many processes share each batch: torchrun's WORLD_SIZE (set it by hand to plan a run
    with --dry-run on another machine), else 1."""
    try:
        n = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        n = 0
    if n < 1:
        raise NeighbourhoodsError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a process count")
    return n


def scaled(recipe: dict, device: str, gpus: int, given: dict) -> tuple[dict, list[str]]:
    """The batch, rates and EMA a run uses on `device` with `gpus` processes: the caller's where
    `given` holds one (not None), else the recipe's, scaled on CUDA by the rules above. Returns the
    values and one line per rule applied, for --dry-run."""
    base_batch = int(recipe["batch"])
    out = {k: given[k] if given.get(k) is not None else recipe[k] for k in ("batch", "lr_g", "lr_d", "ema_kimg")}
    if not str(device).startswith("cuda"):
        return out, []
    why = []
    if given.get("batch") is None:
        out["batch"] = GPU_BATCH * gpus
        why.append(f"batch {out['batch']} = {GPU_BATCH} per GPU x {gpus} GPU(s)")
    ratio = out["batch"] / base_batch
    for key in ("lr_g", "lr_d"):
        if given.get(key) is None:
            out[key] = min(MAX_LR, recipe[key] * math.sqrt(ratio))
            why.append(f"{key} {out[key]:.3g} = {recipe[key]:g} x sqrt({out['batch']} / {base_batch}), at most {MAX_LR:g}")
    if given.get("ema_kimg") is None:
        out["ema_kimg"] = recipe["ema_kimg"] * ratio
        why.append(f"ema_kimg {out['ema_kimg']:g} = {recipe['ema_kimg']:g} x {out['batch']} / {base_batch}")
    return out, why
