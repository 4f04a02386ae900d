"""Training options: one dataclass, and the one place where their values are decided.

A run's options come from three places, merged here and nowhere else (`resolve_run`):

    1. what the caller passed (CLI flags or TrainConfig fields left off their defaults),
    2. on --resume, the run's own config.json for the fields that define a run (RUN_FIELDS),
    3. the model's recipe (models.recipe) for fields left at None, then FALLBACK.

Every field is declared once with `option(default, help)`: the CLI's `train` flags, their
help text and defaults are generated from these declarations (`add_arguments`), so a new
option is written once. `describe` prints the resolved options as one block, before a run
starts and for `train --dry-run`.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from neighbourhoods import models
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import Resolution
from neighbourhoods.core.workspace import Workspace
from neighbourhoods.models import cond_scale
from neighbourhoods.models.runs import read_config


def option(default, help: str, *, flag: str | tuple[str, ...] | None = None, flag_help: str | None = None,
           cli: bool = True, **argparse_kwargs):
    """A TrainConfig field: its default, its help line, and how the CLI spells the flag (with
    `flag_help` where the flag says the opposite of the field, as --quiet does for progress)."""
    meta = {"help": help, "flag": flag, "flag_help": flag_help, "cli": cli, "argparse": argparse_kwargs}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# The adversarial losses train/loss.py knows.
LOSSES = ("bce", "hinge", "rpgan")
# Where G's city embeddings start (train/instances.py: city_embeddings).
CITY_INITS = ("random", "features")
# What the mode-seeking term can measure distance in (train/loss.py: mode_seeking_loss).
MS_SPACES = ("pixels", "structure", "features", "structure+features")


def mode_seeking_reads_features(space: str) -> bool:
    """Whether mode seeking in `space` needs D's pooled features of the fakes."""
    return space in ("features", "structure+features")


@dataclass
class TrainConfig:
    model: str = option("projected", "registered model: projected (the default) or dcgan (the baseline)")
    res: Resolution = option(Resolution(64, 64), "height x width to train at; prepared arrays must exist at it "
                             "(4:3 e.g. 48x64, 96x128)", metavar="HxW")
    run: str | None = option(None, "run folder under WS/runs (default <model>-<HxW>); under torchrun spell it --name",
                             flag=("--run", "--name"))
    resume: bool = option(False, "continue the run from its latest checkpoint")
    batch: int | None = option(None, "images per step, summed over all processes (default: the model's recipe, else 64)")
    kimg: float | None = option(500.0, "stop when this many thousand images have been shown in total", group="stop")
    minutes: float | None = option(None, "stop after this many minutes of training in this call (wall clock)",
                                   group="stop")
    lr_g: float | None = option(None, "Adam learning rate of G (default: the model's recipe)")
    lr_d: float | None = option(None, "Adam learning rate of D (default: the model's recipe)")
    betas: tuple[float, float] | None = option(None, "Adam betas of both nets, e.g. 0,0.99 (default: the model's recipe)",
                                               metavar="B1,B2")
    loss: str | None = option(None, "adversarial loss: bce (non-saturating), hinge, or rpgan (relativistic pairing, "
                                    "R3GAN) (default: the model's recipe)")
    augment: str | None = option(None, 'DiffAugment policy for real and fake images before D, e.g. '
                                 '"color,translation,cutout"; "" = off (default: the model\'s recipe)')
    mirror: bool | None = option(None, "random left-right flips of the real photos (default: the model's recipe)")
    ema_kimg: float | None = option(None, "half-life of the EMA of G in thousands of images; 0 = G_ema is a copy of G "
                                    "(default: the model's recipe, else 10)")
    ema_rampup: float | None = option(0.05, "EMA half-life at most this fraction of the images seen so far "
                                      "(None = no ramp-up)")
    seed: int = option(0, "seeds weights, data order, noise and augmentation")
    min_city_photos: int = option(50, 'cities with fewer training photos share the "(any city)" class, '
                                  "which also serves unknown cities")
    mode_seeking: float | None = option(None, "weight of the mode-seeking (MSGAN) term that keeps one city's samples "
                                        "diverse; 0 = off (default: the model's recipe, else 0)")
    mode_seeking_space: str | None = option(None, "what the mode-seeking term measures: pixels, structure (the "
                                            "image at 1/4 size with each channel standardised per image, so "
                                            "exposure and sky colour do not count), features (D's pooled "
                                            "pretrained features of the fakes, standardised over the batch), "
                                            "or structure+features (both terms, each at the weight) "
                                            "(default: the model's recipe, else pixels)", choices=list(MS_SPACES))
    spectral: float | None = option(None, "weight of a term in G's loss that matches the fake batch's radial power "
                                    "spectrum to the training photos' (Durall et al. 2020), against the fine-detail "
                                    "signature upsampling generators share; 0 = off (default: the model's recipe, "
                                    "else 0)")
    lecam: float | None = option(None, "weight of LeCam regularisation in D's loss (Tseng et al. 2021: D's outputs "
                                 "on reals pulled towards the moving average of its outputs on fakes and vice "
                                 "versa); 0 = off (default: the model's recipe, else 0)")
    feature_mmd: float | None = option(None, "weight of a term in G's loss: the MMD between the fake and the real "
                                       "batch's pooled pretrained features (D's frozen feature net), which pushes "
                                       "apart fakes closer to each other than photos are; 0 = off (default: the "
                                       "model's recipe, else 0)")
    cond_start_kimg: float | None = option(None, "transitional conditioning: train unconditionally (no city signal "
                                           "in G or D) for this many thousand images (default: the model's recipe, "
                                           "else 0)")
    cond_full_kimg: float | None = option(None, "...then fade the city signal in, reaching full strength at this many "
                                          "thousand images; <= cond_start_kimg: no fade (default: the model's "
                                          "recipe, else 0)")
    instance_k: int | None = option(None, "instance conditioning (IC-GAN): each real photo is shown with the feature "
                                    "of one of its k nearest same-city photos, and G draws from that feature, so "
                                    "samples vary as the city's photos do; 0 = off (default: the model's recipe, "
                                    "else 0)")
    layouts: int | None = option(None, "draw every sample on a coarse layout (the photo averaged down to G's first "
                                 "upsampled level) from a Gaussian mixture of this many components fitted to the "
                                 "training photos' layouts, with each city's own weights, so seeds differ as the "
                                 "photos do; 0 = off (default: the model's recipe, else 0)")
    layout_weight: float | None = option(None, "weight of the term in G's loss that keeps each sample's coarse "
                                         "layout on the one it was drawn on (mean squared error) (default: the "
                                         "model's recipe, else 1)")
    pair_layouts: bool | None = option(None, "the two fakes of a mode-seeking pair share one layout, so the term "
                                       "asks G for two different houses on it, not for two layouts (which the "
                                       "prior gives for free) (default: the model's recipe, else off)")
    city_init: str | None = option(None, "G's city embeddings at the start: random, or features = each city's "
                                   "photos' mean pretrained feature (StyleGAN-XL), so alike cities start alike "
                                   "(default: the model's recipe, else random)", choices=list(CITY_INITS))
    grow_from: str | None = option(None, "start from a trained run at half this resolution (its name or folder; "
                                   "e.g. a 48x64 run for --res 96x128): its G becomes the lower levels of this "
                                   "run's, one new top block fades in, D starts afresh", metavar="RUN")
    grow_fade_kimg: float = option(10.0, "...the new top block's image fades in over this many thousand images "
                                   "(0 = at once)")
    d_blur_sigma: float | None = option(None, "blur every image D sees (real and fake) by a Gaussian of this many "
                                        "pixels at the start, fading linearly to none over --d-blur-kimg, so early "
                                        "G is judged on shapes before texture (StyleGAN3); 0 = off (default: the "
                                        "model's recipe, else 0)")
    d_blur_kimg: float | None = option(None, "...over this many thousand images (default: the model's recipe, else 0)")
    any_city_p: float | None = option(None, 'fraction of all photos also shown as "(any city)", so that class learns '
                                      "every city's mix (default: the model's recipe, else 0)")
    model_kwargs: dict = option({}, "extra arguments of the model's builder as JSON, e.g. '{\"z_dim\": 64}'",
                                metavar="JSON")
    snapshot_every: int = option(20_000, "images between checkpoints (one is also written at the start and the end)")
    sample_every: int = option(10_000, "images between fixed-seed sample grids")
    tick_every: int = option(1_000, "images between metrics.jsonl / TensorBoard lines")
    kid_every: int = option(0, "images between KID estimates during training; 0 = off "
                            "(costs ~1 min per 1000 images on a CPU)")
    kid_images: int = option(300, "samples per KID estimate (against all held-out photos)")
    bn_stat_images: int = option(512, "before each snapshot, G_ema's BatchNorm statistics are re-estimated from "
                                 "this many samples (0 = keep G's)")
    keep_checkpoints: int = option(3, "most recent checkpoints kept on disk")
    grid_rows: int = option(12, "cities in the sample grid (those with the most photos)")
    grid_seeds: int = option(8, "fixed seeds per city in the sample grid (columns)")
    num_workers: int | None = option(None, "background threads reading batches from the memory-mapped arrays "
                                     "(0 = inline; default: 1 on CUDA, 0 on a CPU, where a reader thread takes "
                                     "time from torch's own threads: 56 vs 44 img/s on 2 cores)", flag="--workers")
    device: str = option("cpu", "cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    threads: int | None = option(None, "CPU threads torch may use (default: one per core; 1 is faster on a busy machine)")
    amp: str = option("auto", "mixed precision: bf16, fp16 (CUDA only, with a GradScaler), off, or auto = bf16 on "
                      "CUDA and on CPUs with native bf16 (AMX / AVX512-BF16), else off",
                      choices=["auto", "bf16", "fp16", "off"])
    max_rollbacks: int = option(3, "non-finite losses tolerated (each rolls back to the last checkpoint) before giving up")
    progress: bool = option(True, "show a progress bar and messages", flag="--quiet",
                            flag_help="no progress bar or messages")


# Fields that define a run: on resume they come from the run's config.json, whatever is passed.
RUN_FIELDS = ("model", "res", "batch", "lr_g", "lr_d", "betas", "loss", "augment", "mirror", "ema_kimg",
              "ema_rampup", "seed", "min_city_photos", "any_city_p", "mode_seeking", "mode_seeking_space",
              "spectral", "lecam", "feature_mmd", "cond_start_kimg", "cond_full_kimg", "instance_k", "layouts",
              "layout_weight", "pair_layouts", "city_init", "grow_from", "grow_fade_kimg", "d_blur_sigma",
              "d_blur_kimg", "model_kwargs", "grid_rows", "grid_seeds")
# Where neither the caller nor the model's recipe sets a field.
FALLBACK = {"batch": 64, "lr_g": 2e-4, "lr_d": 2e-4, "betas": (0.0, 0.99), "ema_kimg": 10.0, "augment": "",
            "mirror": False, "any_city_p": 0.0, "mode_seeking": 0.0, "mode_seeking_space": "pixels", "spectral": 0.0, "lecam": 0.0,
            "feature_mmd": 0.0, "cond_start_kimg": 0.0, "cond_full_kimg": 0.0, "instance_k": 0, "layouts": 0, "layout_weight": 1.0,
            "pair_layouts": False, "city_init": "random", "d_blur_sigma": 0.0, "d_blur_kimg": 0.0}
# Run fields added after runs were written without them: the value those runs trained with.
LEGACY = {"mode_seeking": 0.0, "mode_seeking_space": "pixels", "spectral": 0.0, "lecam": 0.0, "feature_mmd": 0.0,
          "cond_start_kimg": 0.0, "cond_full_kimg": 0.0, "instance_k": 0, "layouts": 0, "layout_weight": 1.0,
          "pair_layouts": False, "city_init": "random", "grow_from": None, "grow_fade_kimg": 10.0, "d_blur_sigma": 0.0, "d_blur_kimg": 0.0}


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill the fields left at None from the model's recipe, then FALLBACK; check the rest."""
    recipe = models.recipe(config.model)
    values = asdict(config)
    for key in FALLBACK.keys() | {"loss"}:
        if values[key] is None:
            values[key] = recipe.get(key, FALLBACK.get(key))
        if values[key] is None:
            values[key] = FALLBACK.get(key)
    values.update(res=models.check_res(config.res, config.model), batch=int(values["batch"]),
                  lr_g=float(values["lr_g"]), lr_d=float(values["lr_d"]),
                  betas=tuple(float(b) for b in values["betas"]), ema_kimg=float(values["ema_kimg"]),
                  augment=values["augment"] or "", mirror=bool(values["mirror"]),
                  any_city_p=float(values["any_city_p"] or 0.0), mode_seeking=float(values["mode_seeking"] or 0.0),
                  spectral=float(values["spectral"] or 0.0), lecam=float(values["lecam"] or 0.0),
                  feature_mmd=float(values["feature_mmd"] or 0.0),
                  cond_start_kimg=float(values["cond_start_kimg"] or 0.0),
                  cond_full_kimg=float(values["cond_full_kimg"] or 0.0), instance_k=int(values["instance_k"] or 0),
                  layouts=int(values["layouts"] or 0), layout_weight=float(values["layout_weight"]),
                  pair_layouts=bool(values["pair_layouts"]),
                  d_blur_sigma=float(values["d_blur_sigma"] or 0.0), d_blur_kimg=float(values["d_blur_kimg"] or 0.0))
    cfg = TrainConfig(**values)
    if cfg.loss not in LOSSES:
        raise NeighbourhoodsError(f"unknown loss {cfg.loss!r}: use {', '.join(LOSSES)}")
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
    for weight in ("mode_seeking", "spectral", "lecam", "feature_mmd", "layout_weight"):   # the loss terms' weights
        if getattr(cfg, weight) < 0:
            raise NeighbourhoodsError(f"--{weight.replace('_', '-')} must be >= 0 (got {getattr(cfg, weight)})")
    if cfg.feature_mmd and not models.supports_pooled_features(cfg.model):
        raise NeighbourhoodsError(f"model {cfg.model!r} has no pretrained feature net in D: leave --feature-mmd at 0")
    if cfg.mode_seeking and mode_seeking_reads_features(cfg.mode_seeking_space) \
            and not models.supports_pooled_features(cfg.model):
        raise NeighbourhoodsError(f"model {cfg.model!r} has no pretrained feature net in D: "
                                  "use --mode-seeking-space structure or pixels")
    if cfg.mode_seeking_space not in MS_SPACES:
        raise NeighbourhoodsError(f"unknown --mode-seeking-space {cfg.mode_seeking_space!r}: use "
                                  + " or ".join(MS_SPACES))
    if cfg.cond_start_kimg < 0 or cfg.cond_full_kimg < 0:
        raise NeighbourhoodsError("--cond-start-kimg and --cond-full-kimg must be >= 0")
    if cond_scale(cfg.cond_start_kimg, cfg.cond_full_kimg, 0) < 1 and not models.supports_cond_scale(cfg.model):
        raise NeighbourhoodsError(f"model {cfg.model!r} has no transitional conditioning: "
                                  "leave --cond-start-kimg and --cond-full-kimg at 0")
    if cfg.d_blur_sigma < 0 or cfg.d_blur_kimg < 0:
        raise NeighbourhoodsError("--d-blur-sigma and --d-blur-kimg must be >= 0")
    if cfg.d_blur_sigma > 0 and cfg.d_blur_kimg == 0:
        raise NeighbourhoodsError("--d-blur-sigma needs --d-blur-kimg, the images over which the blur fades out")
    if cfg.grow_fade_kimg < 0:
        raise NeighbourhoodsError(f"--grow-fade-kimg must be >= 0 (got {cfg.grow_fade_kimg})")
    if cfg.grow_from and cfg.instance_k:
        raise NeighbourhoodsError("--grow-from and --instance-k do not go together: grow a run without instances")
    if cfg.city_init not in CITY_INITS:
        raise NeighbourhoodsError(f"unknown --city-init {cfg.city_init!r}: use " + " or ".join(CITY_INITS))
    if cfg.city_init == "features" and not models.supports_instances(cfg.model):
        raise NeighbourhoodsError(f"model {cfg.model!r} has no pretrained feature net to start city embeddings "
                                  "from: leave --city-init at random")
    if cfg.grow_from and cfg.city_init != "random":
        raise NeighbourhoodsError("--grow-from and --city-init features do not go together: a grown run's cities "
                                  "start where its smaller run's ended")
    if cfg.instance_k < 0:
        raise NeighbourhoodsError(f"--instance-k must be >= 0 (got {cfg.instance_k})")
    if cfg.instance_k and not models.supports_instances(cfg.model):
        raise NeighbourhoodsError(f"model {cfg.model!r} has no instance conditioning: leave --instance-k at 0")
    if cfg.layouts < 0:
        raise NeighbourhoodsError(f"--layouts must be >= 0 (got {cfg.layouts})")
    if cfg.layouts and not models.supports_layouts(cfg.model):
        raise NeighbourhoodsError(f"model {cfg.model!r} cannot draw on layouts: leave --layouts at 0")
    if config.pair_layouts and not (cfg.layouts and cfg.mode_seeking):
        raise NeighbourhoodsError("--pair-layouts pairs the mode-seeking term's fakes on one layout: it needs "
                                  "--layouts and --mode-seeking above 0")
    cfg = replace(cfg, pair_layouts=bool(cfg.pair_layouts and cfg.layouts and cfg.mode_seeking))
    if cfg.amp not in ("auto", "bf16", "fp16", "off"):
        raise NeighbourhoodsError(f"unknown --amp {cfg.amp!r}: use auto, bf16, fp16 or off")
    return cfg


def run_name(config: TrainConfig) -> str:
    name = config.run or f"{config.model}-{Resolution.parse(config.res).name}"
    if not name or "/" in name or name.startswith("."):
        raise NeighbourhoodsError(f"bad run name {name!r}: use a plain folder name")
    return name


def resolve_run(ws: Workspace, config: TrainConfig) -> tuple[Path, TrainConfig, list[str]]:
    """(run folder, resolved config, notes for the user): new runs from `config`, resumed runs
    from their config.json for every RUN_FIELDS field."""
    name = run_name(config)
    run_dir = ws.run_dir(name)
    if not config.resume:
        if (run_dir / "config.json").is_file():
            raise NeighbourhoodsError(f"run {name!r} already exists in {ws.runs_dir}: pass --resume to continue it, "
                                      "or --run NEW_NAME to start another")
        # a new run takes the recipe's builder arguments under the caller's, written out in full with
        # the run: a later change of the recipe never changes how an existing run's weights are read
        kwargs = {**models.recipe(config.model).get("model_kwargs", {}), **(config.model_kwargs or {})}
        if config.grow_from:   # G's shape comes from the run it grows (train/grow.py)
            from neighbourhoods.train.grow import grown_model_kwargs
            res = models.check_res(config.res, config.model)
            kwargs = grown_model_kwargs(ws, config.model, res, config.grow_from, kwargs)
            # ...and so do its layouts: the source's prior, fitted once, grows with it
            source = int(kwargs.get("layouts", 0))
            if config.layouts is not None and config.layouts != source:
                raise NeighbourhoodsError(f"--layouts {config.layouts} differs from run {config.grow_from!r}'s "
                                          f"({source}): a grown G keeps its source's layouts; leave --layouts out")
            config = replace(config, layouts=source)
        cfg = resolve_config(replace(config, model_kwargs=kwargs))
        cfg.run = name
        return run_dir, cfg, []
    if not (run_dir / "config.json").is_file():
        raise NeighbourhoodsError(f"nothing to resume: {run_dir} has no config.json; drop --resume to start it")
    saved = {**LEGACY, **_saved_fields(read_config(run_dir))}
    passed = asdict(config)
    ignored = [k for k in RUN_FIELDS if k in saved and passed[k] is not None
               and passed[k] != getattr(TrainConfig(), k) and _canon(passed[k]) != _canon(saved[k])]
    notes = [f"note: resuming with the run's own {', '.join(f'{k}={saved[k]}' for k in ignored)}"] if ignored else []
    merged = {**passed, **{k: saved[k] for k in RUN_FIELDS if k in saved}, "run": name}
    return run_dir, resolve_config(TrainConfig(**merged)), notes


def _saved_fields(saved: dict) -> dict:
    out = {f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved}
    out["res"] = Resolution.parse(out["res"])
    if out.get("betas") is not None:
        out["betas"] = tuple(out["betas"])
    return out


def _canon(value):
    return list(value) if isinstance(value, tuple) else value


def to_json(cfg: TrainConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def describe(cfg: TrainConfig, run_dir: Path) -> str:
    """The resolved options as one block, as they will be written to config.json."""
    return f"training options -> {run_dir / 'config.json'}\n" + json.dumps(to_json(cfg), indent=2)


# --- the CLI's flags, generated from the fields ---------------------------------------------------------
def _flag_names(f) -> tuple[str, ...]:
    flag = f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"
    return (flag,) if isinstance(flag, str) else tuple(flag)


def _parser_for(hint) -> typing.Callable[[str], object] | None:
    """The argparse type for a field's annotation (Optional stripped)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = typing.get_origin(args[0]) or args[0]
    if args[0] is Resolution:
        return Resolution.parse
    if kind is tuple:
        return lambda text: tuple(float(v) for v in text.split(","))
    if kind is dict:
        return json.loads
    return kind if kind in (int, float, str) else None


def _argtype(parse, name: str):
    """A bad value becomes argparse's one-line usage error, not a traceback."""
    def convert(text: str):
        try:
            return parse(text)
        except (NeighbourhoodsError, ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(f"bad value {text!r} for {name}: {e}") from None
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; every flag defaults to None, so an option left out is
    not passed on and TrainConfig (or the recipe, or the resumed run) decides."""
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(TrainConfig):
        if not f.metadata.get("cli", True):
            continue
        extra = dict(f.metadata.get("argparse", {}))
        group = extra.pop("group", None)
        if group and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        target = groups[group] if group else parser
        names = _flag_names(f)
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f.metadata["flag_help"] or f.metadata["help"]
        if "default" not in help_text and default not in (None, {}, "", False, True):
            help_text += f" (default {Resolution.parse(default).name if isinstance(default, Resolution) else default})"
        if hints[f.name] is bool:   # resume: a switch; progress: spelled --quiet, its negation
            action = "store_false" if default else "store_true"
            target.add_argument(*names, dest=f.name, action=action, default=None, help=help_text)
            continue
        if typing.get_args(hints[f.name]) and bool in typing.get_args(hints[f.name]):
            target.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        parse = _parser_for(hints[f.name])
        target.add_argument(*names, dest=f.name, default=None, help=help_text.replace("%", "%%"),
                            type=_argtype(parse, names[0]) if parse not in (None, str) else None, **extra)


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the flags given (others keep TrainConfig's defaults)."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if given.get("minutes") is not None:
        given["kimg"] = None   # a time budget alone decides
    return TrainConfig(**given)
