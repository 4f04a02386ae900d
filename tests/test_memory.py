"""Memory that must not grow with the number of photos: a pass over a memory-mapped prepared
array releases its pages, and the prepared arrays are written without mapping them."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from neighbourhoods.core.prepared import release_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _pass(images, release: bool) -> float:
    before = rss_mb()
    total = 0
    for i in range(len(images)):
        total += int(images[i][0, 0, 0])
        if release and i % 256 == 255:
            release_pages(images)
    return rss_mb() - before


def test_a_pass_over_a_mapped_array_does_not_stay_resident(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.ones((2048, 96, 128, 3), np.uint8))               # 75 MB
    grown_without = _pass(np.load(path, mmap_mode="r"), release=False)
    grown_with = _pass(np.load(path, mmap_mode="r"), release=True)
    assert grown_without > 50                                          # the pages a plain pass leaves resident
    assert grown_with < 16


def test_release_is_a_no_op_for_arrays_in_memory():
    release_pages(np.zeros((4, 2, 2, 3), np.uint8))
