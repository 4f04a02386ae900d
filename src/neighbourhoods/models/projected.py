"""The default model: a city-conditioned Projected GAN sized for a CPU, its recipe and builders.

Sauer et al., "Projected GANs Converge Faster" (NeurIPS 2021), made conditional and small:

- Generator (generator.py): FastGAN-style (Liu et al., ICLR 2021). Nearest-upsample + conv +
  BN + GLU blocks from a 3x4 or 4x4 base, noise injection, and skip-layer excitation. The city
  enters through a class embedding and class-conditional BatchNorm gains/biases (BigGAN), from
  the level at 1/8 of the image's shorter side on (`g_cond_from`, `city_level`: 8x8 at 64x64,
  12x16 at 96x128): z lays the house out, the city styles it.
  Every sample is drawn on a coarse layout from a Gaussian mixture fitted to the training
  photos' layouts (`layouts`, LayoutPrior, train/layouts.py), with each city's own weights.
- Discriminator (discriminator.py): frozen ImageNet EfficientNet-Lite0 features at four scales,
  mixed by fixed random 1x1 convs across channels (CCM) and scales (CSM), each scale judged by
  its own small trainable head with a projection term for the city (Miyato & Koyama 2018). The
  feature net sees the image enlarged by whole octaves until its shorter side is at least
  `feature_min_side` (64 px -> 128, 48x64 -> 96x128, 96x128 as it is).
- Training (train/loss.py) adds the mode-seeking term (MSGAN) on the images' structure, with the
  two fakes of each pair on one layout, and a layout term that keeps each sample on its layout.
- Growing by an octave (train --grow-from, train/grow.py): `grown_kwargs` spells out a G one
  level taller than a trained run's (its layout plus one top block), `load_grown` loads that
  run's weights below it, and G's `fade` buffer blends the old image into the new block's.
- Cost: G's top octaves are kept slim (16 channels at 64x64: 0.39 GFLOP/image forward); D's
  feature net is most of a CPU step. docs/model.md has the measurements behind every choice.

Contract with train (models/__init__.py registers this as "projected", the default):
    build(num_classes, res, **kwargs) -> (G, D); LOSS, AUGMENT_POLICY and TRAIN_DEFAULTS below.
    G has BatchNorm: sample with G_ema.eval(); the EMA copies G's buffers (BN running stats).
    D.feature_net is frozen and stays in eval mode whatever D.train(mode) is called with;
      D.trainable_parameters() lists what the D optimizer should update.
"""

from __future__ import annotations

import torch

from neighbourhoods.core.resolution import Resolution
from neighbourhoods.models.discriminator import ProjectedDiscriminator
from neighbourhoods.models.generator import MAX_BASE_SIDE, MIN_LEVELS, Generator  # noqa: F401 (the registry reads them)

AUGMENT_POLICY = "color,translation,cutout"   # DiffAugment on real and fake images before D
LOSS = "hinge"
TRAIN_DEFAULTS = {
    # 5x Projected GAN's 2e-4: a CPU budget buys ~500 steps, not its hundreds of thousands; at 64x64 and
    # ~15k images, KID 0.049 / 0.040 -> 0.019 / 0.016, recall 0.023 / 0.026 -> 0.070 / 0.083 (docs/model.md)
    "lr_g": 1e-3,
    "lr_d": 1e-3,
    "betas": (0.0, 0.99),    # beta1 0: no momentum, the usual choice for hinge/projected GANs
    "ema_kimg": 10.0,        # with train's ema_rampup 0.05 the EMA is short early, long later
    "mirror": True,          # house fronts read the same mirrored: twice the data for free
    "mode_seeking": 0.5,     # MSGAN term on structure: without it every seed of a city drew the same house
    # feature_min_side 96: D's feature net sees a 64 px image at 128 px (KID 0.024 against 0.056 at
    # 64 px, docs/model.md), 48x64 at 96x128, 96x128 and up as they are; g_cond_from: recipe_kwargs
    "model_kwargs": {"feature_min_side": 96},
    # every sample drawn on a layout from a 16-component mixture of the photos' 8x8 layouts: the grid is
    # no longer one house per city; KID and recall tie, precision and per-city KID gain (docs/model.md)
    "layouts": 16,
    "batch": 32,             # at CPU budgets (~10-30k images) twice the updates of 64 matter more than smoother gradients
}

LAYOUTS = True   # G can draw on layouts from a LayoutPrior (build's layouts=K)

# The city reaches G from the level whose shorter side is this fraction of the image's on (8x8 at
# 64x64, 12x16 at 96x128, 24x32 at 192x256): below it z alone lays the house out, from it the city
# styles it. Counted from the base instead (level 1 everywhere), the city entered at 6x8 at 96x128,
# an octave coarser than at 64x64, and each city's seeds drew one house (docs/experiments.md).
CITY_FROM = 1 / 8


def city_level(res: tuple[int, int]) -> int:
    """G's first level with the city (`g_cond_from`) at `res`: CITY_FROM of the shorter side, at least 1."""
    levels, base = Resolution(*res).up_levels(MIN_LEVELS, MAX_BASE_SIDE)
    short, base_short = min(res), min(base.h, base.w)
    level = 1
    while level < levels and base_short * 2 ** level < short * CITY_FROM:
        level += 1
    return level


def recipe_kwargs(res: tuple[int, int]) -> dict:
    """The builder arguments the recipe gives a new run at `res`: TRAIN_DEFAULTS' and the city's level."""
    return {"g_cond_from": city_level(res), **TRAIN_DEFAULTS["model_kwargs"]}


# Builder arguments of ablations that lost (docs/experiments.md), at the value every run written
# before trained with; a run saved with one at another value cannot be rebuilt here (06f09c2 can).
REMOVED_KWARGS = {"g_cond_bn": True, "d_batchnorm": True, "feature_res": 1.0, "d_mbstd": 0, "instances": 0,
                  "instance_dim": None}


def _check_removed(kwargs: dict, ignore: tuple[str, ...] = ()) -> None:
    """TypeError for an unknown argument, ValueError for a removed one away from its off value
    (those in `ignore` may hold any value: G alone never reads D's)."""
    for key, value in kwargs.items():
        if key not in REMOVED_KWARGS:
            raise TypeError(f"unexpected argument {key!r}")
        off = REMOVED_KWARGS[key]
        if key not in ignore and off is not None and value != off:
            raise ValueError(f"{key}={value} was removed (it lost in its measurement, docs/experiments.md); "
                             "it can still be run at commit 06f09c2")


def build(num_classes: int, res: tuple[int, int], z_dim: int = 128, g_max_channels: int = 256,
          g_min_channels: int = 16, d_head_width: int = 128, feature_min_side: int = 0, g_cond_from: int = 0,
          g_channels: list[int] | None = None, g_convs: list[int] | None = None, g_grown: bool = False,
          g_grow_octaves: int = 0, layouts: int = 0, layout_dim: int = 32, layout_level: int = 1,
          g_noise: bool = True, feature_scale: int = 0, layout_lock: bool = False, g_z_skip: bool = False,
          **removed) -> tuple[Generator, ProjectedDiscriminator]:
    """The default model's (G, D) for `num_classes` cities at `res` = (H, W); `layouts` > 0: G
    draws on layouts from a LayoutPrior of that many components in `layout_dim` dimensions, at
    the size of G's level `layout_level` (1: 8x8 at 64x64, 2: 16x16)."""
    _check_removed(removed)
    G = build_generator(num_classes, res, z_dim=z_dim, g_max_channels=g_max_channels, g_min_channels=g_min_channels,
                        g_cond_from=g_cond_from, g_channels=g_channels, g_convs=g_convs, g_grown=g_grown,
                        g_grow_octaves=g_grow_octaves, layouts=layouts, layout_dim=layout_dim,
                        layout_level=layout_level, g_noise=g_noise, layout_lock=layout_lock, g_z_skip=g_z_skip)
    D = ProjectedDiscriminator(num_classes, res, head_width=d_head_width, feature_min_side=feature_min_side,
                               feature_scale=feature_scale)
    return G, D


def build_generator(num_classes: int, res: tuple[int, int], z_dim: int = 128, g_max_channels: int = 256,
                    g_min_channels: int = 16, d_head_width: int = 128, feature_min_side: int = 0,
                    g_cond_from: int = 0, g_channels: list[int] | None = None, g_convs: list[int] | None = None,
                    g_grown: bool = False, g_grow_octaves: int = 0, layouts: int = 0, layout_dim: int = 32,
                    layout_level: int = 1, g_noise: bool = True, feature_scale: int = 0, layout_lock: bool = False,
                    g_z_skip: bool = False, **removed) -> Generator:
    """G alone, for sampling: skips loading the feature network (D-only arguments are ignored)."""
    _check_removed(removed, ignore=("d_batchnorm", "feature_res", "d_mbstd"))
    return Generator(num_classes, res, z_dim=z_dim, max_channels=g_max_channels, min_channels=g_min_channels,
                     cond_from=g_cond_from, channels=g_channels, convs=g_convs, grown=g_grown,
                     grow_octaves=g_grow_octaves, layouts=layouts, layout_dim=layout_dim, layout_level=layout_level,
                     noise=g_noise, layout_lock=layout_lock, z_skip=g_z_skip)


# --- growing by an octave (train --grow-from; train/grow.py) --------------------------------------
def grown_kwargs(res: tuple[int, int], kwargs: dict) -> dict:
    """The builder arguments of G at twice `res` grown from a run built at `res` with `kwargs`:
    the smaller G's channels and convs kept level for level, plus one top block of one conv at
    the top's width halved, not below g_min_channels (the native top). From a default run that
    is slimmer than the native layout (whose lower levels are twice as wide); from a run built
    with g_grow_octaves 1 it is the native layout."""
    small = build_generator(1, res, **kwargs)
    top = max(small.channels[-1] // 2, int(kwargs.get("g_min_channels", 16)))
    return {**{k: v for k, v in kwargs.items() if k != "g_grow_octaves"}, "g_channels": [*small.channels, top],
            "g_convs": [len(b.convs) for b in small.blocks] + [1], "g_grown": True}


def load_grown(G: Generator, small: dict[str, torch.Tensor]) -> None:
    """Load the smaller G's state dict into a grown G: every level kept, its to_rgb becoming
    to_rgb_prev (the image faded out; a twice-grown run's own to_rgb_prev and fade are dropped),
    its layout prior kept (layouts are the size of a level counted from the base, which growing keeps).
    ValueError unless exactly the new top block (block, SLE, to_rgb, fade) is left as built."""
    state = {}
    for key, value in small.items():
        if key.startswith("to_rgb_prev.") or key == "fade":
            continue
        state[key.replace("to_rgb.", "to_rgb_prev.", 1) if key.startswith("to_rgb.") else key] = value
    top = len(G.blocks)
    new = (f"blocks.{top - 1}.", f"sle.{top}.", "to_rgb.", f"layout_in.{top}.")
    try:
        missing, unexpected = G.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(str(e).splitlines()[0]) from None
    kept = [k for k in missing if not k.startswith(new) and k != "fade"]
    if unexpected or kept:
        raise ValueError(f"the weights do not fit one octave below this G (missing {kept[:3]}, "
                         f"unexpected {unexpected[:3]})")
