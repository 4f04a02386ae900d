"""`neighbourhoods serve`: HTTP thumbnails for the website: FastAPI app, micro-batched generator, byte-bounded LRU cache.

    GET /cities                       every city of the run's data and the class it is drawn from
    GET /thumbnail?city=&seed=&size=WxH&format=jpg|png|webp[&fallback=any]
                                      same request -> same bytes; strong ETag, immutable caching
    GET /healthz                      liveness plus model, cache and queue figures
    GET /                             a gallery page to browse cities and samples

Bounded by design: at most `generator_workers` generator calls at a time (concurrent requests
are batched into them, at most `max_batch` each, waiting at most `max_wait_ms` for company), a bounded queue (503 with
Retry-After beyond it), thumbnails in an LRU cache bounded in bytes, sizes capped per side,
torch threads capped. Unknown city -> 404 with close matches; bad parameters -> 422.

Here the verb (load, then run uvicorn); config.py the options, batching.py the caches, the
micro-batcher and the renderer around them, app.py the routes, gallery.html the page,
header_deadline.py the patch on uvicorn that closes slow clients.
"""

from __future__ import annotations

from dataclasses import replace

from neighbourhoods.serve.app import create_app
from neighbourhoods.serve.batching import ByteLRU, MicroBatcher, Overloaded, Thumbnails  # noqa: F401 (the API)
from neighbourhoods.serve.config import ServeConfig
from neighbourhoods.serve.header_deadline import header_timed_protocol
from neighbourhoods.thumbnails.pipeline import is_replica, load_pipeline


def build(workspace, run: str, config: ServeConfig | None = None, upscale: str | None = None,
          novelty: bool = True, guard_device: str = "cpu", snapshot: str = "best",
          realism_quantile: float | None = None) -> Thumbnails:
    """Load the generator (safetensors via runs.load_generator, or an exported .pt2), guard and upscaler."""
    config = config or ServeConfig()
    if config.generator_workers is None:
        # measured on 2 cores (docs/serve.md): torch's generator is the slow part, and a second
        # worker gives it the second core (1.3x); onnxruntime's is fast enough that one worker
        # plus the encoders fill both cores, and a second one only adds contention (0.9x)
        config = replace(config, generator_workers=1 if is_replica(run) else 2)
    if not is_replica(run):          # a replica runs onnxruntime, and must not even import torch
        import torch
        torch.set_num_threads(max(1, config.torch_threads))
    source, guard, upscaler = load_pipeline(workspace, run, upscale, novelty, guard_device, snapshot=snapshot,
                                            realism_quantile=realism_quantile)
    return Thumbnails(source, upscaler, guard, config)


def serve_command(workspace, run: str) -> str:
    """The shell command that serves a run (demo prints it)."""
    import shlex
    return f"neighbourhoods serve --workspace {shlex.quote(str(workspace))} --run {shlex.quote(str(run))}"


def serve(workspace, run: str, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          upscale: str | None = None, novelty: bool = True, log_level: str = "info", guard_device: str = "cpu",
          snapshot: str = "best", realism_quantile: float | None = None) -> None:
    """Run the HTTP server until interrupted."""
    import uvicorn

    thumbs = build(workspace, run, config, upscale=upscale, novelty=novelty, guard_device=guard_device,
                   snapshot=snapshot, realism_quantile=realism_quantile)
    app = create_app(thumbs)
    guard = thumbs.guard.label if thumbs.guard is not None else "novelty guard off"
    guard += "; signed URLs only" if thumbs.config.url_key is not None else ""
    snap = f" ({thumbs.source.snapshot} snapshot, {thumbs.source.images_seen:,} images)" if thumbs.source.snapshot else ""
    print(f"serving {len(thumbs.source.class_names)} cities from {thumbs.source.label}{snap} "
          f"(upscale {thumbs.upscaler.name}; {guard}) on http://{host}:{port}/ "
          f"(gallery), /thumbnail, /cities, /healthz", flush=True)
    # idle keep-alive connections close after keep_alive_s; beyond max_connections open ones, new
    # requests get a 503 at once instead of queueing without bound (slow or idle clients)
    cfg = thumbs.config
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                http=header_timed_protocol(cfg.header_timeout_s), timeout_keep_alive=cfg.keep_alive_s,
                limit_concurrency=cfg.max_connections, h11_max_incomplete_event_size=16 * 1024)
