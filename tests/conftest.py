"""Shared fixtures. Real photos live in ../shared/data beside the checkout and are never committed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NEIGHBOURHOODS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real listing photos), or skip with a clear message where it is absent."""
    if not (SHARED_DATA / "houses").is_dir() or not (SHARED_DATA / "socal").is_dir():
        pytest.skip(f"real photos not found at {SHARED_DATA} (set NEIGHBOURHOODS_SHARED_DATA); "
                    "skipping end-to-end test on real data")
    return SHARED_DATA
