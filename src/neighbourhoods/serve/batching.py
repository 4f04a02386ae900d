"""What stands between requests and the generator: byte-bounded LRU caches and the micro-batcher.

`Thumbnails` puts them together: a request's thumbnail comes from the cache of encoded bytes,
else from the cache of raw samples, else from a batched generator call; it is the server's only
stateful part, usable without HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from neighbourhoods.core.cities import CityMatch
from neighbourhoods.serve.config import ServeConfig
from neighbourhoods.thumbnails.distinct import Ledgers
from neighbourhoods.thumbnails.guard import Guard, NoNovelSample, render_listings
from neighbourhoods.thumbnails.postprocess import PIPELINE_VERSION, thumbnail
from neighbourhoods.thumbnails.source import Source


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
        self.ledgers = Ledgers()   # each city's listings so far, per block of seeds (thumbnails/distinct.py)
        self.batcher = MicroBatcher(self._render, self.config.max_batch, self.config.max_wait_ms / 1000,
                                    self.config.max_queue, workers=self.config.generator_workers or 1)
        self._encoder = ThreadPoolExecutor(max_workers=max(1, self.config.encode_threads),
                                           thread_name_prefix="encode")
        self.model_tag = hashlib.sha256(
            f"{source.fingerprint}|{upscaler.fingerprint}|{PIPELINE_VERSION}|"
            f"{guard.tag if guard else 'noguard'}".encode()
        ).hexdigest()[:16]

    def _render(self, keys: list[tuple]) -> list:
        """Batched generator call (worker thread): keys (city, class, draws_from, fallback, seed) ->
        Samples or exceptions, city by city (render_listings: a listing is distinct from the seeds
        before it in its block, whatever else was asked for)."""
        out: list = [None] * len(keys)
        by_city: dict[tuple, list[int]] = {}
        for i, key in enumerate(keys):
            by_city.setdefault(key[:4], []).append(i)
        for city, rows in by_city.items():
            match = CityMatch(*city)
            try:
                for i, sample in zip(rows, render_listings(self.source, match, [keys[i][4] for i in rows],
                                                           self.guard, self.ledgers)):
                    out[i] = sample
            except NoNovelSample:
                # one memorised seed must not fail its batch-mates: retry each alone
                for i in rows:
                    try:
                        out[i] = render_listings(self.source, match, [keys[i][4]], self.guard, self.ledgers)[0]
                    except NoNovelSample as e:
                        out[i] = e
        return out

    def etag(self, class_index: int, seed: int, size: tuple[int, int], fmt: str) -> str:
        """Strong ETag from everything that determines the bytes (so a 304 needs no rendering)."""
        key = f"{self.model_tag}|{class_index}|{seed}|{size[0]}x{size[1]}|{fmt}"
        return '"' + hashlib.sha256(key.encode()).hexdigest()[:32] + '"'

    async def sample(self, match: CityMatch, seed: int):
        """The sample of (city, listing seed) as served (the class and seed it is drawn with: match)."""
        key = (match.city, match.class_index, match.draws_from, match.fallback, int(seed))
        s = self.samples.get(key)
        if s is None:
            s = await self.batcher.submit(key)
            self.samples.put(key, s)
        return s

    async def render(self, match: CityMatch, seed: int, size: tuple[int, int], fmt: str) -> bytes:
        key = (match.city, match.class_index, int(seed), tuple(size), fmt)
        data = self.cache.get(key)
        if data is not None:
            return data
        s = await self.sample(match, seed)
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self._encoder, thumbnail, s.image, size, fmt, self.upscaler)
        self.cache.put(key, data)
        return data

    def stats(self) -> dict:
        return {"cache": self.cache.stats(), "sample_cache": self.samples.stats(),
                "queued": self.batcher.queued(), "generator_workers": self.batcher.workers,
                "batches": self.batcher.batches,
                "samples_generated": self.batcher.samples}
