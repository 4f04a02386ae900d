"""The default model: a city-conditioned Projected GAN sized for a CPU.

Sauer et al., "Projected GANs Converge Faster" (NeurIPS 2021), made conditional and small:

- Generator: FastGAN-style (Liu et al., ICLR 2021). Nearest-upsample + conv + BN + GLU blocks
  from a 3x4 or 4x4 base, noise injection, and skip-layer excitation (SLE: a low-resolution
  block gates the channels of a block two octaves up, a cheap global-structure path). The
  city enters through a class embedding concatenated to z AND through class-conditional
  BatchNorm gains/biases in every block (as in BigGAN), so each city shapes every scale.
- Discriminator: frozen ImageNet EfficientNet-Lite0 features at four scales (1/4 ... 1/32 of
  the input), mixed by fixed random 1x1 convs across channels (CCM) and by fixed random
  upsample-and-add fusion across scales (CSM), each scale judged by its own small trainable
  head (spectral-norm convs, patch logits). Conditioning by projection (Miyato & Koyama
  2018): each head's logit is a plain linear term plus <embed(city), features>.
  The feature net sees the image at its own size, enlarged (bilinear, by whole octaves) where
  its shorter side is below `feature_min_side`, far below the 224x224 the net was trained at
  (128x128 costs 3x less): a net shown 64 px cannot see the fine artefacts Inception sees in
  the enlarged image (docs/model.md); `feature_res` scales that size further (ablations).
- Training adds a mode-seeking term to G's loss (MSGAN; train.py, TRAIN_DEFAULTS below):
  without it every seed of a city drew the same house (docs/model.md has the measurements).
- Optional instance conditioning (IC-GAN; `--instance-k`, off by default: measured no gain at
  CPU budgets, docs/model.md): G holds a bank of the training photos' features (InstanceBank)
  and draws "a house like this one"; D's projection adds the instance feature's term.
- Layouts from the photos (`--layouts K`; LayoutPrior, train/layouts.py): G holds a Gaussian
  mixture of the training photos' coarse layouts (8x8 at 64x64) and draws every sample on one,
  chosen by its latent and city, so a city's seeds differ as its photos' layouts do.
- Growing by an octave (train --grow-from, train/grow.py): `grown_kwargs` spells out a G one
  level taller than a trained run's (its layout plus one top block), `load_grown` loads that
  run's weights below it, and G's `fade` buffer blends the old image into the new block's.
- Cost: G's top octaves are kept slim (16 channels at 64x64: 0.39 GFLOP/image forward). Since D's
  feature net sees a 64x64 image at 128 px, that net is about 3/4 of a CPU step (fp32); see
  docs/model.md for the measurements.

Contract with train.py (models/__init__.py registers this as "projected", the default):
    build(num_classes, res, **kwargs) -> (G, D)
    LOSS = "hinge"
    AUGMENT_POLICY below: the DiffAugment policy to apply to BOTH real and fake images
      before D (neighbourhoods.train.augment.diffaugment(x, AUGMENT_POLICY)).
    TRAIN_DEFAULTS: the recipe (lr, betas, EMA, mirror, batch): TrainConfig fields left at None
      take these values.
    G has BatchNorm: sample with G_ema.eval(); the EMA should copy (or average) G's buffers
      (BN running stats) along with its parameters, as StyleGAN2-ADA's loop does.
    D.feature_net is frozen and stays in eval mode whatever D.train(mode) is called with;
      D.trainable_parameters() lists what the D optimizer should update (frozen ones have
      requires_grad False, so filtering D.parameters() on requires_grad is equivalent).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import spectral_norm

from neighbourhoods.core.resolution import Resolution
from neighbourhoods.nets.efficientnet import load_efficientnet_lite0

AUGMENT_POLICY = "color,translation,cutout"   # DiffAugment on real and fake images before D
LOSS = "hinge"
TRAIN_DEFAULTS = {
    # 5x Projected GAN's 2e-4: a CPU budget buys ~500 steps, not its hundreds of thousands; at 64x64 and
    # ~15k images, KID 0.049 / 0.040 -> 0.019 / 0.016, recall 0.023 / 0.026 -> 0.070 / 0.083 (docs/model.md)
    "lr_g": 1e-3,
    "lr_d": 1e-3,
    "betas": (0.0, 0.99),    # beta1 0: no momentum, the usual choice for hinge/projected GANs
    "ema_kimg": 10.0,        # with train's ema_rampup 0.05 the EMA is short early, long later
    "mirror": True,          # house fronts read the same mirrored: twice the data for free
    "mode_seeking": 0.5,     # MSGAN term: without it every seed of a city drew the same house (docs/model.md)
    "mode_seeking_space": "structure",   # ...measured on layout, not exposure: pixels bought lighting, not houses
    # g_cond_from 1: no city in G's base map (z lays the house out, the city styles it);
    # feature_min_side 96: D's feature net sees a 64 px image at 128 px (KID 0.024 against 0.056 at
    # 64 px, docs/model.md), 48x64 at 96x128, 96x128 and up as they are
    "model_kwargs": {"g_cond_from": 1, "feature_min_side": 96},
    # every sample drawn on a layout from a 16-component mixture of the photos' 8x8 layouts: the grid is
    # no longer one house per city; KID and recall tie, precision and per-city KID gain (docs/model.md)
    "layouts": 16,
    # ...and the two fakes of a mode-seeking pair share one, so the term asks for two houses on one layout
    # (which the prior's own variety had made free): two seeds, KID 0.053 -> 0.044, recall 0.012 -> 0.024
    "pair_layouts": True,
    "any_city_p": 0.0,       # untested beyond a smoke run; the (any city) class gets the small cities only
    "batch": 32,             # at CPU budgets (~10-30k images) twice the updates of 64 matter more than smoother gradients
}

# EfficientNet-Lite0 block indices (0-based, flat over its 16 MBConv blocks) after which the
# four feature scales are tapped: 24 ch at 1/4, 40 ch at 1/8, 112 ch at 1/16, 320 ch at 1/32,
# the same taps Projected GAN uses.
_TAPS = (2, 4, 10, 15)
_TAP_CHANNELS = (24, 40, 112, 320)


# Resolutions it builds: base x 2^k with k >= 2, any base of >= 3 px a side (3x4 at 4:3).
MIN_LEVELS, MAX_BASE_SIDE = 2, None
TRANSITIONAL_CONDITIONING = True   # G and D weight the city signal by their `cond_scale`
INSTANCE_CONDITIONING = True       # G and D also take an instance feature (IC-GAN); see instance_features
LAYOUTS = True                     # G can draw on layouts from a LayoutPrior (build's layouts=K)
POOLED_FEATURES = True             # D(x, labels, pooled=True) also returns pooled_features (feature MMD)


# --- generator ------------------------------------------------------------------------------
class ConditionalBatchNorm(nn.Module):
    """BatchNorm whose gain and bias are linear in the class embedding (BigGAN); with
    conditional=False a plain affine BatchNorm that ignores the embedding."""

    def __init__(self, channels: int, embed_dim: int, conditional: bool = True):
        super().__init__()
        self.conditional = conditional
        self.bn = nn.BatchNorm2d(channels, affine=not conditional)
        if conditional:
            self.gain = nn.Linear(embed_dim, channels)
            self.bias = nn.Linear(embed_dim, channels)
            for lin in (self.gain, self.bias):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if not self.conditional:
            return self.bn(x)
        return self.bn(x) * (1 + self.gain(e))[:, :, None, None] + self.bias(e)[:, :, None, None]


class NoiseInjection(nn.Module):
    """Per-pixel noise with a learned strength (starts at 0): stochastic detail, like FastGAN.

    Fresh noise while training; in eval mode a fixed map (StyleGAN's noise_mode='const'), so a
    sample depends only on (z, city) and the weights, never on the RNG or the batch.
    """

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.register_buffer("const", torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x + self.weight * self.const
        n, _, h, w = x.shape
        return x + self.weight * torch.randn(n, 1, h, w, dtype=x.dtype, device=x.device)


class UpBlock(nn.Module):
    """2x nearest upsample, then `convs` x (conv3x3 -> noise -> cond. BN -> GLU)."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int, convs: int, size: tuple[int, int],
                 cond_bn: bool = True):
        super().__init__()
        self.convs = nn.ModuleList()
        self.noises = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(convs):
            self.convs.append(nn.Conv2d(c_in if i == 0 else c_out, 2 * c_out, 3, padding=1, bias=False))
            self.noises.append(NoiseInjection(size))
            self.norms.append(ConditionalBatchNorm(2 * c_out, embed_dim, conditional=cond_bn))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        for conv, noise, norm in zip(self.convs, self.noises, self.norms):
            x = F.glu(norm(noise(conv(x)), e), dim=1)
        return x


class InstanceBank(nn.Module):
    """The training photos' instance features, grouped by class, saved with G's weights.

    Instance conditioning (IC-GAN, Casanova et al., NeurIPS 2021): G draws "a house like this
    one of the city's photos", so variety comes from the city's own photos instead of having to
    be discovered from noise. A sample picks its instance from its latent: u = Phi(z . v) is
    uniform for z ~ N(0, I) and a fixed unit v, and row start[c] + floor(u * count[c]).
    """

    def __init__(self, num_classes: int, rows: int, dim: int, z_dim: int):
        super().__init__()
        self.register_buffer("features", torch.zeros(rows, dim))
        self.register_buffer("start", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.ones(num_classes, dtype=torch.long))
        v = torch.randn(z_dim, generator=torch.Generator().manual_seed(1))
        self.register_buffer("direction", v / v.norm())

    def pick(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        u = torch.special.ndtr(z.float() @ self.direction)
        count = self.count[labels]
        return self.start[labels] + torch.minimum((u * count).long(), count - 1)


class LayoutPrior(nn.Module):
    """A density model of the training photos' coarse layouts, saved with G's weights.

    A layout is a photo averaged down to G's first upsampled level (8x8 at 64x64, 6x8 at
    96x128): where sky, walls, roof, lawn and drive sit, and their colours. Fitted at the start
    of training (train/layouts.py): PCA to `dim` numbers, then a Gaussian mixture of
    `components` full-covariance Gaussians there, with mixture weights of each class's own.
    G draws every sample on top of one layout, so which house a seed gets comes from the
    photos' own variety, not from whatever few houses G would find by itself (docs/model.md:
    "Layouts from the photos"). A sample's layout is a pure function of its latent and city:
    u = Phi(z . v) picks the component from the city's cumulative weights, and eps = z P
    (P orthonormal and orthogonal to v, so eps ~ N(0, I) and independent of u) places it in
    the Gaussian: layout = mean + basis^T (mu_k + L_k eps). Each city shifts u and flips the
    signs of eps its own fixed way (neither changes their distributions), so one seed draws
    unrelated layouts in two cities instead of the same house tinted.
    """

    def __init__(self, num_classes: int, components: int, dim: int, size: tuple[int, int], z_dim: int):
        super().__init__()
        dim = min(dim, z_dim - 1)   # eps and u need dim + 1 orthogonal directions of the latent
        self.size = tuple(size)
        flat = 3 * size[0] * size[1]
        self.register_buffer("mean", torch.zeros(flat))
        self.register_buffer("basis", torch.zeros(dim, flat))
        self.register_buffer("means", torch.zeros(components, dim))
        self.register_buffer("chol", torch.zeros(components, dim, dim))
        self.register_buffer("cdf", torch.ones(num_classes, components))   # per class, cumulative
        q, _ = torch.linalg.qr(torch.randn(z_dim, dim + 1, generator=torch.Generator().manual_seed(2)))
        self.register_buffer("direction", q[:, 0].contiguous())
        self.register_buffer("projection", q[:, 1:].contiguous())
        g = torch.Generator().manual_seed(3)
        self.register_buffer("shift", torch.rand(num_classes, generator=g))
        self.register_buffer("signs", torch.randint(0, 2, (num_classes, dim), generator=g).float() * 2 - 1)

    def sample(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """N x 3 x h x w layouts in [-1, 1] for latents z and classes `labels`."""
        z = z.float()
        # Phi spelled with erf: ONNX has erf and no ndtr
        u = torch.remainder(0.5 * (1.0 + torch.erf(z @ self.direction / math.sqrt(2.0))) + self.shift[labels], 1.0)
        k = (self.cdf[labels] < u[:, None]).sum(dim=1).clamp(max=self.means.shape[0] - 1)
        eps = (z @ self.projection) * self.signs[labels]
        p = self.means[k] + (self.chol[k] @ eps[:, :, None]).squeeze(2)
        x = p @ self.basis + self.mean
        return x.view(z.shape[0], 3, *self.size).clamp(-1.0, 1.0)


def _pool_matrix(size: int) -> torch.Tensor:
    m = torch.zeros(4, size)
    for i in range(4):
        start, end = (i * size) // 4, -(-((i + 1) * size) // 4)
        m[i, start:end] = 1.0 / (end - start)
    return m


class AdaptivePool4(nn.Module):
    """nn.AdaptiveAvgPool2d(4) of an h x w map, as two small matrix products.

    The same averaging regions (rows floor(i*H/4) .. ceil((i+1)*H/4)), also where 4 does not
    divide a side (6 x 8 at 96x128). Spelled out with the map's size fixed at construction
    because ONNX has no such adaptive pooling, and after the first non-uniform pool the exporter
    loses the feature maps' sizes, so even the uniform ones later in G could not be exported.
    """

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        # not persistent: derived from the size, so checkpoints are the same with or without them
        self.register_buffer("rows", _pool_matrix(size[0]), persistent=False)
        self.register_buffer("cols", _pool_matrix(size[1]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ih,nchw,jw->ncij", self.rows.to(x.dtype), x, self.cols.to(x.dtype))


class SkipLayerExcitation(nn.Module):
    """FastGAN's SLE: channel gates for a high-res map computed from a low-res (h x w) one."""

    def __init__(self, c_low: int, c_high: int, low_size: tuple[int, int]):
        super().__init__()
        self.net = nn.Sequential(
            AdaptivePool4(low_size), nn.Conv2d(c_low, c_high, 4, bias=False), nn.SiLU(),
            nn.Conv2d(c_high, c_high, 1, bias=False), nn.Sigmoid())

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return high * self.net(low)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    """x averaged down (by a whole factor) or bilinearly enlarged to `size`."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if size[0] < x.shape[-2]:
        return F.avg_pool2d(x, x.shape[-2] // size[0])
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Generator(nn.Module):
    """(z, city) -> N x 3 x H x W image in [-1, 1]."""

    def __init__(self, num_classes: int, res: tuple[int, int], z_dim: int = 128, embed_dim: int = 128,
                 max_channels: int = 256, min_channels: int = 16, cond_bn: bool = True,
                 instances: int = 0, instance_dim: int = 64, cond_from: int = 0,
                 channels: list[int] | None = None, convs: list[int] | None = None, grown: bool = False,
                 grow_octaves: int = 0, layouts: int = 0, layout_dim: int = 32, layout_level: int = 1):
        super().__init__()
        self.z_dim = z_dim
        # The first level (0 = the base map, k = after k upsampling blocks) the city reaches:
        # below it G is unconditional, so the house's layout comes from z alone and the city
        # styles it (the "weaker class signal early" ablation of docs/model.md). Levels below
        # see a zero embedding rather than losing their city weights, so every setting (and every
        # run written before the option) has one layout of weights and one exported graph.
        self.cond_from = cond_from
        self.num_classes = num_classes
        self.instances = InstanceBank(num_classes, instances, instance_dim, z_dim) if instances else None
        self.instance_fc = nn.Linear(instance_dim, embed_dim) if instances else None
        self.res = tuple(res)
        levels, self.base = Resolution.parse(res).up_levels(MIN_LEVELS, MAX_BASE_SIDE)
        # Channels halve per octave from the output up: cheap high-res layers, wide low-res ones;
        # two convs per block at low resolution (cheap there), one at the top two octaves. A grown
        # run (train/grow.py) spells both out: its smaller run's layout plus one top block. A G
        # meant to be grown by `grow_octaves` is laid out as the lower levels of that larger G,
        # so growing it ends in exactly the native layout of the larger resolution.
        full = levels + grow_octaves
        ch = list(channels) if channels else [min(max_channels, min_channels * 2 ** (full - i))
                                              for i in range(levels + 1)]
        convs = list(convs) if convs else [2 if i + 1 < full - 1 else 1 for i in range(levels)]
        if len(ch) != levels + 1 or len(convs) != levels:
            raise ValueError(f"{levels} levels need {levels + 1} channel counts and {levels} conv counts "
                             f"(got {len(ch)} and {len(convs)})")
        self.channels = ch
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.fc = nn.Linear(z_dim + embed_dim, 2 * ch[0] * self.base[0] * self.base[1], bias=False)
        self.fc_norm = ConditionalBatchNorm(2 * ch[0], embed_dim, conditional=cond_bn)
        self.fc_norm_channels = 2 * ch[0]
        self.blocks = nn.ModuleList(
            UpBlock(ch[i], ch[i + 1], embed_dim, convs=convs[i],
                    size=(self.base[0] * 2 ** (i + 1), self.base[1] * 2 ** (i + 1)), cond_bn=cond_bn)
            for i in range(levels))
        # SLE from level i to level i + 2 for the upper levels (FastGAN: 4->64, 8->128, 16->256).
        self.sle = nn.ModuleDict({str(i + 2): SkipLayerExcitation(ch[i], ch[i + 2], (self.base[0] * 2 ** i,
                                                                                 self.base[1] * 2 ** i))
                                  for i in range(1, levels - 1)})
        self.to_rgb = nn.Conv2d(ch[-1], 3, 3, padding=1)
        # Layouts (LayoutPrior): every level also sees the sample's layout (a 1x1 conv of it, resized
        # to the level), and the image is drawn as a residual on the layout enlarged, so a seed's
        # house starts from a layout the photos have and G adds what the layout cannot hold.
        # `layout_level`: the G level whose size the layouts have (1 = after the first upsampling block)
        if layouts and not 1 <= layout_level <= levels:
            raise ValueError(f"layout_level must be 1..{levels} at {res[0]}x{res[1]} (got {layout_level})")
        size = (self.base[0] * 2 ** layout_level, self.base[1] * 2 ** layout_level)
        self.layouts = LayoutPrior(num_classes, layouts, layout_dim, size, z_dim) if layouts else None
        self.layout_in = nn.ModuleList(nn.Conv2d(3, c, 1) for c in ch) if layouts else None
        # A grown G keeps its smaller run's to_rgb one level down and fades from its (nearest-
        # upsampled) image to the new top block's: `fade` 0 -> 1 over training, a buffer so every
        # loader and export samples at the strength the checkpoint trained at (progressive GANs).
        self.to_rgb_prev = nn.Conv2d(ch[-2], 3, 3, padding=1) if grown else None
        if grown:
            self.register_buffer("fade", torch.ones(()))
        # Strength of the city signal (transitional conditioning, Shahbazi et al. 2022): training
        # may fade it in from 0 (unconditional); a plain attribute the loop and loaders set, not a weight.
        self.cond_scale = 1.0

    def forward(self, z: torch.Tensor, labels: torch.Tensor, instances: torch.Tensor | None = None,
                layouts: torch.Tensor | None = None) -> torch.Tensor:
        """`instances`: rows of the instance bank to condition on (training passes them); None
        picks one of the city's own from z, so a sample still depends only on (z, city).
        `layouts`: N x 3 x h x w layouts to draw on (training passes the ones its loss checks);
        None draws them from the LayoutPrior by (z, city)."""
        e = self.embed(labels)
        if self.instances is not None:
            rows = self.instances.pick(z, labels) if instances is None else instances
            e = e + self.instance_fc(self.instances.features[rows])
        e = e * self.cond_scale
        none = torch.zeros_like(e)
        e0 = e if self.cond_from <= 0 else none
        # the channel count spelled out (not -1): an exported graph (ONNX) must know BatchNorm's width
        x = self.fc(torch.cat([z, e0], dim=1)).view(z.size(0), self.fc_norm_channels, *self.base)
        x = F.glu(self.fc_norm(x, e0), dim=1)
        layout = None
        if self.layouts is not None:
            layout = (self.layouts.sample(z, labels) if layouts is None else layouts).to(x.dtype)
            x = x + self.layout_in[0](_resize(layout, x.shape[-2:]))
        feats = [x]
        for i, block in enumerate(self.blocks):
            x = block(x, e if i + 1 >= self.cond_from else none)
            level = str(i + 1)
            if level in self.sle:
                x = self.sle[level](x, feats[i - 1])
            if layout is not None:
                up = _resize(layout, x.shape[-2:])   # at the top level: the image's size, reused below
                x = x + self.layout_in[i + 1](up)
            feats.append(x)
        rgb = self.to_rgb(x)
        if layout is not None:   # a residual on the layout, in tanh's own units (atanh, spelled for ONNX)
            up = up.clamp(-0.98, 0.98)
            rgb = rgb + 0.5 * torch.log((1.0 + up) / (1.0 - up))
        if self.to_rgb_prev is not None:
            prev = F.interpolate(self.to_rgb_prev(feats[-2]), scale_factor=2.0, mode="nearest")
            rgb = torch.lerp(prev, rgb, self.fade.to(rgb.dtype))
        return torch.tanh(rgb)


# --- discriminator --------------------------------------------------------------------------
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


class MinibatchStd(nn.Module):
    """StyleGAN's minibatch standard deviation: one extra channel holding how much the features
    vary across each group of `group` images, so D can tell a batch of one house from a batch of
    many (Karras et al., ICLR 2018). Real and fake batches reach D separately (train/loss.py), so
    a group never mixes the two."""

    def __init__(self, group: int):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = math.gcd(self.group, n)   # a group size that divides the batch (a short last batch included);
        # groups are strided (images i, i + n/g, ...), as StyleGAN's
        y = x.float().reshape(g, n // g, c, h, w)
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))   # one figure per group
        y = y.to(x.dtype).reshape(1, n // g, 1, 1, 1).expand(g, -1, 1, h, w).reshape(n, 1, h, w)
        return torch.cat([x, y], dim=1)


class ProjectionHead(nn.Module):
    """One scale's discriminator: strided SN convs down to <= 4 px, then patch logits with a
    class-projection term; `mbstd` > 0 adds a minibatch-std channel (groups of that size) before
    the last conv."""

    def __init__(self, c_in: int, spatial: tuple[int, int], num_classes: int, width: int = 128,
                 cmap_dim: int = 64, batchnorm: bool = True, instance_dim: int = 0, mbstd: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        c, (h, w) = c_in, spatial
        while min(h, w) > 4:
            c_next = min(width * 2, max(width, c))
            layers += [spectral_norm(nn.Conv2d(c, c_next, 4, stride=2, padding=1, bias=not batchnorm)),
                       nn.BatchNorm2d(c_next) if batchnorm else nn.Identity(), nn.LeakyReLU(0.2)]
            c, h, w = c_next, (h + 1) // 2, (w + 1) // 2
        if mbstd:
            layers.append(MinibatchStd(mbstd))
        layers += [spectral_norm(nn.Conv2d(c + (1 if mbstd else 0), width, 3, padding=1)), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.out = spectral_norm(nn.Conv2d(width, 1, 1))
        self.cmap = spectral_norm(nn.Conv2d(width, cmap_dim, 1))
        self.embed = nn.Embedding(num_classes, cmap_dim)
        self.instance = nn.Linear(instance_dim, cmap_dim) if instance_dim else None
        self.cmap_dim = cmap_dim

    def forward(self, x: torch.Tensor, labels: torch.Tensor, cond_scale: float = 1.0,
                instances: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x)
        c = self.embed(labels)
        if self.instance is not None and instances is not None:
            c = c + self.instance(instances)
        proj = (self.cmap(h) * c[:, :, None, None]).sum(dim=1, keepdim=True)
        return (self.out(h) + cond_scale * proj / math.sqrt(self.cmap_dim)).flatten(1)


class ProjectedDiscriminator(nn.Module):
    """(images in [-1, 1], city) -> N x P patch logits from all four scales."""

    def __init__(self, num_classes: int, res: tuple[int, int], head_width: int = 128, feature_res: float = 1.0,
                 batchnorm: bool = True, instance_dim: int = 0, feature_min_side: int = 0, mbstd: int = 0):
        super().__init__()
        self.res = tuple(res)
        # the feature net's input: enlarged by whole octaves until its shorter side is >= feature_min_side
        # (64 -> 128, 48x64 -> 96x128, 96x128 as it is), times feature_res (ablations)
        octaves = max(0, math.ceil(math.log2(feature_min_side / min(self.res)))) if feature_min_side else 0
        self.feature_scale = feature_res * 2 ** octaves
        self.feature_net = FrozenFeatures()
        with torch.no_grad():
            probe = self.feature_net(torch.zeros(1, 3, *self._feature_size()))
        self.heads = nn.ModuleList(
            ProjectionHead(f.shape[1], tuple(f.shape[-2:]), num_classes, width=head_width, batchnorm=batchnorm,
                           instance_dim=instance_dim, mbstd=mbstd)
            for f in probe)
        self.cond_scale = 1.0   # weight of the class-projection term (transitional conditioning)

    def _feature_size(self) -> tuple[int, int]:
        return (round(self.res[0] * self.feature_scale), round(self.res[1] * self.feature_scale))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor, labels: torch.Tensor, instances: torch.Tensor | None = None,
                pooled: bool = False):
        """`instances`: the instance features (N x instance_dim) the images are judged against.
        pooled=True: also return the images' pooled pretrained features (`pooled_features`), which
        the feature-MMD term compares, at no extra cost."""
        if self.feature_scale != 1.0:
            images = F.interpolate(images, size=self._feature_size(), mode="bilinear", align_corners=False)
        taps = self.feature_net.taps(images)
        feats = self.feature_net.mix(taps)
        logits = torch.cat([head(f, labels, self.cond_scale, instances) for head, f in zip(self.heads, feats)], dim=1)
        return (logits, pooled_features(taps)) if pooled else logits


def build(num_classes: int, res: tuple[int, int], z_dim: int = 128, g_max_channels: int = 256,
          g_min_channels: int = 16, d_head_width: int = 128, feature_res: float = 1.0, feature_min_side: int = 0,
          g_cond_bn: bool = True, d_batchnorm: bool = True, instances: int = 0,
          instance_dim: int = 64, g_cond_from: int = 0, g_channels: list[int] | None = None,
          g_convs: list[int] | None = None, g_grown: bool = False,
          g_grow_octaves: int = 0, d_mbstd: int = 0, layouts: int = 0,
          layout_dim: int = 32, layout_level: int = 1) -> tuple[Generator, ProjectedDiscriminator]:
    """The default model's (G, D) for `num_classes` cities at `res` = (H, W); `instances` > 0:
    instance-conditioned, with a bank of that many `instance_dim` features in G; `d_mbstd` > 0:
    a minibatch-std channel in each of D's heads, over groups of that many images; `layouts` > 0:
    G draws on layouts from a LayoutPrior of that many components in `layout_dim` dimensions, at
    the size of G's level `layout_level` (1: 8x8 at 64x64, 2: 16x16)."""
    G = build_generator(num_classes, res, z_dim=z_dim, g_max_channels=g_max_channels, g_min_channels=g_min_channels,
                        g_cond_bn=g_cond_bn, instances=instances, instance_dim=instance_dim,
                        g_cond_from=g_cond_from, g_channels=g_channels, g_convs=g_convs, g_grown=g_grown,
                        g_grow_octaves=g_grow_octaves, layouts=layouts, layout_dim=layout_dim,
                        layout_level=layout_level)
    D = ProjectedDiscriminator(num_classes, res, head_width=d_head_width, feature_res=feature_res,
                               batchnorm=d_batchnorm, instance_dim=instance_dim if instances else 0,
                               feature_min_side=feature_min_side, mbstd=d_mbstd)
    return G, D


def build_generator(num_classes: int, res: tuple[int, int], z_dim: int = 128, g_max_channels: int = 256,
                    g_min_channels: int = 16, d_head_width: int = 128, feature_res: float = 1.0,
                    feature_min_side: int = 0, g_cond_bn: bool = True, d_batchnorm: bool = True, instances: int = 0,
                    instance_dim: int = 64, g_cond_from: int = 0, g_channels: list[int] | None = None,
                    g_convs: list[int] | None = None, g_grown: bool = False, g_grow_octaves: int = 0,
                    d_mbstd: int = 0, layouts: int = 0, layout_dim: int = 32, layout_level: int = 1) -> Generator:
    """G alone, for sampling: skips loading the feature network (D-only arguments are ignored)."""
    return Generator(num_classes, res, z_dim=z_dim, max_channels=g_max_channels, min_channels=g_min_channels,
                     cond_bn=g_cond_bn, instances=instances, instance_dim=instance_dim, cond_from=g_cond_from,
                     channels=g_channels, convs=g_convs, grown=g_grown, grow_octaves=g_grow_octaves,
                     layouts=layouts, layout_dim=layout_dim, layout_level=layout_level)


# --- growing by an octave (train --grow-from; train/grow.py) --------------------------------------
def grown_kwargs(res: tuple[int, int], kwargs: dict) -> dict:
    """The builder arguments of G at twice `res` grown from a run built at `res` with `kwargs`:
    the smaller G's channels and convs kept level for level, plus one top block of one conv at
    the top's width halved, not below g_min_channels (the native top). From a default run that
    is slimmer than the native layout (whose lower levels are twice as wide); from a run built
    with g_grow_octaves 1 it is the native layout."""
    small = build_generator(1, res, **kwargs)
    top = max(small.channels[-1] // 2, int(kwargs.get("g_min_channels", 16)))
    return {**{k: v for k, v in kwargs.items() if k != "g_grow_octaves"}, "g_channels": [*small.channels, top],
            "g_convs": [len(b.convs) for b in small.blocks] + [1], "g_grown": True}


def load_grown(G: Generator, small: dict[str, torch.Tensor]) -> None:
    """Load the smaller G's state dict into a grown G: every level kept, its to_rgb becoming
    to_rgb_prev (the image faded out; a twice-grown run's own to_rgb_prev and fade are dropped),
    its layout prior kept (layouts are the size of a level counted from the base, which growing keeps).
    ValueError unless exactly the new top block (block, SLE, to_rgb, fade) is left as built."""
    state = {}
    for key, value in small.items():
        if key.startswith("to_rgb_prev.") or key == "fade":
            continue
        state[key.replace("to_rgb.", "to_rgb_prev.", 1) if key.startswith("to_rgb.") else key] = value
    top = len(G.blocks)
    new = (f"blocks.{top - 1}.", f"sle.{top}.", "to_rgb.", f"layout_in.{top}.")
    try:
        missing, unexpected = G.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(str(e).splitlines()[0]) from None
    kept = [k for k in missing if not k.startswith(new) and k != "fade"]
    if unexpected or kept:
        raise ValueError(f"the weights do not fit one octave below this G (missing {kept[:3]}, "
                         f"unexpected {unexpected[:3]})")


def pooled_features(taps: list[torch.Tensor]) -> torch.Tensor:
    """N x 432: the last two EfficientNet taps (112 + 320 channels) average-pooled, each half
    unit-normalised so both count: what a photo shows, without where."""
    return torch.cat([F.normalize(t.float().mean(dim=(2, 3)), dim=1) for t in taps[2:]], dim=1)


@torch.no_grad()
def instance_features(images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """N x 432 instance features (`pooled_features`) of uint8 N x 3 x H x W photos, at the
    training resolution (cheap: a few seconds for thousands of 64 px photos)."""
    net = FrozenFeatures()
    out = [pooled_features(net.taps(images[i:i + batch].float().div(127.5).sub(1.0)))
           for i in range(0, len(images), batch)]
    return torch.cat(out)
