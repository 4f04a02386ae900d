"""The thumbnail URL: one canonical spelling per image, and signatures over it.

A CDN caches by URL, so every image has exactly one:

    /thumbnail?city=San%20Diego%2C%20CA&seed=42&size=256x192&format=jpg[&fallback=any][&sig=...]

parameters in that order, all but `fallback` present, the city percent-encoded with nothing left
safe (RFC 3986 upper-case hex, space as %20), the seed in plain ASCII digits without leading
zeros, the size as WxH. The server answers a request that means one image in another spelling
(parameters in another order, the size or format left to the default, `jpeg`, `+` for a space,
a city in other case) with a 308 redirect to this one, and refuses what is not a spelling of one
image at all (a repeated or unknown parameter, seed=1.0, +5, 5_000, non-ASCII digits) with 422.

Signed URLs (off unless the server has a key, NEIGHBOURHOODS_URL_KEY; the production setting):
every new seed costs a generator pass, so a caller walking seed=1,2,3,... can keep the CPU busy.
With a key set, the server answers only URLs that carry

    sig = base64url(HMAC-SHA256(key, canonical path and query without sig)), unpadded

compared in constant time (403 otherwise). The website's backend signs with `signed_url()` (or
`neighbourhoods sign`), or with the same three lines in its own language. This module imports
nothing beyond the standard library, so a backend can use it without the model's dependencies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from urllib.parse import quote

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.latents import MAX_SEED

PATH = "/thumbnail"
PARAMS = ("city", "seed", "size", "format", "fallback")
SIGNATURE = "sig"
KEY_ENV = "NEIGHBOURHOODS_URL_KEY"
MIN_KEY_BYTES = 16

_SEED = re.compile(r"(0|[1-9][0-9]*)")          # [0-9] is ASCII only: no Arabic-Indic or full-width digits
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


class BadURL(NeighbourhoodsError):
    """A query that is no spelling of one thumbnail: 422."""


@dataclass(frozen=True)
class Thumb:
    """One thumbnail as a URL names it."""
    city: str
    seed: int
    size: str          # 'WxH'
    format: str        # jpg / png / webp
    fallback: str | None = None


def parse_query(items: list[tuple[str, str]]) -> tuple[dict[str, str], str | None]:
    """Decoded (name, value) pairs -> ({name: value} of thumbnail parameters, sig); BadURL for a
    repeated or unknown parameter. Values are not checked here (parse_seed, parse_size do that)."""
    params: dict[str, str] = {}
    sig = None
    for name, value in items:
        if name == SIGNATURE:
            if sig is not None:
                raise BadURL("parameter 'sig' is given twice")
            sig = value
            continue
        if name not in PARAMS:
            raise BadURL(f"unknown parameter {name[:40]!r}: a thumbnail takes {', '.join(PARAMS)} (and sig)")
        if name in params:
            raise BadURL(f"parameter {name!r} is given twice: one URL per thumbnail")
        params[name] = value
    return params, sig


def parse_seed(text: str, max_seed: int = MAX_SEED) -> int:
    if not _SEED.fullmatch(text) or len(text) > 19 or int(text) > max_seed:
        raise BadURL(f"bad seed {text[:30]!r}: an integer from 0 to {max_seed} in plain digits "
                     "(no sign, point, underscore or leading zero)")
    return int(text)


def parse_size(text: str) -> tuple[int, int]:
    m = _SIZE.fullmatch(text)
    if not m:
        raise BadURL(f"bad size {text[:30]!r}: WxH in plain digits, e.g. 256x192")
    return int(m.group(1)), int(m.group(2))


def canonical_path(thumb: Thumb) -> str:
    """The one path and query of `thumb` (without sig)."""
    parts = [("city", thumb.city), ("seed", str(thumb.seed)), ("size", thumb.size), ("format", thumb.format)]
    if thumb.fallback:
        parts.append(("fallback", thumb.fallback))
    return PATH + "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in parts)


def signature(path_and_query: str, key: bytes) -> str:
    digest = hmac.new(key, path_and_query.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verify(path_and_query: str, sig: str | None, key: bytes) -> bool:
    """Constant-time check of `sig` against the canonical path and query."""
    return sig is not None and hmac.compare_digest(signature(path_and_query, key).encode(), sig.encode("utf-8", "replace"))


def key_from_env(environ=os.environ) -> bytes | None:
    """The signing key from NEIGHBOURHOODS_URL_KEY (None: URLs are not signed)."""
    value = environ.get(KEY_ENV)
    if not value:
        return None
    key = value.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise NeighbourhoodsError(f"{KEY_ENV} is {len(key)} bytes: use at least {MIN_KEY_BYTES} random ones "
                                  "(e.g. `openssl rand -hex 32`)")
    return key


def signed_url(city: str, seed: int, size: str = "256x192", format: str = "jpg", fallback: str | None = None,
               key: bytes | None = None, base: str = "") -> str:
    """The canonical URL of a thumbnail, signed with `key` (default: NEIGHBOURHOODS_URL_KEY).

    `city` as the run spells it (GET /cities); `base` is prepended (e.g. https://img.example.com).
    """
    parse_seed(str(seed))
    w, h = parse_size(size)
    path = canonical_path(Thumb(city, int(seed), f"{w}x{h}", format, fallback))
    key = key if key is not None else key_from_env()
    if key is None:
        raise NeighbourhoodsError(f"no signing key: set {KEY_ENV} (the same value the server has)")
    return f"{base.rstrip('/')}{path}&{SIGNATURE}={signature(path, key)}"
