"""DiffAugment: differentiable augmentations applied to real AND generated images before D.

Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training" (NeurIPS 2020),
following the authors' reference PyTorch code. Because every op is differentiable, G is
trained through the same augmentations D sees, so D cannot memorise the few thousand real
photos and G is not pushed to reproduce the augmentations ("leaking").

Randomness comes from torch's global generator, so a run that restores torch's RNG state on
resume draws the same augmentations as an uninterrupted run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x blurred by a Gaussian of `sigma` pixels (separable, reflected edges); sigma 0: x itself.
    Differentiable, so G is trained through the blur D sees (StyleGAN3's blur of D's input)."""
    if sigma <= 0:
        return x
    radius = min(math.ceil(3 * sigma), (min(x.shape[-2:]) - 1))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.pad(x, [radius, radius, radius, radius], mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _per_image(draw, n: int, pairs: bool) -> torch.Tensor:
    """draw(k) -> k random parameters; with `pairs`, image i + n/2 gets image i's (an odd last one its own)."""
    if not pairs:
        return draw(n)
    half = draw(n // 2)
    return torch.cat([half, half] + ([draw(1)] if n % 2 else []))


def _uniform(x: torch.Tensor, pairs: bool) -> torch.Tensor:
    """N x 1 x 1 x 1 uniform [0, 1) factors, one per image of `x` (per pair with `pairs`)."""
    return _per_image(lambda k: torch.rand(k, 1, 1, 1, dtype=x.dtype, device=x.device), x.size(0), pairs)


def _brightness(x: torch.Tensor, pairs: bool = False) -> torch.Tensor:
    return x + (_uniform(x, pairs) - 0.5)


def _saturation(x: torch.Tensor, pairs: bool = False) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_uniform(x, pairs) * 2) + mean


def _contrast(x: torch.Tensor, pairs: bool = False) -> torch.Tensor:
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_uniform(x, pairs) + 0.5) + mean


def _translation(x: torch.Tensor, pairs: bool = False, ratio: float = 0.125) -> torch.Tensor:
    """Shift by up to `ratio` of each side, filling with zeros (mid-grey in [-1, 1])."""
    n, _, h, w = x.shape
    shift_y, shift_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = _per_image(lambda k: torch.randint(-shift_y, shift_y + 1, size=(k, 1, 1), device=x.device), n, pairs)
    tx = _per_image(lambda k: torch.randint(-shift_x, shift_x + 1, size=(k, 1, 1), device=x.device), n, pairs)
    gb, gy, gx = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(h, device=x.device),
                                torch.arange(w, device=x.device), indexing="ij")
    gy = torch.clamp(gy + ty + 1, 0, h + 1)
    gx = torch.clamp(gx + tx + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return padded.permute(0, 2, 3, 1).contiguous()[gb, gy, gx].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, pairs: bool = False, ratio: float = 0.5) -> torch.Tensor:
    """Zero one random rectangle of `ratio` x each side per image."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = _per_image(lambda k: torch.randint(0, h + (1 - ch % 2), size=(k, 1, 1), device=x.device), n, pairs)
    ox = _per_image(lambda k: torch.randint(0, w + (1 - cw % 2), size=(k, 1, 1), device=x.device), n, pairs)
    gb, gy, gx = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(ch, device=x.device),
                                torch.arange(cw, device=x.device), indexing="ij")
    gy = torch.clamp(gy + oy - ch // 2, 0, h - 1)
    gx = torch.clamp(gx + ox - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gy, gx] = 0
    return x * mask.unsqueeze(1)


AUGMENTS = {
    "color": [_brightness, _saturation, _contrast],
    "translation": [_translation],
    "cutout": [_cutout],
}


def parse_policy(policy: str) -> list[str]:
    """'color,translation' -> ['color', 'translation']; ValueError naming the known ones."""
    names = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = [p for p in names if p not in AUGMENTS]
    if unknown:
        raise ValueError(f"unknown DiffAugment op(s) {unknown}; known: {sorted(AUGMENTS)}")
    return names


def diffaugment(x: torch.Tensor, policy: str, pairs: bool = False) -> torch.Tensor:
    """Apply the ops of `policy` (comma-separated: color, translation, cutout) to N x C x H x W.

    Empty policy returns `x` unchanged. Works for any H x W (square or 4:3). `pairs`: image
    i + N/2 is augmented exactly as image i (the mode-seeking pairs of train/loss.py), so a
    distance measured between them after augmenting is the images', not the augmentations'.
    """
    for name in parse_policy(policy):
        for op in AUGMENTS[name]:
            x = op(x, pairs)
    return x
