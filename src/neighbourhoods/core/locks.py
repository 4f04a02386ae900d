"""Who may write a workspace now: the OS's advisory locks (flock), never a lock-file protocol.

- Commands that rewrite what others read (ingest, cluster, select, upscale) hold the workspace
  lock WS/.lock exclusively.
- A training run holds it shared (so ingest cannot rewrite the arrays it memory-maps, while
  several runs may train side by side) and its own run folder's RUN/.lock exclusively (one
  writer per run).
- Readers (generate, serve, evaluate, report) take nothing: they work on read-only copies too.

The kernel drops a lock when its holder exits, kill -9 included, so nothing is ever stale. A
holder writes who it is (PID, command, since when) into its lock file, for the refusal message.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

from neighbourhoods.core.errors import NeighbourhoodsError

LOCK_FILE = ".lock"


class WorkspaceBusy(NeighbourhoodsError):
    """Another process holds a lock this command needs."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"PID {info['pid']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _held(path: Path) -> bool:
    """Whether some process holds `path` locked (probed with a non-blocking shared lock)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _training_holders(ws_root: Path) -> list[str]:
    return [f"{_holder(p)} training run {p.parent.name!r}" for p in sorted((ws_root / "runs").glob(f"*/{LOCK_FILE}"))
            if _held(p)]


@contextlib.contextmanager
def hold(path: Path, command: str, exclusive: bool = True, busy: str = "") -> Iterator[None]:
    """Hold the flock on `path` (created if needed) for the block, or raise WorkspaceBusy."""
    import fcntl

    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        # a refused exclusive lock may be held shared by training runs (their notes are in their runs)
        trains = _training_holders(path.parent) if exclusive and path.name == LOCK_FILE else []
        who = "; ".join(trains) or _holder(path)
        raise WorkspaceBusy(f"{busy or path.parent} is in use by {who}: wait for it to finish, or stop it "
                            "(a killed process releases it at once)") from None
    try:
        if exclusive:   # say who holds it (shared holders leave the file to the exclusive one's last note)
            note = json.dumps({"pid": os.getpid(), "command": command,
                               "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
            os.ftruncate(fd, 0)
            os.pwrite(fd, note.encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def writing_workspace(ws_root: Path, command: str) -> Iterator[None]:
    """The exclusive workspace lock of a command that rewrites what others read."""
    with hold(Path(ws_root) / LOCK_FILE, command, exclusive=True, busy=f"workspace {ws_root}"):
        yield


@contextlib.contextmanager
def training_run(ws_root: Path, run_dir: Path, command: str = "train") -> Iterator[None]:
    """A training run's locks: the workspace shared, its run folder exclusive."""
    with hold(Path(ws_root) / LOCK_FILE, command, exclusive=False,
              busy=f"workspace {ws_root} (its photos are being rewritten)"):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with hold(Path(run_dir) / LOCK_FILE, command, exclusive=True, busy=f"run {Path(run_dir).name!r}"):
            yield
