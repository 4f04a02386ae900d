"""Model registry: every model is a (G, D) pair built from (num_classes, res, **kwargs).

    build(model_name, num_classes, res, **kwargs) -> (G, D)
    recipe(model_name)  -> the model's training defaults (lr, betas, EMA, augmentation, ...)
    recipe_kwargs(model_name, res) -> the builder arguments its recipe gives a new run at res

Contract (see also notes in runs.py): G is an nn.Module with attribute `z_dim` and
forward(z: N x z_dim, labels: N long) -> N x 3 x H x W in [-1, 1]; D has
forward(images in [-1, 1], labels) -> logits with leading dimension N. Parameters of D with
requires_grad=False (a frozen feature network) are never trained.

A model module may define, beside `build`:
    LOSS = "hinge"                      the adversarial loss it trains with (hinge or bce)
    AUGMENT_POLICY = "color,..."        DiffAugment applied to real and fake images before D
    TRAIN_DEFAULTS = {"lr_g": ..., ...} any TrainConfig field left at None takes this value
    recipe_kwargs(res) -> kwargs        builder arguments for a new run at res (default: TRAIN_DEFAULTS'
                                        model_kwargs), for those that depend on the resolution
    build_generator(num_classes, res, **kwargs) -> G   cheaper than build() for sampling
    LAYOUTS = True                      build takes layouts=K, layout_dim=d; G holds a LayoutPrior
                                        (G.layouts) and G(z, labels, layouts=N x 3 x h x w)
    grown_kwargs(res, kwargs) -> kwargs G's builder arguments at 2 x res, grown from a run at res
    load_grown(G, state_dict)           load that run's G weights into the grown G (train/grow.py)
    MIN_LEVELS, MAX_BASE_SIDE           the resolutions it builds: base x 2^k, k >= MIN_LEVELS,
                                        base sides 3..MAX_BASE_SIDE (None: no upper bound)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import Resolution, level_rule

MODELS = ("projected", "dcgan")   # registered names; the first is the default

def _module(model_name: str) -> ModuleType:
    if model_name not in MODELS:
        raise NeighbourhoodsError(f"unknown model {model_name!r}; known: {', '.join(MODELS)}")
    try:
        return importlib.import_module(f".{model_name}", __name__)
    except ImportError as e:
        raise NeighbourhoodsError(f"model {model_name!r} is not available: {e}") from e


def build(model_name: str, num_classes: int, res: tuple[int, int], **kwargs) -> tuple[nn.Module, nn.Module]:
    """The model's (G, D) for `num_classes` conditioning classes at res = (H, W)."""
    module = _module(model_name)
    try:
        return module.build(num_classes, tuple(res), **kwargs)
    except (ValueError, TypeError) as e:   # bad resolution or unknown kwarg: the user's to fix
        raise NeighbourhoodsError(f"model {model_name!r} at {res[0]}x{res[1]}: {e}") from e


def build_generator(model_name: str, num_classes: int, res: tuple[int, int], **kwargs) -> nn.Module:
    """G alone (skips D's feature network where the model allows it)."""
    module = _module(model_name)
    if not hasattr(module, "build_generator"):
        return build(model_name, num_classes, res, **kwargs)[0]
    try:
        return module.build_generator(num_classes, tuple(res), **kwargs)
    except (ValueError, TypeError) as e:   # a removed or unknown builder argument: one line
        raise NeighbourhoodsError(f"model {model_name!r} at {res[0]}x{res[1]}: {e}") from e


def recipe(model_name: str) -> dict:
    """Training defaults the model was designed with: loss, Adam's betas, augmentation, and TRAIN_DEFAULTS."""
    module = _module(model_name)
    out = {"loss": getattr(module, "LOSS", "hinge"), "betas": (0.0, 0.99),
           "augment": getattr(module, "AUGMENT_POLICY", "")}
    out.update(getattr(module, "TRAIN_DEFAULTS", {}))
    return out


def recipe_kwargs(model_name: str, res) -> dict:
    """The builder arguments the model's recipe gives a new run at `res` (some depend on it)."""
    module = _module(model_name)
    if hasattr(module, "recipe_kwargs"):
        return dict(module.recipe_kwargs(tuple(check_res(res, model_name))))
    return dict(recipe(model_name).get("model_kwargs", {}))


def check_res(res, model_name: str | None = None) -> Resolution:
    """`res` as a Resolution if `model_name` (or, with None, any registered model) can build it.

    The one place resolutions are validated: `ingest --res` asks for any model, `train` for its
    own, both before touching data. NeighbourhoodsError naming what the models accept otherwise.
    """
    res = Resolution.parse(res)
    rules = []
    for name in ([model_name] if model_name is not None else MODELS):
        module = _module(name)
        min_levels, max_base = getattr(module, "MIN_LEVELS", 0), getattr(module, "MAX_BASE_SIDE", None)
        try:
            res.up_levels(min_levels, max_base)
            return res
        except ValueError:
            rules.append(f"{name} needs {level_rule(min_levels, max_base)}")
    who = "no model can train" if model_name is None else f"model {model_name!r} cannot train"
    raise NeighbourhoodsError(f"{who} at {res.name}: {'; '.join(rules)} (e.g. 32x32, 64x64, 48x64, 96x128, 192x256)")


def supports_layouts(model_name: str) -> bool:
    """Whether the model's G can draw on layouts from a fitted prior (train --layouts; train/layouts.py)."""
    return bool(getattr(_module(model_name), "LAYOUTS", False))


def supports_growing(model_name: str) -> bool:
    """Whether a run of the model can be grown by an octave (train --grow-from)."""
    return hasattr(_module(model_name), "grown_kwargs")


def grown_kwargs(model_name: str, res: tuple[int, int], kwargs: dict) -> dict:
    """Builder arguments of the model's G at twice `res`, grown from a run at `res` with `kwargs`."""
    return _module(model_name).grown_kwargs(tuple(res), dict(kwargs))


def load_grown(model_name: str, G: nn.Module, state: dict) -> None:
    """Load a smaller run's G state dict into the G `grown_kwargs` builds; ValueError if it does not fit."""
    _module(model_name).load_grown(G, state)
