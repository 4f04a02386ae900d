"""The one exception type users see as a one-line message instead of a traceback, and the
faults from below (a full disk, a damaged catalog) translated into it."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class NeighbourhoodsError(Exception):
    """A problem with the user's input or workspace; the CLI prints it as `error: <message>`."""


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT however it arrives: OSError, SQLite's 'database or disk is full', or a
    library's own error carrying the OS message (safetensors)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    return "no space left on device" in text or "disk is full" in text or "disk quota exceeded" in text


def disk_full_error(where: str | Path | None, what: str = "") -> NeighbourhoodsError:
    """`where`: a path on the full device (its free space is said), or None where it is unknown."""
    free = _free_mb(where) if where is not None else None
    place = f"the device of {where}" if where is not None else "the device"
    return NeighbourhoodsError(
        f"no space left on {place}{' while writing ' + what if what else ''}"
        f"{f' ({free:.0f} MB free)' if free is not None else ''}: free some space and run the same command "
        "again (nothing finished is lost)")


def check_free_space(folder: str | Path, needed_bytes: int, what: str) -> None:
    """Refuse a large write that cannot fit, before starting it."""
    free = _free_mb(folder)
    if free is not None and free * 2**20 < needed_bytes:
        raise NeighbourhoodsError(
            f"not enough space for {what} in {folder}: {needed_bytes / 2**20:.0f} MB needed, {free:.0f} MB free; "
            "free some space and run the same command again (nothing finished is lost)")


def _free_mb(where: str | Path) -> float | None:
    path = Path(where)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free / 2**20
    except OSError:
        return None
