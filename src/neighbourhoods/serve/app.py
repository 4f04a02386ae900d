"""The FastAPI app: routes, strict query parsing, canonical URLs, ETags and error bodies.

All state is in the `Thumbnails` renderer it wraps (batching.py); the gallery page is
gallery.html beside this file.
"""

from __future__ import annotations

import logging
from importlib import resources
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from neighbourhoods.core import urls
from neighbourhoods.core.cities import ANY_CITY, UnknownCity
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import ThumbSize
from neighbourhoods.serve import schema
from neighbourhoods.serve.batching import Overloaded, Thumbnails
from neighbourhoods.thumbnails.guard import NoNovelSample
from neighbourhoods.thumbnails.postprocess import FORMATS, media_type, parse_format

log = logging.getLogger("neighbourhoods.serve")   # the verb's name, as log configurations know it

# a file of the package (package-data in pyproject.toml): the page is edited as HTML, not a Python string
GALLERY_HTML = resources.files("neighbourhoods.serve").joinpath("gallery.html").read_text(encoding="utf-8")
CSP = ("default-src 'none'; img-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")
CACHE_CONTROL = "public, max-age=31536000, immutable"


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

    plain = {"responses": schema.PLAIN_RESPONSES}

    @app.head("/healthz", operation_id="healthz_head", response_model=schema.Health, **plain)
    @app.get("/healthz", operation_id="healthz", response_model=schema.Health, **plain)
    async def healthz():
        return {"status": "ok", "model": source.label, "snapshot": source.snapshot, "images_seen": source.images_seen,
                "generator_res": list(source.res), "cities": len(source.class_names),
                "upscale": thumbs.upscaler.name, "novelty_guard": thumbs.guard is not None,
                "realism_gate": thumbs.guard.realism.quantile if thumbs.guard and thumbs.guard.realism else None,
                "signed_urls": cfg.url_key is not None, **memory(), **thumbs.stats()}

    @app.get("/cities", operation_id="cities", response_model=schema.Cities, **plain)
    async def cities():
        # every city of the run's data, by its own name, with the class it is drawn from
        draws = source.city_map.draws_from
        return {"cities": [{"name": n, "index": source.class_names.index(draws[n]), "draws_from": draws[n],
                            "own_class": draws[n] == n} for n in source.city_map.cities],
                "classes": list(source.class_names), "fallbacks": ["any"] if ANY_CITY in source.class_names else [],
                "default_size": cfg.default_size, "max_side": cfg.max_side, "formats": list(FORMATS)}

    # every parameter is a string parsed strictly below (core/urls.py); the patterns and enums
    # only tell clients those rules (json_schema_extra: published, not checked a second time)
    def rule(**extra):
        return {"json_schema_extra": extra}

    thumb = {"response_class": Response, "responses": schema.THUMBNAIL_RESPONSES}

    @app.head("/thumbnail", operation_id="thumbnail_head", **thumb)
    @app.get("/thumbnail", operation_id="thumbnail", **thumb)
    async def thumbnail(request: Request,
                        city: str = Query(..., max_length=300, description="city name, as /cities lists it "
                                          "(case and spacing are forgiven, then redirected)"),
                        seed: str = Query(..., max_length=19, description=f"an integer from 0 to {cfg.max_seed} "
                                          "in plain digits", **rule(pattern=schema.seed_pattern(cfg.max_seed))),
                        size: str = Query(cfg.default_size, max_length=20, description=f"WxH, each side "
                                          f"{schema.MIN_THUMB_SIDE} to {cfg.max_side} px",
                                          **rule(pattern=schema.size_pattern(cfg.max_side))),
                        format: str = Query("jpg", max_length=10, description="image format (jpeg: redirected to jpg)",
                                            **rule(enum=schema.FORMAT_NAMES)),
                        fallback: str = Query(None, max_length=10,
                                              description="any: draw a city the data never had from (any city)",
                                              **rule(enum=schema.FALLBACKS)),
                        sig: str = Query(None, max_length=100, description="signature of the canonical URL "
                                         "(required when the server signs)")):
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
        # a city drawn from a shared class samples seeds of its own: no two cities share a house
        ci, seed = match.class_index, match.seed(seed_n)
        etag = thumbs.etag(ci, seed, wh, fmt)
        headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL,
                   "X-City-Drawn-From": quote(match.draws_from)}   # percent-encoded: headers are latin-1
        if match.fallback:
            headers["X-City-Fallback"] = "any"
        if _etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        try:
            data = await thumbs.render(match, seed_n, wh, fmt)
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
