"""The latent of a seed: the same numbers with or without torch, on every platform.

Row i of latents(seeds, d) is standard-normal noise from NumPy's legacy Mersenne Twister seeded
with the seed's two 32-bit halves (RandomState's stream is frozen by NumPy's compatibility
policy, so a seed names the same house for good), in float64, rounded to float32. It needs no
torch, so an ONNX replica draws exactly what the training stack draws. (It replaced
torch.Generator().manual_seed(seed), which keeps only the low 32 bits of a seed: seeds 5 and
5 + 2^32 drew the same house.)
"""

from __future__ import annotations

import numpy as np

MAX_SEED = 2**63 - 1    # seeds are non-negative 63-bit integers (URLs, the guard's retries, latents)


def latents(seeds, z_dim: int) -> np.ndarray:
    """float32 N x z_dim; row i depends only on seeds[i]."""
    out = np.empty((len(seeds), z_dim), dtype=np.float32)
    for i, seed in enumerate(seeds):
        seed = int(seed)
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed {seed} outside 0..{MAX_SEED}")
        rng = np.random.RandomState(np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32))
        out[i] = rng.standard_normal(z_dim)
    return out
