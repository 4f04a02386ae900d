"""The baseline: a conditional DCGAN, as the system we grow from trained it.

Radford et al., "Unsupervised Representation Learning with Deep Convolutional GANs" (2015),
the PyTorch reference layout (transposed convs, BatchNorm, ReLU in G / LeakyReLU 0.2 in D,
N(0, 0.02) init), made conditional the usual way: G gets a city embedding concatenated to
the noise; D gets the city as extra constant image channels (its embedding broadcast to
H x W). BCE loss with the non-saturating G loss, Adam 2e-4, beta1 0.5 (TRAIN_DEFAULTS).

Any H x W that is a base of 3-8 px a side times 2^k works, so 4:3 thumbnails (48x64,
96x128: a 3x4 base) train as well as squares (64x64: a 4x4 base).
"""

from __future__ import annotations

import torch
from torch import nn

from neighbourhoods.core.resolution import Resolution

LOSS = "bce"
AUGMENT_POLICY = ""   # faithful to the original: no augmentation
TRAIN_DEFAULTS = {
    "lr_g": 2e-4,          # Radford et al.
    "lr_d": 2e-4,
    "betas": (0.5, 0.999),
    "ema_kimg": 0.0,       # the original has no EMA: G_ema is a plain copy of G (BN stats included)
    "mirror": False,
}


# Resolutions it builds: base x 2^k with k >= 2 and a base of 3-8 px a side (the first layer is a
# base-sized transposed conv from 1x1; a larger base would be one huge kernel).
MIN_LEVELS, MAX_BASE_SIDE = 2, 8


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    def __init__(self, num_classes: int, res: tuple[int, int], z_dim: int = 100, embed_dim: int = 50,
                 ngf: int = 64):
        super().__init__()
        self.z_dim = z_dim
        self.res = tuple(res)
        k, base = Resolution.parse(res).up_levels(MIN_LEVELS, MAX_BASE_SIDE)
        ch = [ngf * min(8, 2 ** (k - 1 - i)) for i in range(k)]   # 512, 256, 128, 64 at 64x64
        self.embed = nn.Embedding(num_classes, embed_dim)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim + embed_dim, ch[0], base, 1, 0, bias=False),   # 1x1 -> base
            nn.BatchNorm2d(ch[0]), nn.ReLU(True)]
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ch[-1], 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, self.embed(labels)], dim=1)
        return self.main(x[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, num_classes: int, res: tuple[int, int], embed_dim: int = 16, ndf: int = 64):
        super().__init__()
        k, base = Resolution.parse(res).up_levels(MIN_LEVELS, MAX_BASE_SIDE)
        ch = [ndf * min(8, 2 ** i) for i in range(k)]             # 64, 128, 256, 512 at 64x64
        self.embed = nn.Embedding(num_classes, embed_dim)
        layers: list[nn.Module] = [nn.Conv2d(3 + embed_dim, ch[0], 4, 2, 1, bias=False),
                                   nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(ch[-1], 1, base, 1, 0, bias=False)]    # base -> 1x1 logit
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        city = self.embed(labels)[:, :, None, None].expand(n, -1, h, w).to(images.dtype)
        return self.main(torch.cat([images, city], dim=1)).flatten(1)


def build(num_classes: int, res: tuple[int, int], z_dim: int = 100, g_embed: int = 50, d_embed: int = 16,
          ngf: int = 64, ndf: int = 64) -> tuple[Generator, Discriminator]:
    """(G, D) of the conditional DCGAN; ngf/ndf = 64 is the original's width."""
    return (Generator(num_classes, res, z_dim=z_dim, embed_dim=g_embed, ngf=ngf),
            Discriminator(num_classes, res, embed_dim=d_embed, ndf=ndf))


def build_generator(num_classes: int, res: tuple[int, int], z_dim: int = 100, g_embed: int = 50,
                    ngf: int = 64, **_d_kwargs) -> Generator:
    return Generator(num_classes, res, z_dim=z_dim, embed_dim=g_embed, ngf=ngf)
