"""The server's bounds and options, one place for the renderer, the app and the HTTP server."""

from __future__ import annotations

from dataclasses import dataclass

from neighbourhoods.core.resolution import MAX_THUMB_SIDE
from neighbourhoods.thumbnails.guard import MAX_SEED


@dataclass
class ServeConfig:
    max_side: int = MAX_THUMB_SIDE   # largest thumbnail side, px
    default_size: str = "256x192"    # thumbnail size when the request names none (WxH)
    max_batch: int = 16              # most samples in one generator call
    generator_workers: int | None = None   # generator calls at once, one thread each; None: 2 for torch, 1 for a replica
    max_wait_ms: float = 4.0         # how long a lone request waits for others to batch with
    max_queue: int = 512             # queued samples beyond which requests get 503 + Retry-After
    cache_mb: float = 256.0          # LRU cache of encoded thumbnails, in MiB
    sample_cache_mb: float = 64.0    # LRU cache of raw samples (generator resolution), in MiB
    torch_threads: int = 1           # torch intra-op threads for the generator (more spin-wait on a busy CPU; see docs/serve.md)
    encode_threads: int = 2          # threads that upscale and encode (PIL releases the GIL)
    url_key: bytes | None = None     # HMAC key: set, only signed URLs are served (core/urls.py)
    max_seed: int = MAX_SEED         # seeds above are a 422: bounds what one city can cost
    keep_alive_s: float = 5.0        # idle keep-alive connections closed after this
    header_timeout_s: float = 10.0   # a connection must send a whole request head within this (slowloris)
    max_connections: int = 256       # open connections beyond this get 503 at once
