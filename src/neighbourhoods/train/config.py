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
from neighbourhoods.models.runs import read_config
from neighbourhoods.train import scale, schedule


def option(default, help: str, *, flag: str | tuple[str, ...] | None = None, flag_help: str | None = None,
           cli: bool = True, **argparse_kwargs):
    """A TrainConfig field: its default, its help line, and how the CLI spells the flag (with
    `flag_help` where the flag says the opposite of the field, as --quiet does for progress)."""
    meta = {"help": help, "flag": flag, "flag_help": flag_help, "cli": cli, "argparse": argparse_kwargs}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Fixed parts of the recipe: each was an option once, measured, and is no option now.
EMA_RAMPUP = 0.05        # G_ema's half-life at most this fraction of the images seen (StyleGAN2-ADA)
LAYOUT_WEIGHT = 1.0      # weight of the layout term in G's loss (4 lost: docs/experiments.md)
GROW_FADE_KIMG = 10.0    # a grown run's new top block fades in over this many thousand images
GRID_ROWS, GRID_SEEDS = 12, 8   # the progress grid: the cities with the most photos x fixed seeds
MAX_ROLLBACKS = 3        # non-finite losses rolled back to the last checkpoint before giving up
KID_IMAGES = 300         # samples per in-training KID estimate (kid_every)
BN_STAT_IMAGES = 512     # before each snapshot, G_ema's BatchNorm statistics are re-estimated from this many samples

# Options that were removed, and why: giving one is a one-line error that says so. Each can still
# be run at commit 06f09c2; docs/experiments.md has its measurement. A run trained before whose
# config.json names one at its `off` value loads and resumes as any other.
AT_06F09C2 = "it can still be run at commit 06f09c2"
REMOVED = {
    "loss": "each model trains with its own loss (projected: hinge, dcgan: BCE); R3GAN's rpgan lost on KID and recall",
    "betas": "Adam's betas are the model's recipe",
    "spectral": "the spectral term lost on KID (docs/experiments.md)",
    "lecam": "LeCam traded KID for recall and was never the default (docs/experiments.md)",
    "feature_mmd": "the feature-MMD term lost on KID (docs/experiments.md)",
    "cond_start_kimg": "transitional conditioning lost on KID and recall (docs/experiments.md)",
    "cond_full_kimg": "transitional conditioning lost on KID and recall (docs/experiments.md)",
    "instance_k": "instance conditioning lost recall on the default recipe (docs/experiments.md)",
    "mode_seeking_space": "mode seeking is measured on structure; pixels, features and both spaces lost "
                          "(docs/experiments.md)",
    "city_init": "city embeddings from the photos' features tied with random ones (docs/experiments.md)",
    "d_blur_sigma": "blurring D's input was a wash at 96x128 (docs/experiments.md)",
    "d_blur_kimg": "blurring D's input was a wash at 96x128 (docs/experiments.md)",
    "any_city_p": "never measured; the (any city) class learns from the small cities' photos",
    "ema_rampup": f"fixed at {EMA_RAMPUP} (StyleGAN2-ADA's ramp-up)",
    "layout_weight": f"fixed at {LAYOUT_WEIGHT}: weight 4 lost (docs/experiments.md)",
    "pair_layouts": "always on with layouts and mode seeking: it won on two seeds (docs/experiments.md)",
    "grow_fade_kimg": f"fixed at {GROW_FADE_KIMG:g} thousand images",
    "kid_images": f"fixed at {KID_IMAGES} samples per in-training estimate",
    "grid_rows": f"the progress grid is fixed at {GRID_ROWS} cities",
    "grid_seeds": f"the progress grid is fixed at {GRID_SEEDS} seeds",
    "max_rollbacks": f"fixed at {MAX_ROLLBACKS}",
    "bn_stat_images": f"G_ema's BatchNorm statistics are re-estimated from a fixed {BN_STAT_IMAGES} samples",
}
# ...and the value at which a run written before trained as runs do now (None: whatever it was).
REMOVED_OFF = {"spectral": 0.0, "lecam": 0.0, "feature_mmd": 0.0, "cond_start_kimg": None, "cond_full_kimg": None,
               "instance_k": 0, "city_init": "random", "d_blur_sigma": 0.0, "d_blur_kimg": None, "any_city_p": 0.0,
               "ema_rampup": EMA_RAMPUP, "layout_weight": LAYOUT_WEIGHT, "grow_fade_kimg": GROW_FADE_KIMG}


def removed_error(name: str) -> NeighbourhoodsError:
    """The one-line error for a removed option (its field name, or its flag)."""
    key = name.lstrip("-").replace("-", "_")
    flag = "--" + key.replace("_", "-")
    return NeighbourhoodsError(f"{flag} was removed: {REMOVED[key]}; {AT_06F09C2}")


def check_saved_run(saved: dict, run: str) -> None:
    """A run written before an option was removed resumes only where it trained as runs do now."""
    model = saved.get("model", "projected")
    recipe = models.recipe(model)
    off = {**REMOVED_OFF, "loss": recipe["loss"], "betas": list(recipe["betas"])}
    bad = [k for k, v in off.items() if k in saved and v is not None and _canon(saved[k]) != _canon(v)]
    start, full = saved.get("cond_start_kimg") or 0.0, saved.get("cond_full_kimg") or 0.0
    if full > start:
        bad.append("cond_full_kimg")
    if saved.get("mode_seeking") and saved.get("mode_seeking_space", "structure") != "structure":
        bad.append("mode_seeking_space")
    if saved.get("layouts") and saved.get("mode_seeking") and saved.get("pair_layouts") is False:
        bad.append("pair_layouts")
    if bad:
        raise NeighbourhoodsError(f"run {run!r} was trained with {', '.join(f'{k}={saved[k]}' for k in bad)}: "
                                  f"{removed_error(bad[0])}")


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
    gpu_hours: float | None = option(None, "stop after this many GPU-hours: H x 60 / GPUs minutes of wall clock per "
                                     "process (train/scale.py)", group="stop")
    lr_g: float | None = option(None, "Adam learning rate of G (default: the model's recipe)")
    lr_d: float | None = option(None, "Adam learning rate of D (default: the model's recipe)")
    augment: str | None = option(None, 'DiffAugment policy for real and fake images before D, e.g. '
                                 '"color,translation,cutout"; "" = off (default: the model\'s recipe)')
    mirror: bool | None = option(None, "random left-right flips of the real photos (default: the model's recipe)")
    lr_schedule: str | None = option(None, "the rates over the run: constant; cosine (down to a quarter over the "
                                     "images planned: --kimg, or what a time budget buys at the rate measured after "
                                     "the first 2,000 images); or cosine:KIMG, an explicit plan (a budget spread over "
                                     "sittings); train/schedule.py (default: the model's recipe, else constant)",
                                     metavar="SCHEDULE")
    ema_kimg: float | None = option(None, "half-life of the EMA of G in thousands of images; 0 = G_ema is a copy of G "
                                    "(default: the model's recipe, else 10)")
    seed: int = option(0, "seeds weights, data order, noise and augmentation")
    min_city_photos: int = option(50, 'cities with fewer training photos share the "(any city)" class, '
                                  "which also serves unknown cities")
    mode_seeking: float | None = option(None, "weight of the mode-seeking (MSGAN) term that keeps one city's samples "
                                        "diverse, measured on each image's structure (1/4 size, channels "
                                        "standardised); 0 = off (default: the model's recipe, else 0)")
    layouts: int | None = option(None, "draw every sample on a coarse layout (the photo averaged down to G's first "
                                 "upsampled level) from a Gaussian mixture of this many components fitted to the "
                                 "training photos' layouts, with each city's own weights, so seeds differ as the "
                                 "photos do; with mode seeking, the two fakes of a pair share one layout; 0 = off "
                                 "(default: the model's recipe, else 0)")
    grow_from: str | None = option(None, "start from a trained run at half this resolution (its name or folder; "
                                   "e.g. a 48x64 run for --res 96x128): its G becomes the lower levels of this "
                                   f"run's, one new top block fades in over {GROW_FADE_KIMG:g} kimg, D starts afresh",
                                   metavar="RUN")
    model_kwargs: dict = option({}, "extra arguments of the model's builder as JSON, e.g. '{\"z_dim\": 64}'",
                                metavar="JSON")
    snapshot_every: int = option(20_000, "images between checkpoints (one is also written at the start and the end)")
    sample_every: int = option(10_000, "images between fixed-seed sample grids")
    tick_every: int = option(1_000, "images between metrics.jsonl / TensorBoard lines")
    kid_every: int = option(10_000, f"images between estimates of the training curve's KID ({KID_IMAGES} samples "
                            "against a fixed draw of 2,000 training photos); the snapshot where it is lowest is "
                            "kept as the run's best (checkpoints/best.json), which generate, serve, export, "
                            "evaluate and report use unless given --snapshot last; 0 = off (~20 s an estimate "
                            "at 96x128 on 2 CPU cores, ~3%% of a CPU run; the first also embeds the 2,000 photos once)")
    keep_checkpoints: int = option(3, "most recent checkpoints kept on disk")
    num_workers: int | None = option(None, "background threads reading batches from the memory-mapped arrays "
                                     "(0 = inline; default: 1 on CUDA, 0 on a CPU, where a reader thread takes "
                                     "time from torch's own threads: 56 vs 44 img/s on 2 cores)", flag="--workers")
    device: str = option("cpu", "cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK); on cuda, batch, rates and "
                         "EMA left out follow train/scale.py's rule (64 images per GPU, rates x sqrt(batch/32) up to "
                         "2e-3, EMA x batch/32), which --dry-run prints (WORLD_SIZE=N plans for N GPUs)")
    threads: int | None = option(None, "CPU threads torch may use (default: one per core; 1 is faster on a busy machine)")
    amp: str = option("auto", "mixed precision: bf16, fp16 (CUDA only, with a GradScaler), off, or auto = bf16 on "
                      "CUDA and on CPUs with native bf16 (AMX / AVX512-BF16), else off",
                      choices=["auto", "bf16", "fp16", "off"])
    progress: bool = option(True, "show a progress bar and messages", flag="--quiet",
                            flag_help="no progress bar or messages")


# Fields that define a run: on resume they come from the run's config.json, whatever is passed.
RUN_FIELDS = ("model", "res", "batch", "lr_g", "lr_d", "lr_schedule", "augment", "mirror", "ema_kimg", "seed", "min_city_photos",
              "mode_seeking", "layouts", "grow_from", "model_kwargs")
# Where neither the caller nor the model's recipe sets a field.
FALLBACK = {"batch": 64, "lr_g": 2e-4, "lr_d": 2e-4, "ema_kimg": 10.0, "augment": "", "mirror": False,
            "mode_seeking": 0.0, "layouts": 0, "lr_schedule": "constant"}
# Run fields added after runs were written without them: the value those runs trained with.
LEGACY = {"mode_seeking": 0.0, "layouts": 0, "grow_from": None, "lr_schedule": "constant"}


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill the fields left at None from the model's recipe, then FALLBACK, with batch, rates and
    EMA scaled to the device (scale_rule); check the rest."""
    recipe = models.recipe(config.model)
    values = asdict(config)
    values.update(scale_rule(config)[0])
    if config.gpu_hours is not None:
        if config.gpu_hours <= 0:
            raise NeighbourhoodsError("--gpu-hours must be positive")
        values.update(minutes=config.gpu_hours * 60 / scale.processes(), kimg=None)
    for key in FALLBACK:
        if values[key] is None:
            values[key] = recipe.get(key, FALLBACK[key])
    values.update(res=models.check_res(config.res, config.model), batch=int(values["batch"]),
                  lr_g=float(values["lr_g"]), lr_d=float(values["lr_d"]), ema_kimg=float(values["ema_kimg"]),
                  augment=values["augment"] or "", mirror=bool(values["mirror"]),
                  mode_seeking=float(values["mode_seeking"] or 0.0), layouts=int(values["layouts"] or 0))
    cfg = TrainConfig(**values)
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
    schedule.parse(cfg.lr_schedule)   # a one-line error where it is not one
    if cfg.mode_seeking < 0:
        raise NeighbourhoodsError(f"--mode-seeking must be >= 0 (got {cfg.mode_seeking})")
    if cfg.layouts < 0:
        raise NeighbourhoodsError(f"--layouts must be >= 0 (got {cfg.layouts})")
    if cfg.layouts and not models.supports_layouts(cfg.model):
        raise NeighbourhoodsError(f"model {cfg.model!r} cannot draw on layouts: leave --layouts at 0")
    if cfg.amp not in ("auto", "bf16", "fp16", "off"):
        raise NeighbourhoodsError(f"unknown --amp {cfg.amp!r}: use auto, bf16, fp16 or off")
    return cfg


def scale_rule(config: TrainConfig) -> tuple[dict, list[str]]:
    """(batch, lr_g, lr_d, ema_kimg) for the config's device and torchrun's process count
    (train/scale.py), and why."""
    recipe = models.recipe(config.model)
    base = {k: recipe.get(k, FALLBACK[k]) for k in ("batch", "lr_g", "lr_d", "ema_kimg")}
    return scale.scaled(base, config.device, scale.processes(), asdict(config))


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
        res = models.check_res(config.res, config.model)
        recipe = models.recipe_kwargs(config.model, res)
        kwargs = {**recipe, **(config.model_kwargs or {})}
        if config.grow_from:   # G's shape comes from the run it grows (train/grow.py), not the recipe's
            from neighbourhoods.train.grow import G_SHAPE_KEYS, grown_model_kwargs
            kwargs = {k: v for k, v in recipe.items() if k not in G_SHAPE_KEYS} | (config.model_kwargs or {})
            kwargs = grown_model_kwargs(ws, config.model, res, config.grow_from, kwargs)
            # ...and so do its layouts: the source's prior, fitted once, grows with it
            source = int(kwargs.get("layouts", 0))
            if config.layouts is not None and config.layouts != source:
                raise NeighbourhoodsError(f"--layouts {config.layouts} differs from run {config.grow_from!r}'s "
                                          f"({source}): a grown G keeps its source's layouts; leave --layouts out")
            config = replace(config, layouts=source)
        cfg = resolve_config(replace(config, model_kwargs=kwargs))
        cfg.run = name
        cfg.lr_schedule = schedule.planned(cfg.lr_schedule, cfg.kimg if cfg.minutes is None else None)
        notes = [f"scale rule ({scale.processes()} x {config.device}): {why}" for why in scale_rule(config)[1]]
        notes.append(schedule.describe(cfg.lr_schedule, cfg.lr_g, cfg.lr_d))
        if config.gpu_hours is not None:
            notes.append(f"budget: {config.gpu_hours:g} GPU-hours = {cfg.minutes:g} minutes per process")
        return run_dir, cfg, notes
    if not (run_dir / "config.json").is_file():
        raise NeighbourhoodsError(f"nothing to resume: {run_dir} has no config.json; drop --resume to start it")
    saved_config = read_config(run_dir)
    check_saved_run(saved_config, name)
    saved = {**LEGACY, **_saved_fields(saved_config)}
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
    add_removed_arguments(parser)


class _Removed(argparse.Action):
    """A removed option's flag: the one-line error that says why, instead of argparse's
    'unrecognized arguments'."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"error: {removed_error(option_string)}\n")


def add_removed_arguments(parser: argparse.ArgumentParser) -> None:
    for name in REMOVED:
        parser.add_argument("--" + name.replace("_", "-"), nargs="?", action=_Removed, help=argparse.SUPPRESS)


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the flags given (others keep TrainConfig's defaults)."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if given.get("minutes") is not None or given.get("gpu_hours") is not None:
        given["kimg"] = None   # a time budget alone decides
    return TrainConfig(**given)
