"""Decoding pending photos in worker processes, committed in small batches as they come back.

A Ctrl-C stops the pool from the main process alone (workers ignore SIGINT), and a kill loses at
most the last batch: whatever `store` committed stays done.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time

from tqdm import tqdm

from neighbourhoods.ingest.decode import DecodeSettings, decode_one

COMMIT_EVERY_S = 1.0     # a kill loses at most about this much decoding work
COMMIT_EVERY_N = 64
WINDOW_BYTES = 256 << 20  # decoded pixels in flight between workers and the catalog, at most


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the main process, which stops the pool: one message, no tracebacks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_pool(method: str, workers: int):
    """A worker pool whose start a Ctrl-C cannot slip through.

    A SIGINT that lands while the main thread forks is raised inside CPython's at-fork hooks,
    which print it and drop it ("Exception ignored in _releaseLock"): the run went on and exited 0.
    Blocking SIGINT in the main thread is not enough: the kernel hands a process-wide signal to
    any thread that does not block it (tqdm's monitor, say), and Python then runs the handler in
    the main thread wherever it is, fork hooks included. So while the workers fork, SIGINT's
    handler only records the signal; once the pool exists the run's own handler is put back and
    the signal raised again, to do what it would have done. (Workers ignore SIGINT anyway.)
    """
    ctx = multiprocessing.get_context(method)
    if threading.current_thread() is not threading.main_thread():   # only the main thread sets handlers
        return ctx.Pool(workers, initializer=_ignore_sigint)
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    pool = None
    try:
        pool = ctx.Pool(workers, initializer=_ignore_sigint)
    finally:   # (None: a handler set outside Python; Python's own is the nearest thing)
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if held:
        try:
            signal.raise_signal(signal.SIGINT)   # the Ctrl-C held meanwhile, to the run's own handler
        except BaseException:
            pool.terminate()
            raise
    return pool


def decode_pending(pending: list[tuple[int, str]], store, settings: DecodeSettings, workers: int, progress: bool,
                    desc: str = "decoding") -> int:
    """Decode `pending` (id, path) photos, handing results to `store` in small batches."""
    tasks = [(pid, path, settings) for pid, path in pending]
    if not tasks:
        return 0
    bar = tqdm(total=len(tasks), unit="photo", desc=desc, disable=not progress, smoothing=0.1)
    batch: list[dict] = []
    last = time.monotonic()

    def consume(results) -> None:
        nonlocal batch, last
        for r in results:
            batch.append(r)
            bar.update(1)
            if len(batch) >= COMMIT_EVERY_N or time.monotonic() - last > COMMIT_EVERY_S:
                store(batch)
                batch, last = [], time.monotonic()
        if batch:
            store(batch)
            batch = []

    try:
        if workers <= 1 or len(tasks) < 8:
            consume(map(decode_one, tasks))
        else:
            # Feed the pool a window at a time: finished pixels wait in memory only until the next
            # commit, however many photos there are and however far the workers run ahead.
            per_photo = sum(h * w * 3 for h, w in settings.res) + 4096
            window = max(workers * 16, min(4096, WINDOW_BYTES // per_photo))
            chunk = max(1, min(16, window // (workers * 8)))
            # fork: workers start in milliseconds with the modules already imported
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with start_pool(method, workers) as pool:
                for start in range(0, len(tasks), window):
                    consume(pool.imap_unordered(decode_one, tasks[start:start + window], chunksize=chunk))
    finally:
        bar.close()
    return len(tasks)
