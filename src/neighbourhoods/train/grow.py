"""Growing a run by one octave (`train --grow-from RUN`): cheap resolution, as progressive GANs do.

A 96x128 image costs ~2.5x a 64x64 one, so the website's size is reached faster by training the
house at half the size first and then adding the top octave (Karras et al., "Progressive Growing
of GANs", ICLR 2018; StyleGAN-XL grows the same way). The new run's G is the smaller run's G_ema
level for level (models: `grown_kwargs`, `load_grown`) plus one new top block, and its image
fades from the smaller G's (nearest-upsampled) to the new block's over GROW_FADE_KIMG, so the
run starts from the houses the smaller run drew instead of from noise. D starts afresh: its
heads are sized by the feature maps of the new resolution.

A grown run is an ordinary run from then on: its config.json spells out the grown layout in
model_kwargs (loaders need nothing else), and --resume restores it from its own checkpoints,
never from the source again.
"""

from __future__ import annotations

from pathlib import Path

from neighbourhoods import models
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import Resolution
from neighbourhoods.core.workspace import Workspace
from neighbourhoods.models import runs

# Builder arguments that shape G: a grown run takes them from its source, never from the caller.
G_SHAPE_KEYS = ("z_dim", "g_max_channels", "g_min_channels", "g_cond_from", "g_channels", "g_convs", "g_grown",
                "g_grow_octaves", "layouts", "layout_dim", "layout_level")


def grown_model_kwargs(ws: Workspace, model: str, res: Resolution, source: str, kwargs: dict) -> dict:
    """The new run's builder arguments, grown from run `source` (a name under WS/runs or a
    path); NeighbourhoodsError, in one line, where that step is impossible."""
    source_dir = runs.resolve_run(ws, source)
    args = runs.read_model_args(runs.read_config(source_dir), source_dir / "config.json")
    if not models.supports_growing(model):
        raise NeighbourhoodsError(f"model {model!r} cannot be grown: --grow-from needs the projected model")
    if args["name"] != model:
        raise NeighbourhoodsError(f"cannot grow run {source!r}: it is a {args['name']} run and this one is {model}")
    small = Resolution(*args["res"])
    if (2 * small.h, 2 * small.w) != (res.h, res.w):
        raise NeighbourhoodsError(f"cannot grow run {source!r} ({small.name}) to {res.name}: growing adds one octave, "
                                  f"so use --res {2 * small.h}x{2 * small.w}")
    runs.latest_checkpoint(source_dir)   # a source without a complete checkpoint: its own clear error
    grown = models.grown_kwargs(model, small, {**args["kwargs"], "z_dim": args["z_dim"]})
    clash = sorted(k for k in kwargs if k in G_SHAPE_KEYS and k in grown and kwargs[k] != grown[k])
    if clash:
        raise NeighbourhoodsError(f"--model-kwargs {', '.join(clash)} differ from run {source!r}'s: a grown G keeps "
                                  "its source's shape; leave them out")
    return {**kwargs, **grown}


def start_from(nets, ws: Workspace, cfg, class_names: list[str]) -> Path:
    """Load the source run's G_ema into the new run's G and G_ema (before its first checkpoint)."""
    source_dir = runs.resolve_run(ws, cfg.grow_from)
    args = runs.read_model_args(runs.read_config(source_dir), source_dir / "config.json")
    if list(args["class_names"]) != list(class_names):
        raise NeighbourhoodsError(f"cannot grow run {cfg.grow_from!r}: it was trained on other classes "
                                  f"({len(args['class_names'])} then, {len(class_names)} in this workspace now)")
    folder, _ = runs.latest_checkpoint(source_dir)
    path = folder / "G_ema.safetensors"
    weights = runs.load_weights(path)
    try:
        for G in (nets.G, nets.G_ema):
            models.load_grown(cfg.model, G, weights)
    except ValueError as e:
        raise NeighbourhoodsError(f"{path}: {e}") from None
    return source_dir
