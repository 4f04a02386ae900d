"""The learning rates over a run: constant, or a cosine over the images the run plans for.

`lr_schedule` "cosine" takes both Adam rates from the recipe's down to LR_FLOOR of it along half
a cosine over the run's plan, then holds them (R3GAN's schedule, Huang et al. 2024: its long runs
decay the rate by a cosine to a quarter). The plan is written into the schedule itself,
"cosine:KIMG", in the run's config.json, so the rate is a pure function of (images seen, the
run's config) and resume stays exact:

- a run given --kimg alone plans for it (at its start: "cosine" becomes "cosine:<kimg>");
- a run with a time budget (--minutes, --gpu-hours) trains PLAN_AFTER images at the starting
  rates, then plans for the images its measured rate reaches by its deadline (at most --kimg);
- "cosine:KIMG" given by hand is an explicit plan: a budget spread over several sittings.
"""

from __future__ import annotations

import math

from neighbourhoods.core.errors import NeighbourhoodsError

SCHEDULES = ("constant", "cosine")
LR_FLOOR = 0.25        # the cosine's end, as a fraction of the starting rates
PLAN_AFTER = 2_000     # images a time-budgeted run trains before it measures its rate and plans


def parse(text: str) -> tuple[str, float | None]:
    """"constant" | "cosine" | "cosine:KIMG" -> (kind, planned images or None)."""
    kind, _, plan = str(text).partition(":")
    if kind not in SCHEDULES or (plan and kind == "constant"):
        raise NeighbourhoodsError(f"unknown --lr-schedule {text!r}: use constant, cosine or cosine:KIMG")
    if not plan:
        return kind, None
    try:
        kimg = float(plan)
    except ValueError:
        kimg = -1.0
    if not (kimg > 0 and math.isfinite(kimg)):
        raise NeighbourhoodsError(f"--lr-schedule {text!r}: the plan must be a positive number of kimg")
    return kind, kimg * 1000


def planned(text: str, kimg: float | None) -> str:
    """The schedule with its plan written in, where it has none yet and `kimg` is known."""
    kind, plan = parse(text)
    if kind == "constant" or plan is not None or not kimg:
        return text
    return f"{kind}:{kimg:g}"


def lr_factor(text: str, images_seen: int) -> float:
    """The rates' multiplier at `images_seen` (1 for constant, and for a cosine not planned yet)."""
    kind, plan = parse(text)
    if kind == "constant" or plan is None:
        return 1.0
    progress = min(1.0, images_seen / plan)
    return LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))


def planned_images(images_now: int, images_at_start: int, seconds_so_far: float, seconds_left: float) -> float:
    """Images a time-budgeted run will have seen at its deadline, at the rate of this call so far."""
    rate = (images_now - images_at_start) / max(seconds_so_far, 1e-9)
    return images_now + rate * max(seconds_left, 0.0)


def describe(text: str, lr_g: float, lr_d: float) -> str:
    """One line for --dry-run and the run's start."""
    kind, plan = parse(text)
    if kind == "constant":
        return f"learning rates constant: G {lr_g:g}, D {lr_d:g}"
    over = f"{plan / 1000:g} kimg" if plan else f"the images the time budget buys (planned after {PLAN_AFTER:,})"
    return (f"learning rates: cosine over {over}, G {lr_g:g} -> {lr_g * LR_FLOOR:g}, "
            f"D {lr_d:g} -> {lr_d * LR_FLOOR:g}, then held")
