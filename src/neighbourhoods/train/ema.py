"""G_ema: the moving average of G's weights that samples and gets served.

Half-life `ema_kimg` thousand images, capped early by EMA_RAMPUP x images seen, as
StyleGAN2-ADA does; BatchNorm statistics are copied from G at each step and re-estimated for
G_ema's own weights before it is saved or sampled (`standing_bn_stats`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from neighbourhoods.train.config import EMA_RAMPUP


def ema_beta(config, images_seen: int) -> float:
    """Per-step decay: half-life ema_kimg, capped at EMA_RAMPUP x images seen (StyleGAN2-ADA)."""
    ema_nimg = min(config.ema_kimg * 1000, images_seen * EMA_RAMPUP)
    return 0.5 ** (config.batch / max(ema_nimg, 1e-8))


@torch.no_grad()
def update_ema(G_ema: nn.Module, G: nn.Module, beta: float) -> None:
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):   # BatchNorm statistics: copied, as StyleGAN does
        b_ema.copy_(b)


@torch.no_grad()
def standing_bn_stats(G_ema: nn.Module, class_weights: np.ndarray, images: int, batch: int, seed: int) -> None:
    """Re-estimate G_ema's BatchNorm running statistics for G_ema's own weights.

    G_ema is an average of G's weights, but G's running statistics belong to G's weights of the
    last few steps; sampling in eval mode with them drifts from what the network does with
    batch statistics (the "standing statistics" of BigGAN). Averaging the batch statistics of
    `images` samples, drawn for the training classes' mix, makes eval-mode samples (which do
    not depend on the batch) match train-mode ones. Uses its own RNG: the run's streams are
    left untouched, so resume stays exact.
    """
    norms = [m for m in G_ema.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or images <= 0:
        return
    device = next(G_ema.parameters()).device
    g = torch.Generator().manual_seed(seed)
    probs = torch.as_tensor(class_weights, dtype=torch.float64)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None   # cumulative average over the batches below
    G_ema.train()
    # train mode draws fresh per-pixel noise from the global RNG (projected.NoiseInjection): fork
    # it, seeded, so a snapshot at any moment (Ctrl-C, a time budget) leaves the run's streams
    # exactly where they were and the statistics depend on `seed` alone
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, images, batch):
                n = min(batch, images - start)
                z = torch.randn(n, G_ema.z_dim, generator=g).to(device)
                labels = torch.multinomial(probs, n, replacement=True, generator=g).to(device)
                G_ema(z, labels)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        G_ema.eval()
