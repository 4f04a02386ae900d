"""DiffAugment: differentiable augmentations applied to real AND generated images before D.

Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training" (NeurIPS 2020),
following the authors' reference PyTorch code. Because every op is differentiable, G is
trained through the same augmentations D sees, so D cannot memorise the few thousand real
photos and G is not pushed to reproduce the augmentations ("leaking").

Randomness comes from torch's global generator, so a run that restores torch's RNG state on
resume draws the same augmentations as an uninterrupted run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """N x 1 x 1 x 1 uniform [0, 1) factors, one per image of `x`."""
    return torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device)


def _brightness(x: torch.Tensor) -> torch.Tensor:
    return x + (_uniform(x) - 0.5)


def _saturation(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_uniform(x) * 2) + mean


def _contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_uniform(x) + 0.5) + mean


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift by up to `ratio` of each side, filling with zeros (mid-grey in [-1, 1])."""
    n, _, h, w = x.shape
    shift_y, shift_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-shift_y, shift_y + 1, size=(n, 1, 1), device=x.device)
    tx = torch.randint(-shift_x, shift_x + 1, size=(n, 1, 1), device=x.device)
    gb, gy, gx = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(h, device=x.device),
                                torch.arange(w, device=x.device), indexing="ij")
    gy = torch.clamp(gy + ty + 1, 0, h + 1)
    gx = torch.clamp(gx + tx + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return padded.permute(0, 2, 3, 1).contiguous()[gb, gy, gx].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero one random rectangle of `ratio` x each side per image."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = torch.randint(0, h + (1 - ch % 2), size=(n, 1, 1), device=x.device)
    ox = torch.randint(0, w + (1 - cw % 2), size=(n, 1, 1), device=x.device)
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


def diffaugment(x: torch.Tensor, policy: str) -> torch.Tensor:
    """Apply the ops of `policy` (comma-separated: color, translation, cutout) to N x C x H x W.

    Empty policy returns `x` unchanged. Works for any H x W (square or 4:3).
    """
    for name in parse_policy(policy):
        for op in AUGMENTS[name]:
            x = op(x)
    return x
