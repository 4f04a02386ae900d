"""`neighbourhoods sign`: the canonical, signed URL of a thumbnail, for the website's backend.

The rules (one spelling per image, HMAC-SHA256 over it with the key in NEIGHBOURHOODS_URL_KEY)
are core/urls.py, which a backend can import on its own (standard library only); this verb
prints what it gives, so a shell script or another language can check its own signing.
"""

from __future__ import annotations

from neighbourhoods.core.urls import signed_url


def sign(city: str, seed: int, size: str = "256x192", format: str = "jpg", fallback: str | None = None,
         base: str = "") -> str:
    """The signed URL (key from NEIGHBOURHOODS_URL_KEY; NeighbourhoodsError without one)."""
    return signed_url(city, seed, size=size, format=format, fallback=fallback, base=base)
