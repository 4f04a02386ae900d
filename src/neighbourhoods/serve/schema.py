"""What the API publishes about itself: the query's real constraints and every response it gives.

FastAPI derives an OpenAPI schema from the routes' signatures; left alone, it declared a
422 body of FastAPI's own (a list of errors) that this server never sends, and no 304, 308,
403, 404 or 503 at all. The models and tables here are what app.py declares, so a website's
backend can generate a client from /openapi.json and a schema-driven fuzzer finds the server
doing what the schema says (tests/test_serve.py validates every response of the serve tests).
The query is still parsed by core/urls.py; the patterns below are its rules, written as regexes.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from neighbourhoods.core.resolution import MIN_THUMB_SIDE
from neighbourhoods.thumbnails.postprocess import FORMAT_ALIASES, FORMATS


def digits_between(lo: int, hi: int) -> str:
    """A regex (no anchors) matching exactly the integers lo..hi (lo >= 0) in plain digits.

    The range is cut where the numbers change length or a run of trailing digits wraps
    (8..1024: 8-9, 10-99, 100-999, 1000-1019, 1020-1024); each piece is then a fixed prefix,
    one digit class and free digits (1000-1019 -> "10[0-1][0-9]").
    """
    if not 0 <= lo <= hi:
        raise ValueError(f"bad range {lo}..{hi}")
    stops = {hi}
    for k in range(1, len(str(hi)) + 1):
        nines = int(str(lo)[:-k] + "9" * k) if k < len(str(lo)) else 10 ** k - 1   # lo with its last k digits 9
        zeros = (hi + 1) // 10 ** k * 10 ** k - 1                                  # below hi + 1's last k digits 0
        stops.update(s for s in (nines, zeros) if lo <= s <= hi)
    parts, start = [], lo
    for stop in sorted(stops):
        a, b = str(start), str(stop)
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))   # a and b have one length
        free = len(a) - same - 1
        piece = a[:same]
        if same < len(a):
            piece += f"[{a[same]}-{b[same]}]" + ("" if free == 0 else "[0-9]" if free == 1 else f"[0-9]{{{free}}}")
        parts.append(piece)
        start = stop + 1
    return "|".join(parts)


def seed_pattern(max_seed: int) -> str:
    return f"^(0|{digits_between(1, max_seed)})$"


def size_pattern(max_side: int) -> str:
    side = f"({digits_between(MIN_THUMB_SIDE, max_side)})"
    return f"^{side}x{side}$"


FORMAT_NAMES = [*FORMATS, *FORMAT_ALIASES]   # jpg, png, webp, and jpeg (redirected to jpg)
FALLBACKS = ["any"]


class ErrorBody(BaseModel):
    """Every error this server sends: one line that says what was wrong."""
    detail: str
    error: str | None = None    # 503 after an unexpected failure only: the exception's type


class UnknownCityBody(BaseModel):
    """404 for a city the data does not have, with the names it may have meant."""
    detail: str
    close_matches: list[str]


class City(BaseModel):
    name: str            # as the data spells it
    index: int           # the generator class it is drawn from
    draws_from: str      # that class's name: the city itself, or the pool of small cities
    own_class: bool


class Cities(BaseModel):
    cities: list[City]
    classes: list[str]
    fallbacks: list[str]
    default_size: str
    max_side: int
    formats: list[str]


class Health(BaseModel):
    """/healthz: the fields below, plus memory and cache figures that vary by platform."""
    model_config = ConfigDict(extra="allow")
    status: str
    model: str
    snapshot: str | None
    images_seen: int | None
    generator_res: list[int]
    cities: int
    upscale: str
    novelty_guard: bool
    realism_gate: float | None   # the realism gate's quantile (None: off)
    signed_urls: bool


def _header(description: str, required: bool = True) -> dict:
    return {"description": description, "required": required, "schema": {"type": "string"}}


_CACHED = {"ETag": _header("strong, the same for the same image"),
           "Cache-Control": _header("public, max-age=31536000, immutable")}
_NO_STORE = {"Cache-Control": _header("no-store: errors are never cached")}


def _error(description: str, model: type[BaseModel] = ErrorBody, **headers) -> dict:
    return {"description": description, "model": model, "headers": {**_NO_STORE, **headers}}


THUMBNAIL_RESPONSES: dict[int | str, dict] = {
    200: {"description": "the thumbnail; the same URL always gives the same bytes",
          "content": {media: {"schema": {"type": "string", "format": "binary"}}
                      for media in dict.fromkeys(v[1] for v in FORMATS.values())},
          "headers": {**_CACHED, "X-City-Drawn-From": _header("the class the city is drawn from, percent-encoded"),
                      "X-City-Fallback": _header("'any' when the city was drawn from (any city)", required=False)}},
    304: {"description": "If-None-Match matched the ETag: no body", "headers": _CACHED},
    308: {"description": "the same image under its canonical URL (parameter order, spelling, default size)",
          "headers": {"Location": _header("the canonical URL"), "Cache-Control": _CACHED["Cache-Control"]}},
    403: _error("the server signs URLs and the signature is missing or wrong"),
    404: _error("no such city; close_matches lists the names it may have meant", UnknownCityBody),
    422: _error("a parameter is malformed, out of range, repeated or unknown"),
    503: _error("busy (retry after Retry-After seconds), or no sample of this seed passed the guard",
                **{"Retry-After": _header("seconds; sent when the queue is full", required=False)}),
}

PLAIN_RESPONSES: dict[int | str, dict] = {503: _error("an unexpected failure; try again")}
