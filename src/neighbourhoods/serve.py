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
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from neighbourhoods.core import urls
from neighbourhoods.core.cities import ANY_CITY, UnknownCity
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import MAX_THUMB_SIDE, ThumbSize
from neighbourhoods.thumbnails.guard import MAX_SEED, Guard, NoNovelSample, render_samples
from neighbourhoods.thumbnails.pipeline import is_replica, load_pipeline
from neighbourhoods.thumbnails.postprocess import FORMATS, PIPELINE_VERSION, media_type, parse_format, thumbnail
from neighbourhoods.thumbnails.source import Source

log = logging.getLogger("neighbourhoods.serve")


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


class ByteLRU:
    """An LRU map bounded by the total size of its values in bytes (thread-safe)."""

    def __init__(self, max_bytes: int, size_of: Callable = len):
        self.max_bytes, self.size_of = int(max_bytes), size_of
        self._items: OrderedDict = OrderedDict()
        self.bytes = self.hits = self.misses = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key, value) -> None:
        size = self.size_of(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= self.size_of(old)
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= self.size_of(evicted)

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict:
        return {"items": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}


class Overloaded(Exception):
    pass


class MicroBatcher:
    """Collects (class, seed) keys from concurrent requests into at most `workers` generator calls at once.

    Each of `workers` worker tasks per event loop takes the first waiting key, then whatever else
    arrives within max_wait (or is already queued, e.g. while a batch ran), up to max_batch keys,
    and runs `fn(keys)` in its own background thread. One thread's generator call uses one core;
    how many pay depends on how slow the generator is beside the encoders (build() picks: 2 for
    torch, 1 for onnxruntime). `fn` must be thread-safe (eager inference and onnxruntime
    sessions are); a request's bytes never depend on its batch.
    """

    def __init__(self, fn: Callable[[list], list], max_batch: int, max_wait_s: float, max_queue: int,
                 workers: int = 1):
        self.fn, self.max_batch, self.max_wait_s, self.max_queue = fn, max_batch, max_wait_s, max_queue
        self.workers = max(1, workers)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="generator")
        self._loop = None
        self._queue: asyncio.Queue | None = None
        self._inflight: dict = {}
        self._tasks: list[asyncio.Task] = []
        self.batches = self.samples = 0

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._queue, self._inflight = loop, asyncio.Queue(), {}
            # keep references: tasks are weakly held
            self._tasks = [loop.create_task(self._worker()) for _ in range(self.workers)]

    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, key):
        self._start()
        fut = self._inflight.get(key)
        if fut is None:  # identical concurrent requests share one sample
            if self._queue.qsize() >= self.max_queue:
                raise Overloaded()
            fut = self._loop.create_future()
            self._inflight[key] = fut
            self._queue.put_nowait((key, fut))
        return await asyncio.shield(fut)

    async def _worker(self) -> None:
        loop, queue = self._loop, self._queue
        while True:
            batch = [await queue.get()]
            # a lone request waits a moment for company (no wait_for: it can drop a got item)
            if queue.qsize() < self.max_batch - 1 and self.max_wait_s > 0:
                await asyncio.sleep(self.max_wait_s)
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            keys = [k for k, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self.fn, keys)
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                results = [e] * len(keys)
            self.batches += 1
            self.samples += len(keys)
            for (key, fut), result in zip(batch, results):
                self._inflight.pop(key, None)
                if fut.done():
                    continue
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)


class Thumbnails:
    """Renders and caches thumbnails; the app's only stateful part (usable without HTTP)."""

    def __init__(self, source: Source, upscaler, guard: Guard | None = None, config: ServeConfig | None = None):
        self.source, self.upscaler, self.guard = source, upscaler, guard
        self.config = config or ServeConfig()
        if "torch" in sys.modules:   # an eager source: cap its threads (a replica never imports torch)
            sys.modules["torch"].set_num_threads(max(1, self.config.torch_threads))
        self.cache = ByteLRU(int(self.config.cache_mb * 2**20))
        self.samples = ByteLRU(int(self.config.sample_cache_mb * 2**20), size_of=lambda s: s.image.nbytes)
        self.batcher = MicroBatcher(self._render, self.config.max_batch, self.config.max_wait_ms / 1000,
                                    self.config.max_queue, workers=self.config.generator_workers or 1)
        self._encoder = ThreadPoolExecutor(max_workers=max(1, self.config.encode_threads),
                                           thread_name_prefix="encode")
        self.model_tag = hashlib.sha256(
            f"{source.fingerprint}|{upscaler.fingerprint}|{PIPELINE_VERSION}|"
            f"{'guard:%r:%d' % (guard.threshold, guard.max_attempts) if guard else 'noguard'}".encode()
        ).hexdigest()[:16]

    def _render(self, keys: list[tuple[int, int]]) -> list:
        """Batched generator call (worker thread): keys (class, seed) -> Samples or exceptions."""
        try:
            return render_samples(self.source, [c for c, _ in keys], [s for _, s in keys], self.guard)
        except NoNovelSample:
            # one memorised seed must not fail its batch-mates: retry each alone
            out = []
            for k in keys:
                try:
                    out.append(render_samples(self.source, [k[0]], [k[1]], self.guard)[0])
                except NoNovelSample as e:
                    out.append(e)
            return out

    def etag(self, class_index: int, seed: int, size: tuple[int, int], fmt: str) -> str:
        """Strong ETag from everything that determines the bytes (so a 304 needs no rendering)."""
        key = f"{self.model_tag}|{class_index}|{seed}|{size[0]}x{size[1]}|{fmt}"
        return '"' + hashlib.sha256(key.encode()).hexdigest()[:32] + '"'

    async def sample(self, class_index: int, seed: int):
        key = (class_index, seed)
        s = self.samples.get(key)
        if s is None:
            s = await self.batcher.submit(key)
            self.samples.put(key, s)
        return s

    async def render(self, class_index: int, seed: int, size: tuple[int, int], fmt: str) -> bytes:
        key = (class_index, seed, size, fmt)
        data = self.cache.get(key)
        if data is not None:
            return data
        s = await self.sample(class_index, seed)
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self._encoder, thumbnail, s.image, size, fmt, self.upscaler)
        self.cache.put(key, data)
        return data

    def stats(self) -> dict:
        return {"cache": self.cache.stats(), "sample_cache": self.samples.stats(),
                "queued": self.batcher.queued(), "generator_workers": self.batcher.workers,
                "batches": self.batcher.batches,
                "samples_generated": self.batcher.samples}


def memory() -> dict:
    """The server's resident memory now and at its peak, MB (Linux /proc; {} elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        return {"rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
                "peak_rss_mb": round(int(fields["VmHWM"].split()[0]) / 1024, 1)}
    except (OSError, KeyError, ValueError):
        return {}


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    for part in header.split(","):
        tag = part.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


CACHE_CONTROL = "public, max-age=31536000, immutable"


def create_app(thumbs: Thumbnails):
    """The FastAPI app around a Thumbnails renderer."""
    app = FastAPI(title="neighbourhoods thumbnails", docs_url="/docs", redoc_url=None)
    cfg = thumbs.config
    source = thumbs.source

    def error(status: int, detail: str, **extra) -> JSONResponse:
        return JSONResponse({"detail": detail, **extra}, status_code=status,
                            headers={"Cache-Control": "no-store"})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "query")
            problems.append(f"{loc}: {e.get('msg', 'invalid')}")
        return error(422, "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # pragma: no cover - last line of defence
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return error(503, "could not render this request; try again", error=type(exc).__name__)

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz():
        return {"status": "ok", "model": source.label, "images_seen": source.images_seen,
                "generator_res": list(source.res), "cities": len(source.class_names),
                "upscale": thumbs.upscaler.name, "novelty_guard": thumbs.guard is not None,
                "signed_urls": cfg.url_key is not None, **memory(), **thumbs.stats()}

    @app.get("/cities")
    async def cities():
        # every city of the run's data, by its own name, with the class it is drawn from
        draws = source.city_map.draws_from
        return {"cities": [{"name": n, "index": source.class_names.index(draws[n]), "draws_from": draws[n],
                            "own_class": draws[n] == n} for n in source.city_map.cities],
                "classes": list(source.class_names), "fallbacks": ["any"] if ANY_CITY in source.class_names else [],
                "default_size": cfg.default_size, "max_side": cfg.max_side, "formats": list(FORMATS)}

    @app.api_route("/thumbnail", methods=["GET", "HEAD"])
    async def thumbnail(request: Request,
                        # declared for the API docs; the query is parsed strictly below (core/urls.py)
                        city: str = Query(..., max_length=300, description="city name, as /cities lists it"),
                        seed: str = Query(..., max_length=20, description="a non-negative integer, plain digits"),
                        size: str = Query(None, max_length=20, description="WxH, e.g. 256x192"),
                        format: str = Query("jpg", max_length=10, description="jpg, png or webp"),
                        fallback: str = Query(None, max_length=10,
                                              description="any: draw a city the data never had from (any city)"),
                        sig: str = Query(None, max_length=100, description="signature (when the server signs)")):
        try:
            params, sig = urls.parse_query(request.query_params.multi_items())
            seed_n = urls.parse_seed(params["seed"], cfg.max_seed)
            wh = ThumbSize.parse(urls.parse_size(params.get("size", cfg.default_size)), cfg.max_side)
            fmt = parse_format(params.get("format", "jpg"))
            match = source.resolve(params["city"], params.get("fallback"))
        except UnknownCity as e:
            return error(404, str(e), close_matches=e.matches)
        except NeighbourhoodsError as e:
            return error(422, str(e))
        canonical = urls.canonical_path(urls.Thumb(match.city, seed_n, wh.name, fmt, params.get("fallback")))
        if cfg.url_key is not None:
            if not urls.verify(canonical, sig, cfg.url_key):
                return error(403, "missing or wrong signature: sign the canonical URL (neighbourhoods sign)")
            canonical += f"&{urls.SIGNATURE}={sig}"
        if request.url.path + "?" + request.url.query != canonical:
            # the same image in another spelling: one URL per image, so CDNs cache it once
            return Response(status_code=308, headers={"Location": canonical, "Cache-Control": CACHE_CONTROL})
        seed = seed_n
        # a city drawn from a shared class samples seeds of its own: no two cities share a house
        ci, seed = match.class_index, match.seed(seed)
        etag = thumbs.etag(ci, seed, wh, fmt)
        headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL,
                   "X-City-Drawn-From": quote(match.draws_from)}   # percent-encoded: headers are latin-1
        if match.fallback:
            headers["X-City-Fallback"] = "any"
        if _etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        try:
            data = await thumbs.render(ci, seed, wh, fmt)
        except Overloaded:
            return JSONResponse({"detail": "busy: too many thumbnails queued; retry shortly"}, status_code=503,
                                headers={"Retry-After": "1", "Cache-Control": "no-store"})
        except NoNovelSample as e:
            return error(503, str(e))
        return Response(content=data, media_type=media_type(fmt), headers=headers)

    @app.get("/", response_class=HTMLResponse)
    async def gallery():
        return HTMLResponse(GALLERY_HTML, headers={"Cache-Control": "no-cache",
                                                   "Content-Security-Policy": CSP})

    return app


CSP = ("default-src 'none'; img-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")

GALLERY_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>neighbourhoods: generated thumbnails</title>
<style>
 body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; }
 header { display: flex; flex-wrap: wrap; gap: .75rem; align-items: center; margin-bottom: 1rem; }
 h1 { font-size: 1.2rem; margin: 0 1rem 0 0; }
 select, button, input { font: inherit; padding: .25rem .5rem; }
 #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: .6rem; }
 figure { margin: 0; }
 figure img { width: 100%; height: auto; aspect-ratio: 4 / 3; object-fit: cover; background: #eee; display: block; }
 figcaption { font-size: .8rem; color: #666; }
 #status { color: #a00; }
</style></head>
<body>
<header>
 <h1>Never-existing houses</h1>
 <label>City <select id="city"></select></label>
 <label>Size <select id="size"><option>256x192</option><option>320x240</option><option>512x384</option><option>128x96</option></select></label>
 <label>Format <select id="format"><option>jpg</option><option>webp</option><option>png</option></select></label>
 <button id="prev">&larr; Previous</button><button id="next">Next &rarr;</button>
 <span id="page"></span><span id="status" role="status"></span>
</header>
<main id="grid" aria-live="polite"></main>
<script>
"use strict";
const PER_PAGE = 12;
const state = { page: 0 };
const $ = (id) => document.getElementById(id);
function render() {
  const city = $("city").value, size = $("size").value, format = $("format").value;
  const grid = $("grid");
  grid.replaceChildren();
  $("page").textContent = "seeds " + state.page * PER_PAGE + "-" + ((state.page + 1) * PER_PAGE - 1);
  for (let k = 0; k < PER_PAGE; k++) {
    const seed = state.page * PER_PAGE + k;
    // the canonical spelling (core/urls.py): %20 for spaces, parameters in this order
    const q = [["city", city], ["seed", String(seed)], ["size", size], ["format", format]]
      .map(([k, v]) => k + "=" + encodeURIComponent(v).replace(/[!'()*]/g, c => "%" + c.charCodeAt(0).toString(16).toUpperCase()))
      .join("&");
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "/thumbnail?" + q;
    img.alt = city + ", seed " + seed;
    img.dataset.seed = String(seed);
    img.addEventListener("error", () => { $("status").textContent = "some thumbnails failed to load"; });
    const cap = document.createElement("figcaption");
    cap.textContent = city + " \u00b7 seed " + seed;
    fig.append(img, cap);
    grid.append(fig);
  }
  const params = new URLSearchParams({ city, page: String(state.page), size, format });
  history.replaceState(null, "", "?" + params.toString());
}
async function init() {
  const here = new URLSearchParams(location.search);
  let data;
  try {
    const r = await fetch("/cities");
    data = await r.json();
  } catch (e) { $("status").textContent = "could not load cities"; return; }
  const sel = $("city");
  for (const c of data.cities) {
    const o = document.createElement("option");
    o.value = c.name; o.textContent = c.name; sel.append(o);
  }
  if (here.get("city") && data.cities.some((c) => c.name === here.get("city"))) sel.value = here.get("city");
  for (const id of ["size", "format"]) {
    const v = here.get(id);
    if (v && [...$(id).options].some((o) => o.value === v)) $(id).value = v;
  }
  state.page = Math.max(0, parseInt(here.get("page") || "0", 10) || 0);
  for (const id of ["city", "size", "format"]) $(id).addEventListener("change", () => { state.page = 0; render(); });
  $("next").addEventListener("click", () => { state.page += 1; render(); });
  $("prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); render(); });
  render();
}
init();
</script>
</body></html>
"""


def build(workspace, run: str, config: ServeConfig | None = None, upscale: str | None = None,
          novelty: bool = True, guard_device: str = "cpu") -> Thumbnails:
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
    source, guard, upscaler = load_pipeline(workspace, run, upscale, novelty, guard_device)
    return Thumbnails(source, upscaler, guard, config)


def serve_command(workspace, run: str) -> str:
    """The shell command that serves a run (demo prints it)."""
    import shlex
    return f"neighbourhoods serve --workspace {shlex.quote(str(workspace))} --run {shlex.quote(str(run))}"


def serve(workspace, run: str, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          upscale: str | None = None, novelty: bool = True, log_level: str = "info", guard_device: str = "cpu") -> None:
    """Run the HTTP server until interrupted."""
    import uvicorn

    thumbs = build(workspace, run, config, upscale=upscale, novelty=novelty, guard_device=guard_device)
    app = create_app(thumbs)
    guard = thumbs.guard.label if thumbs.guard is not None else "novelty guard off"
    guard += "; signed URLs only" if thumbs.config.url_key is not None else ""
    print(f"serving {len(thumbs.source.class_names)} cities from {thumbs.source.label} "
          f"(upscale {thumbs.upscaler.name}; {guard}) on http://{host}:{port}/ "
          f"(gallery), /thumbnail, /cities, /healthz", flush=True)
    # idle keep-alive connections close after keep_alive_s; beyond max_connections open ones, new
    # requests get a 503 at once instead of queueing without bound (slow or idle clients)
    cfg = thumbs.config
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                http=header_timed_protocol(cfg.header_timeout_s), timeout_keep_alive=cfg.keep_alive_s,
                limit_concurrency=cfg.max_connections, h11_max_incomplete_event_size=16 * 1024)


def header_timed_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a deadline for the request head.

    uvicorn times out idle keep-alive connections only after a response; a client that opens a
    connection and sends its headers a byte at a time (slowloris) holds it for ever. This closes
    any connection that has not completed a request head within `timeout_s` of opening or of
    its last response. (It relies on uvicorn's H11Protocol keeping the current request as
    `self.cycle`, as it has since 0.13; tests/test_serve_http.py checks it against the installed one.)
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimedH11(H11Protocol):
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:    # a whole request head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimedH11
