"""What a training step optimises, behind one small interface the loop calls twice.

`GANLoss.discriminator(D, ...)` is D's loss on real and fake images, `GANLoss.generator(D, ...)`
is G's; the loop owns the forward pass of G, the optimizers and the order of updates (as
StyleGAN2-ADA's `training/loss.py` and Projected GAN's `ProjectedGANLoss` leave the loop
alone). A model picks its loss family (bce, hinge or rpgan) and augmentation in its recipe;
another loss is another class with the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neighbourhoods.train.augment import diffaugment, gaussian_blur


def _terms(logits) -> list[torch.Tensor]:
    """D may return one tensor or a list (one per scale); every loss averages over them."""
    return [t.float() for t in (logits if isinstance(logits, (list, tuple)) else [logits])]


def d_loss(kind: str, real_logits, fake_logits) -> torch.Tensor:
    real, fake = _terms(real_logits), _terms(fake_logits)
    if kind == "rpgan":   # relativistic pairing (R3GAN): each real must outscore its paired fake
        parts = [F.softplus(f - r).mean() for r, f in zip(real, fake)]   # real i vs fake i
    elif kind == "bce":   # BCE with logits: -log sigmoid(real) - log(1 - sigmoid(fake))
        parts = [F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real, fake)]
    else:
        parts = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)]
    return sum(parts) / len(parts)


def g_loss(kind: str, fake_logits, real_logits=None) -> torch.Tensor:
    """G's loss; rpgan needs the (detached) logits of the real batch that the fakes pair with."""
    fake = _terms(fake_logits)
    if kind == "rpgan":   # each fake must outscore its paired real; per patch of every scale
        real = _terms(real_logits)
        parts = [F.softplus(r - f).mean() for r, f in zip(real, fake)]
    elif kind == "bce":   # non-saturating: -log sigmoid(fake)
        parts = [F.softplus(-f).mean() for f in fake]
    else:
        parts = [-f.mean() for f in fake]
    return sum(parts) / len(parts)


def pair_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels whose second half repeats the first, so fake i and fake i + N/2 share a city."""
    half = labels.shape[0] // 2
    out = labels.clone()
    out[half:2 * half] = labels[:half]
    return out


def structure(x: torch.Tensor) -> torch.Tensor:
    """What a house's layout is made of, without its exposure: the image at a quarter of its
    size (shapes, not texture), each channel standardised per image (mean 0, std 1), so a
    brighter or bluer copy of one house is the same structure."""
    x = F.avg_pool2d(x.float(), 4)
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True)
    return (x - mean) / (std + 0.05)


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor, space: str = "pixels") -> torch.Tensor:
    """MSGAN (Mao et al., CVPR 2019): penalise fakes that differ less than their latents do.

    Pairs fake i with fake i + N/2 (same city, see pair_labels); the term is the mean over
    pairs of 1 / (mean |x1 - x2| / mean |z1 - z2|), large when two latents give one image.
    space "structure": the distance between the pair's `structure` maps, so G cannot buy it
    with exposure or sky colour alone (which pixel distance rewards) and must vary the layout.
    """
    half = fake.shape[0] // 2
    if half == 0:
        return fake.new_zeros(())
    x = structure(fake) if space == "structure" else fake.float()
    dx = (x[:half] - x[half:2 * half]).abs().flatten(1).mean(1)
    dz = (z[:half].float() - z[half:2 * half].float()).abs().mean(1)
    return (1.0 / (dx / dz + 1e-5)).mean()


@dataclass
class GANLoss:
    """An adversarial loss with DiffAugment (and an optional blur) before D and an optional
    mode-seeking term for G."""
    kind: str               # "bce" (non-saturating), "hinge" or "rpgan" (relativistic pairing, R3GAN)
    augment: str = ""       # DiffAugment policy applied to real and fake images alike ("" = none)
    mode_seeking: float = 0.0   # weight of the MSGAN term in G's loss (0 = off)
    mode_seeking_space: str = "pixels"   # what the term measures distance in: pixels or structure
    blur_sigma: float = 0.0  # Gaussian blur of every image D sees, in pixels; the loop fades it per step

    def aug(self, x: torch.Tensor) -> torch.Tensor:
        x = gaussian_blur(x, self.blur_sigma)
        return diffaugment(x, self.augment) if self.augment else x

    def fake_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The cities to draw fakes for: the real batch's, in same-city pairs when mode seeking."""
        return pair_labels(labels) if self.mode_seeking else labels

    def discriminator(self, D: nn.Module, real: torch.Tensor, labels: torch.Tensor,
                      fake: torch.Tensor, fake_labels: torch.Tensor,
                      real_cond: dict | None = None, fake_cond: dict | None = None) -> torch.Tensor:
        """D's loss; `fake` should be detached from G. `*_cond`: D's further conditioning
        keyword arguments (instance features) for the real and the fake images."""
        return d_loss(self.kind, D(self.aug(real), labels, **(real_cond or {})),
                      D(self.aug(fake), fake_labels, **(fake_cond or {})))

    def generator(self, D: nn.Module, fake: torch.Tensor, fake_labels: torch.Tensor, z: torch.Tensor,
                  fake_cond: dict | None = None, real: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None, real_cond: dict | None = None) -> torch.Tensor:
        """G's loss; `real`, `labels`, `real_cond`: the batch the fakes pair with (rpgan only,
        which judges them again with the updated D, as R3GAN's generator phase does)."""
        real_logits = None
        if self.kind == "rpgan":
            with torch.no_grad():
                real_logits = D(self.aug(real), labels, **(real_cond or {}))
        loss = g_loss(self.kind, D(self.aug(fake), fake_labels, **(fake_cond or {})), real_logits)
        if self.mode_seeking:
            loss = loss + self.mode_seeking * mode_seeking_loss(fake, z, self.mode_seeking_space)
        return loss
