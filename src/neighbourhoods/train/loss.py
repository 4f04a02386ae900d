"""What a training step optimises: the GAN loss with every term it adds, behind one small interface.

`GANLoss` is built with the networks and the recipe's terms (as Projected GAN's
`ProjectedGANLoss` is), and the loop calls it three times a step, with keywords:

    fakes = loss.fakes(z=z, labels=labels)                      # G's forward, once for both updates
    loss_d, terms = loss.discriminator(real=real, labels=labels, fakes=fakes)
    loss_g, terms = loss.generator(fakes=fakes)

Each returns its total and the terms that make it up (detached scalars, named as they are
logged to metrics.jsonl and TensorBoard): D's mean logits on the real and the fake images, G's
adversarial term, the mode-seeking term and the layout term. The loop owns the optimizers and
the order of updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neighbourhoods.train.augment import diffaugment


def _terms(logits) -> list[torch.Tensor]:
    """D may return one tensor or a list (one per scale); every loss averages over them."""
    return [t.float() for t in (logits if isinstance(logits, (list, tuple)) else [logits])]


def _mean_logit(logits) -> torch.Tensor:
    return torch.cat([t.detach().flatten(1) for t in _terms(logits)], 1).mean()


def d_loss(kind: str, real_logits, fake_logits) -> torch.Tensor:
    real, fake = _terms(real_logits), _terms(fake_logits)
    if kind == "bce":   # BCE with logits: -log sigmoid(real) - log(1 - sigmoid(fake))
        parts = [F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real, fake)]
    else:
        parts = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)]
    return sum(parts) / len(parts)


def g_loss(kind: str, fake_logits) -> torch.Tensor:
    fake = _terms(fake_logits)
    if kind == "bce":   # non-saturating: -log sigmoid(fake)
        parts = [F.softplus(-f).mean() for f in fake]
    else:
        parts = [-f.mean() for f in fake]
    return sum(parts) / len(parts)


def paired(rows: torch.Tensor) -> torch.Tensor:
    """Rows whose second half repeats the first, so fake i and fake i + N/2 share a city (and a
    layout)."""
    half = rows.shape[0] // 2
    out = rows.clone()
    out[half:2 * half] = rows[:half]
    return out


def structure(x: torch.Tensor) -> torch.Tensor:
    """What a house's layout is made of, without its exposure: the image at a quarter of its
    size (shapes, not texture), each channel standardised per image (mean 0, std 1), so a
    brighter or bluer copy of one house is the same structure."""
    x = F.avg_pool2d(x.float(), 4)
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True)
    return (x - mean) / (std + 0.05)


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """MSGAN (Mao et al., CVPR 2019): penalise fakes that differ less than their latents do.

    Pairs fake i with fake i + N/2 (same city, see paired); the term is the mean over pairs of
    1 / (mean |s1 - s2| / mean |z1 - z2|) with s the fakes' `structure` maps, large when two
    latents give one house. On structure, not pixels: pixel distance was bought with exposure
    and sky colour, not with other houses (docs/experiments.md).
    """
    half = fake.shape[0] // 2
    if half == 0:
        return fake.new_zeros(())
    x = structure(fake)
    dx = (x[:half] - x[half:2 * half]).abs().flatten(1).mean(1)
    dz = (z[:half].float() - z[half:2 * half].float()).abs().mean(1)
    return (1.0 / (dx / dz + 1e-5)).mean()


def layout_loss(fake: torch.Tensor, layouts: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between each fake averaged down to its layout's size and that
    layout (train/layouts.py): G may add any detail, but the coarse picture stays the one drawn."""
    return (F.adaptive_avg_pool2d(fake.float(), layouts.shape[-2:]) - layouts.float()).square().mean()


@dataclass
class Fakes:
    """One step's fakes: G's images (with their graph), and what they were drawn from."""
    images: torch.Tensor            # N x 3 x H x W in [-1, 1]
    labels: torch.Tensor            # their cities: the real batch's, in same-city pairs when mode seeking
    z: torch.Tensor                 # their latents
    layouts: torch.Tensor | None    # the layouts they were drawn on (G with a LayoutPrior), else None


class GANLoss:
    """The adversarial loss (hinge or BCE) with DiffAugment before D, and G's extra terms:
    mode seeking (MSGAN, on structure) and the layout term."""

    def __init__(self, *, G: nn.Module, G_train: nn.Module, D: nn.Module, D_train: nn.Module, kind: str,
                 augment: str = "", mode_seeking: float = 0.0, layout_weight: float = 0.0):
        self.G = G                      # G itself: its LayoutPrior draws the layouts
        self.G_train = G_train          # G, or G wrapped in DistributedDataParallel: the forward that trains
        self.D = D                      # D itself: judges the fakes for G's update (no gradient sync needed)
        self.D_train = D_train          # D, or its DDP wrapper: D's own update
        self.kind = kind                # "hinge" or "bce" (non-saturating)
        self.augment = augment          # DiffAugment policy for real and fake images alike ("" = none)
        self.mode_seeking = mode_seeking    # weight of the MSGAN term in G's loss (0 = off)
        self.layout_weight = layout_weight  # weight of the layout term in G's loss
        self.draws_layouts = getattr(G, "layouts", None) is not None

    def aug(self, x: torch.Tensor) -> torch.Tensor:
        return diffaugment(x, self.augment) if self.augment else x

    def fakes(self, *, z: torch.Tensor, labels: torch.Tensor) -> Fakes:
        """G's samples for the real batch's cities; with mode seeking, fake i + N/2 repeats fake
        i's city and layout, so the term asks G for two houses on one layout (the prior's two
        layouts would pay it for free)."""
        fake_labels = paired(labels) if self.mode_seeking else labels
        if not self.draws_layouts:
            return Fakes(self.G_train(z, fake_labels), fake_labels, z, None)
        layouts = self.G.layouts.sample(z, fake_labels)
        if self.mode_seeking:
            layouts = paired(layouts)
        return Fakes(self.G_train(z, fake_labels, layouts=layouts), fake_labels, z, layouts)

    def discriminator(self, *, real: torch.Tensor, labels: torch.Tensor,
                      fakes: Fakes) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """D's loss on the real batch and the (detached) fakes, and D's mean logits on each."""
        real_logits = self.D_train(self.aug(real), labels)
        fake_logits = self.D_train(self.aug(fakes.images.detach()), fakes.labels)
        loss = d_loss(self.kind, real_logits, fake_logits)
        return loss, {"d_real": _mean_logit(real_logits), "d_fake": _mean_logit(fake_logits)}

    def generator(self, *, fakes: Fakes) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """G's loss: the adversarial term through D, plus the mode-seeking and layout terms."""
        adv = g_loss(self.kind, self.D(self.aug(fakes.images), fakes.labels))
        loss, terms = adv, {"g_adv": adv.detach()}
        if self.mode_seeking:
            term = mode_seeking_loss(fakes.images, fakes.z)
            loss = loss + self.mode_seeking * term
            terms["g_mode_seeking"] = term.detach()
        if self.layout_weight and fakes.layouts is not None:
            term = layout_loss(fakes.images, fakes.layouts)
            loss = loss + self.layout_weight * term
            terms["g_layout"] = term.detach()
        return loss, terms
