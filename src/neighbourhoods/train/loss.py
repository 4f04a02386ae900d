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
from neighbourhoods.train.config import mode_seeking_reads_features
from neighbourhoods.train.data import photo_batches


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


def paired(rows: torch.Tensor) -> torch.Tensor:
    """Rows whose second half repeats the first, so fake i and fake i + N/2 share a city (or a
    layout, or an instance)."""
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


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor, space: str = "pixels",
                      features: torch.Tensor | None = None) -> torch.Tensor:
    """MSGAN (Mao et al., CVPR 2019): penalise fakes that differ less than their latents do.

    Pairs fake i with fake i + N/2 (same city, see paired); the term is the mean over
    pairs of 1 / (mean |x1 - x2| / mean |z1 - z2|), large when two latents give one image.
    space "structure": the distance between the pair's `structure` maps, so G cannot buy it
    with exposure or sky colour alone (which pixel distance rewards) and must vary the layout.
    space "features": between the fakes' pooled pretrained `features` (N x F, what D's feature
    net sees in them), each dimension standardised over the batch (statistics held constant),
    so the distance is in units of the batch's own spread, as z's is, and cannot be bought
    with pixels the feature net ignores. space "structure+features": the sum of both terms.
    """
    if space == "structure+features":
        return mode_seeking_loss(fake, z, "structure") + mode_seeking_loss(fake, z, "features", features)
    half = fake.shape[0] // 2
    if half == 0:
        return fake.new_zeros(())
    if space == "features":
        if features is None:
            raise ValueError('mode seeking in space "features" needs the fakes\' pooled features')
        f = features.float()
        x = (f - f.mean(0).detach()) / (f.std(0).detach() + 1e-3)
    else:
        x = structure(fake) if space == "structure" else fake.float()
    dx = (x[:half] - x[half:2 * half]).abs().flatten(1).mean(1)
    dz = (z[:half].float() - z[half:2 * half].float()).abs().mean(1)
    return (1.0 / (dx / dz + 1e-5)).mean()


_RINGS: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, int]] = {}


def _rings(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ring index of each rfft2 bin kept, bins per ring, rings) for an h x w image: 1 ring = 1
    cycle per min(h, w) pixels; bins beyond the shorter side's Nyquist limit are left out.
    Fixed per shape, so computed once."""
    if (h, w) not in _RINGS:
        fy, fx = torch.fft.fftfreq(h), torch.fft.rfftfreq(w)
        r = torch.round(torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) * min(h, w)).long().flatten()
        n = min(h, w) // 2 + 1
        ring = torch.where(r < n, r, -1)
        _RINGS[(h, w)] = (ring, torch.bincount(ring[ring >= 0], minlength=n).float(), n)
    return _RINGS[(h, w)]


def radial_spectrum(x: torch.Tensor) -> torch.Tensor:
    """The batch's mean power per spatial frequency (azimuthally averaged, grey, each image's mean
    removed): rings 1 .. min(H, W) / 2, a 1-D profile of how much detail the images hold at each scale."""
    g = x.float().mean(1)
    g = g - g.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.rfft2(g, norm="ortho").abs().square().mean(0).flatten()
    ring, count, n = _rings(*g.shape[1:])
    ring, count = ring.to(power.device), count.to(power.device)
    keep = ring >= 0
    total = torch.zeros(n, device=power.device).index_add_(0, ring[keep], power[keep])
    return (total / count.clamp(min=1))[1:]


def photos_spectrum(images, rows, batch: int = 512) -> torch.Tensor:
    """radial_spectrum over the training photos (uint8 N x H x W x 3 rows of a memory map): the
    target of the spectral term, a pure function of the data (so a resumed run has the same)."""
    total = 0.0
    for x in photo_batches(images, rows, batch):
        total = total + radial_spectrum(x) * len(x)   # weighted by the chunk's size: the mean over all rows
    return total / len(rows)


def spectral_loss(fake: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Durall et al. (CVPR 2020): generators built on upsampling leave too much (or too little)
    power at fine spatial frequencies, a signature every fake shares. The mean squared difference
    of the log radial spectra of the fake batch and of the photos (`target`, photos_spectrum): a
    batch statistic, so single images stay free to differ."""
    eps = 1e-8
    return (torch.log(radial_spectrum(fake) + eps) - torch.log(target.to(fake.device) + eps)).square().mean()


def feature_mmd(fake: torch.Tensor, real: torch.Tensor, scales: tuple[float, ...] = (0.25, 1.0, 4.0)) -> torch.Tensor:
    """Squared maximum mean discrepancy (Gretton et al. 2012; as a generator's loss, Li et al.
    2015) between a fake and a real batch of pooled pretrained features (N x F), unbiased: the
    fakes' mean kernel among themselves, minus twice their mean kernel with the reals, plus the
    reals' among themselves. Its gradient pulls fakes towards the photos *and* pushes fakes that
    sit closer to each other than photos do apart, so a batch that draws one house pays for it.
    Gaussian kernels at `scales` x the batch's median squared distance (detached)."""
    x, y = fake.float(), real.float()
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        return x.new_zeros(())
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).square()
    median = d2.detach()[~torch.eye(n + m, dtype=torch.bool, device=d2.device)].median().clamp(min=1e-6)
    k = sum(torch.exp(-d2 / (s * median)) for s in scales)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    off = lambda a, size: (a.sum() - a.diagonal().sum()) / (size * (size - 1))   # noqa: E731
    return off(kxx, n) - 2 * kxy.mean() + off(kyy, m)


def layout_loss(fake: torch.Tensor, layouts: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between each fake averaged down to its layout's size and that
    layout (train/layouts.py): G may add any detail, but the coarse picture stays the one drawn."""
    return (F.adaptive_avg_pool2d(fake.float(), layouts.shape[-2:]) - layouts.float()).square().mean()


LECAM_DECAY = 0.99   # the anchors' EMA decay (Tseng et al.)


def lecam_term(real_logits, fake_logits, anchors: list[float]) -> torch.Tensor:
    """LeCam regularisation (Tseng et al., CVPR 2021): D's outputs on real photos are pulled
    towards the moving average of its outputs on fakes, and vice versa, which keeps D from
    growing ever more confident on few photos. `anchors` = [EMA on reals, EMA on fakes] is moved
    here by this batch (averaged over DDP ranks, so every rank keeps the same anchors)."""
    real = torch.cat([t.flatten(1) for t in _terms(real_logits)], 1)
    fake = torch.cat([t.flatten(1) for t in _terms(fake_logits)], 1)
    term = (real - anchors[1]).square().mean() + (fake - anchors[0]).square().mean()
    means = torch.stack([real.detach().mean(), fake.detach().mean()])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(means)
        means /= torch.distributed.get_world_size()
    for i, m in enumerate(means.tolist()):
        anchors[i] = LECAM_DECAY * anchors[i] + (1 - LECAM_DECAY) * m
    return term


@dataclass
class GANLoss:
    """An adversarial loss with DiffAugment (and an optional blur) before D, and optional terms:
    mode seeking, spectral and feature MMD for G, LeCam for D."""
    kind: str               # "bce" (non-saturating), "hinge" or "rpgan" (relativistic pairing, R3GAN)
    augment: str = ""       # DiffAugment policy applied to real and fake images alike ("" = none)
    mode_seeking: float = 0.0   # weight of the MSGAN term in G's loss (0 = off)
    mode_seeking_space: str = "pixels"   # what the term measures distance in: pixels, structure, features or both
    blur_sigma: float = 0.0  # Gaussian blur of every image D sees, in pixels; the loop fades it per step
    spectral: float = 0.0   # weight of the spectral term in G's loss (0 = off)
    lecam: float = 0.0      # weight of LeCam regularisation in D's loss (0 = off)
    feature_mmd: float = 0.0   # weight of the MMD of pooled pretrained features in G's loss (0 = off)
    spectrum: torch.Tensor | None = None   # ...and its target, the photos' radial spectrum (photos_spectrum)
    layout_weight: float = 0.0   # weight of the layout term in G's loss (fakes drawn on layouts; 0 = off)

    def aug(self, x: torch.Tensor, pairs: bool = False) -> torch.Tensor:
        x = gaussian_blur(x, self.blur_sigma)
        return diffaugment(x, self.augment, pairs) if self.augment else x

    def fake_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The cities to draw fakes for: the real batch's, in same-city pairs when mode seeking."""
        return paired(labels) if self.mode_seeking else labels

    def discriminator(self, D: nn.Module, real: torch.Tensor, labels: torch.Tensor,
                      fake: torch.Tensor, fake_labels: torch.Tensor,
                      real_cond: dict | None = None, fake_cond: dict | None = None,
                      anchors: list[float] | None = None) -> torch.Tensor:
        """D's loss; `fake` should be detached from G. `*_cond`: D's further conditioning
        keyword arguments (instance features) for the real and the fake images. `anchors`: the
        run's LeCam anchors (TrainState.lecam_anchors), moved by this batch when lecam > 0."""
        real_logits = D(self.aug(real), labels, **(real_cond or {}))
        fake_logits = D(self.aug(fake), fake_labels, **(fake_cond or {}))
        loss = d_loss(self.kind, real_logits, fake_logits)
        if self.lecam:
            loss = loss + self.lecam * lecam_term(real_logits, fake_logits, anchors)
        return loss

    def generator(self, D: nn.Module, fake: torch.Tensor, fake_labels: torch.Tensor, z: torch.Tensor,
                  fake_cond: dict | None = None, real: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None, real_cond: dict | None = None,
                  layouts: torch.Tensor | None = None) -> torch.Tensor:
        """G's loss; `real`, `labels`, `real_cond`: the batch the fakes pair with (rpgan, which
        judges them again with the updated D, as R3GAN's generator phase does; and the feature
        MMD, which compares the fakes' pooled features with theirs). `layouts`: the layouts the
        fakes were drawn on (train --layouts)."""
        pooled = {"pooled": True} if self.feature_mmd else {}   # D returns (logits, pooled features)
        # mode seeking in feature space reads the fakes' pooled features from this same forward, with
        # each pair augmented alike, so what it measures is the two houses and not two augmentations
        ms_features = bool(self.mode_seeking) and mode_seeking_reads_features(self.mode_seeking_space)
        fake_pooled = {"pooled": True} if pooled or ms_features else {}
        real_logits = real_features = None
        if self.kind == "rpgan" or self.feature_mmd:
            with torch.no_grad():
                real_out = D(self.aug(real), labels, **(real_cond or {}), **pooled)
            real_logits, real_features = real_out if pooled else (real_out, None)
        fake_out = D(self.aug(fake, pairs=ms_features), fake_labels, **(fake_cond or {}), **fake_pooled)
        fake_logits, fake_features = fake_out if fake_pooled else (fake_out, None)
        loss = g_loss(self.kind, fake_logits, real_logits)
        if self.mode_seeking:
            loss = loss + self.mode_seeking * mode_seeking_loss(fake, z, self.mode_seeking_space, fake_features)
        if self.spectral:
            loss = loss + self.spectral * spectral_loss(fake, self.spectrum)
        if self.feature_mmd:
            loss = loss + self.feature_mmd * feature_mmd(fake_features, real_features)
        if self.layout_weight and layouts is not None:
            loss = loss + self.layout_weight * layout_loss(fake, layouts)
        return loss
