"""The default model's generator: (z, city) -> a house photo, drawn on a layout from the photos.

A FastGAN-like slim G sized for a CPU: a linear map of (z, city) to a small base map, then
2x upsampling blocks (conv, per-pixel noise, conditional BatchNorm, GLU), skip-layer excitation
from two levels down, and an RGB head. The city reaches G only from level `cond_from` on (the
recipe's: 1/8 of the image's shorter side, projected.city_level): z lays the house out, the city
styles it. Every sample is drawn on a coarse layout from a `LayoutPrior` fitted to the training
photos (train/layouts.py), which G sees at every level and paints a residual on. docs/model.md
says why each part is there.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from neighbourhoods.core.resolution import Resolution

# Resolutions it builds: base x 2^k with k >= 2, any base of >= 3 px a side (3x4 at 4:3).
MIN_LEVELS, MAX_BASE_SIDE = 2, None


class ConditionalBatchNorm(nn.Module):
    """BatchNorm whose gain and bias are linear in the class embedding (BigGAN), starting at
    the identity (zero-initialised)."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Linear(embed_dim, channels)
        self.bias = nn.Linear(embed_dim, channels)
        for lin in (self.gain, self.bias):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
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
    """2x nearest upsample, then `convs` x (conv3x3 -> noise -> cond. BN -> GLU); `noise` False
    leaves the per-pixel noise out."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int, convs: int, size: tuple[int, int],
                 noise: bool = True):
        super().__init__()
        self.convs = nn.ModuleList()
        self.noises = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(convs):
            self.convs.append(nn.Conv2d(c_in if i == 0 else c_out, 2 * c_out, 3, padding=1, bias=False))
            if noise:
                self.noises.append(NoiseInjection(size))
            self.norms.append(ConditionalBatchNorm(2 * c_out, embed_dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = conv(x)
            if self.noises:
                x = self.noises[i](x)
            x = F.glu(norm(x, e), dim=1)
        return x


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
                 max_channels: int = 256, min_channels: int = 16, cond_from: int = 0,
                 channels: list[int] | None = None, convs: list[int] | None = None, grown: bool = False,
                 grow_octaves: int = 0, layouts: int = 0, layout_dim: int = 32, layout_level: int = 1,
                 noise: bool = True, layout_lock: bool = False, z_skip: bool = False):
        super().__init__()
        self.z_dim = z_dim
        # `z_skip`: every conditional BatchNorm also sees z beside the city (BigGAN's skip-z), so the
        # latent reaches each level directly instead of only through the base map
        self.z_skip = bool(z_skip)
        cond_dim = embed_dim + (z_dim if z_skip else 0)
        # The first level (0 = the base map, k = after k upsampling blocks) the city reaches:
        # below it G is unconditional, so the house's layout comes from z alone and the city
        # styles it (the "weaker class signal early" ablation of docs/model.md). Levels below
        # see a zero embedding rather than losing their city weights, so every setting (and every
        # run written before the option) has one layout of weights and one exported graph.
        self.cond_from = cond_from
        self.num_classes = num_classes
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
        self.fc_norm = ConditionalBatchNorm(2 * ch[0], cond_dim)
        self.fc_norm_channels = 2 * ch[0]
        self.blocks = nn.ModuleList(
            UpBlock(ch[i], ch[i + 1], cond_dim, convs=convs[i],
                    size=(self.base[0] * 2 ** (i + 1), self.base[1] * 2 ** (i + 1)), noise=noise)
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
        # `layout_lock`: G's residual on the layout loses its own layout (its average at the layout's
        # size, enlarged smoothly again), so G paints only what is finer than the layout and cannot
        # swap the drawn layout for a house of its own; without it, G at 96x128 strayed from its
        # layouts as far as from a random one (docs/experiments.md)
        self.layout_lock = bool(layout_lock and layouts)
        # A grown G keeps its smaller run's to_rgb one level down and fades from its (nearest-
        # upsampled) image to the new top block's: `fade` 0 -> 1 over training, a buffer so every
        # loader and export samples at the strength the checkpoint trained at (progressive GANs).
        self.to_rgb_prev = nn.Conv2d(ch[-2], 3, 3, padding=1) if grown else None
        if grown:
            self.register_buffer("fade", torch.ones(()))

    def forward(self, z: torch.Tensor, labels: torch.Tensor, layouts: torch.Tensor | None = None) -> torch.Tensor:
        """`layouts`: N x 3 x h x w layouts to draw on (training passes the ones its loss checks);
        None draws them from the LayoutPrior by (z, city), so a sample depends only on (z, city)."""
        e = self.embed(labels)
        none = torch.zeros_like(e)
        e0 = e if self.cond_from <= 0 else none
        # the channel count spelled out (not -1): an exported graph (ONNX) must know BatchNorm's width
        x = self.fc(torch.cat([z, e0], dim=1)).view(z.size(0), self.fc_norm_channels, *self.base)
        if self.z_skip:   # what each conditional BatchNorm reads: the city (or none), and z
            e, none = (torch.cat([c, z.to(c.dtype)], dim=1) for c in (e, none))
            e0 = e if self.cond_from <= 0 else none
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
            if self.layout_lock:
                rgb = rgb - _resize(_resize(rgb, layout.shape[-2:]), rgb.shape[-2:])
            up = up.clamp(-0.98, 0.98)
            rgb = rgb + 0.5 * torch.log((1.0 + up) / (1.0 - up))
        if self.to_rgb_prev is not None:
            prev = F.interpolate(self.to_rgb_prev(feats[-2]), scale_factor=2.0, mode="nearest")
            rgb = torch.lerp(prev, rgb, self.fade.to(rgb.dtype))
        return torch.tanh(rgb)
