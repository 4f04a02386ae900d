"""`serve`: the thumbnail API, its caching headers, batching, bounds, and hostile input."""

from __future__ import annotations

import asyncio
import io
import threading

import httpx
import pytest
from openapi_check import SchemaMismatch, check_response, checked_client
from PIL import Image

from neighbourhoods.serve import ByteLRU, MicroBatcher, Overloaded, ServeConfig, build, create_app


@pytest.fixture(scope="module")
def thumbs(served_run):
    ws, run = served_run
    return build(ws, run, ServeConfig(max_batch=8, max_wait_ms=20), novelty=False)


@pytest.fixture(scope="module")
def client(thumbs):
    with checked_client(create_app(thumbs), raise_server_exceptions=True) as c:
        yield c


@pytest.fixture(scope="module")
def city(thumbs):
    return thumbs.source.class_names[0]


def test_cities_lists_every_conditioning_class(client, thumbs):
    body = client.get("/cities").json()
    assert [c["name"] for c in body["cities"]] == thumbs.source.class_names


def test_healthz_reports_ok_and_the_model(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["generator_res"] == [48, 64]
    assert body["generator_workers"] == 2          # the default: both cores of a small machine


def test_thumbnail_is_an_image_of_the_requested_size_and_format(client, city):
    for fmt, ctype in [("jpg", "image/jpeg"), ("png", "image/png"), ("webp", "image/webp")]:
        r = client.get("/thumbnail", params={"city": city, "seed": 3, "size": "200x150", "format": fmt})
        assert r.status_code == 200 and r.headers["content-type"] == ctype
        assert Image.open(io.BytesIO(r.content)).size == (200, 150)


def test_same_request_gives_the_same_bytes_and_a_strong_etag(client, thumbs, city):
    params = {"city": city, "seed": 42}
    a = client.get("/thumbnail", params=params)
    thumbs.cache._items.clear()
    thumbs.samples._items.clear()   # force a fresh render
    b = client.get("/thumbnail", params=params)
    assert a.content == b.content
    assert a.headers["etag"] == b.headers["etag"] and not a.headers["etag"].startswith("W/")
    assert "immutable" in a.headers["cache-control"]


def test_different_seeds_have_different_etags(client, city):
    a = client.get("/thumbnail", params={"city": city, "seed": 1}).headers["etag"]
    b = client.get("/thumbnail", params={"city": city, "seed": 2}).headers["etag"]
    assert a != b


def test_if_none_match_gives_304_without_a_body(client, city):
    etag = client.get("/thumbnail", params={"city": city, "seed": 8}).headers["etag"]
    r = client.get("/thumbnail", params={"city": city, "seed": 8}, headers={"If-None-Match": f'"x", {etag}'})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag


def test_head_gives_the_headers_of_get_without_a_body(client, city):
    get = client.get("/thumbnail", params={"city": city, "seed": 9})
    head = client.head("/thumbnail", params={"city": city, "seed": 9})
    assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == get.headers["etag"]


def test_unknown_city_is_404_with_close_matches(client, city):
    r = client.get("/thumbnail", params={"city": city[:-1] + "x", "seed": 1})
    assert r.status_code == 404 and city in r.json()["close_matches"]


def test_city_matching_ignores_case_and_spacing(client, city):
    r = client.get("/thumbnail", params={"city": "  " + city.upper() + " ", "seed": 1})
    assert r.status_code == 200


HOSTILE = [
    ("/thumbnail", {"seed": "1"}, 422),                                       # missing city
    ("/thumbnail", {"city": "{city}"}, 422),                                  # missing seed
    ("/thumbnail", {}, 422),
    ("/thumbnail", {"city": "{city}", "seed": "-1"}, 422),                    # negative seed
    ("/thumbnail", {"city": "{city}", "seed": "9" * 40}, 422),                # huge seed
    ("/thumbnail", {"city": "{city}", "seed": "1e9"}, 422),
    ("/thumbnail", {"city": "{city}", "seed": "0x10"}, 422),
    ("/thumbnail", {"city": "{city}", "seed": "NaN"}, 422),
    ("/thumbnail", {"city": "{city}", "seed": "1", "size": "100000x100000"}, 422),   # huge size
    ("/thumbnail", {"city": "{city}", "seed": "1", "size": "1025x10"}, 422),
    ("/thumbnail", {"city": "{city}", "seed": "1", "size": "0x0"}, 422),
    ("/thumbnail", {"city": "{city}", "seed": "1", "size": "-256x192"}, 422),
    ("/thumbnail", {"city": "{city}", "seed": "1", "size": "9" * 5000}, 422),
    ("/thumbnail", {"city": "{city}", "seed": "1", "format": "gif"}, 422),
    ("/thumbnail", {"city": "{city}", "seed": "1", "format": "../../x"}, 422),
    ("/thumbnail", {"city": "../../etc/passwd", "seed": "1"}, 404),            # path-like city
    ("/thumbnail", {"city": "C:\\Windows\\system32", "seed": "1"}, 404),
    ("/thumbnail", {"city": "Zürich 東京 🏠", "seed": "1"}, 404),                # unicode city
    ("/thumbnail", {"city": "\x00", "seed": "1"}, 404),
    ("/thumbnail", {"city": "", "seed": "1"}, 404),
    ("/thumbnail", {"city": "<script>alert(1)</script>", "seed": "1"}, 404),
    ("/thumbnail", {"city": "x" * 5000, "seed": "1"}, 422),                    # huge city
    ("/nope", {}, 404),
]


@pytest.mark.parametrize("path,params,status", HOSTILE)
def test_hostile_input_is_refused_cleanly_never_a_500(client, city, path, params, status):
    params = {k: v.replace("{city}", city) for k, v in params.items()}
    r = client.get(path, params=params)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/json") and r.json()["detail"]


def test_raw_invalid_utf8_in_the_query_is_not_a_500(client):
    r = client.get("/thumbnail?city=%ED%A0%80%FF&seed=1")
    assert r.status_code == 404


def test_error_responses_are_not_cached(client):
    r = client.get("/thumbnail", params={"city": "nowhere", "seed": 1})
    assert r.headers["cache-control"] == "no-store"


def test_concurrent_requests_are_batched_into_few_generator_calls(thumbs, city):
    async def fire():
        transport = httpx.ASGITransport(app=create_app(thumbs))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*[c.get("/thumbnail", params={"city": city, "seed": 1000 + k,
                                                                       "size": "256x192", "format": "jpg"})
                                          for k in range(16)])

    before = thumbs.batcher.batches
    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    assert thumbs.batcher.batches - before <= 4   # 16 requests, at most 8 per batch, plus stragglers
    alone = checked_client(create_app(thumbs))
    thumbs.cache._items.clear()
    thumbs.samples._items.clear()
    assert alone.get("/thumbnail", params={"city": city, "seed": 1005}).content == responses[5].content


def test_lru_cache_stays_within_its_byte_budget():
    lru = ByteLRU(max_bytes=10)
    for k in range(5):
        lru.put(k, b"abcd")
    assert lru.bytes <= 10 and len(lru) == 2
    assert lru.get(0) is None and lru.get(4) == b"abcd"
    lru.put("big", b"x" * 11)                 # larger than the whole budget: not cached
    assert lru.get("big") is None and lru.bytes <= 10


def test_batcher_refuses_work_beyond_its_queue_bound():
    busy = threading.Event()
    release = threading.Event()

    def slow(keys):
        busy.set()
        release.wait(10)
        return keys

    async def run():
        b = MicroBatcher(slow, max_batch=1, max_wait_s=0.0, max_queue=1)
        first = asyncio.ensure_future(b.submit("a"))
        while not busy.is_set():                # the worker is inside its generator call
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(b.submit("b"))
        await asyncio.sleep(0)                  # "b" now waits in the queue, which is full
        with pytest.raises(Overloaded):
            await b.submit("c")
        release.set()
        return await first, await second

    assert asyncio.run(run()) == ("a", "b")


def test_batcher_runs_as_many_generator_calls_at_once_as_it_has_workers():
    lock, active, peak = threading.Lock(), [0], [0]
    release = threading.Event()

    def slow(keys):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if active[0] == 2:
                release.set()               # both workers are inside a call: let everyone finish
        release.wait(10)
        with lock:
            active[0] -= 1
        return [k * 10 for k in keys]

    async def run():
        b = MicroBatcher(slow, max_batch=1, max_wait_s=0.0, max_queue=64, workers=2)
        return await asyncio.gather(*[b.submit(k) for k in range(8)])

    assert asyncio.run(run()) == [k * 10 for k in range(8)]
    assert peak[0] == 2 and release.is_set()     # two at once, never a third


def test_novelty_guard_is_on_by_default_and_serves(served_run):
    ws, run = served_run
    guarded = build(ws, run)
    with checked_client(create_app(guarded)) as c:
        assert c.get("/healthz").json()["novelty_guard"] is True
        city = guarded.source.class_names[0]
        assert c.get("/thumbnail", params={"city": city, "seed": 1}).status_code == 200


def test_gallery_page_is_html_with_a_strict_content_security_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]


def test_the_schema_states_the_query_rules_the_parser_applies(client, thumbs):
    import re

    from neighbourhoods.core import urls
    from neighbourhoods.core.errors import NeighbourhoodsError
    from neighbourhoods.core.resolution import ThumbSize

    doc = client.get("/openapi.json").json()
    get, head = doc["paths"]["/thumbnail"]["get"], doc["paths"]["/thumbnail"]["head"]
    assert get["operationId"] != head["operationId"]          # a generated client needs one name per call
    params = {p["name"]: p["schema"] for p in get["parameters"]}
    cfg = thumbs.config

    def parses(fn, text):
        try:
            fn(text)
            return True
        except NeighbourhoodsError:
            return False

    seed, size = re.compile(params["seed"]["pattern"]), re.compile(params["size"]["pattern"])
    for text in ["0", "7", "10", "1" + "0" * 18, str(cfg.max_seed), str(cfg.max_seed + 1), "9" * 19, "01", "-1",
                 "+1", "1e3", " 1", "", "12a"]:
        assert bool(seed.match(text)) == parses(lambda t: urls.parse_seed(t, cfg.max_seed), text), text
    def side(text):
        return ThumbSize.parse(urls.parse_size(text), cfg.max_side)

    for text in ["256x192", "8x8", "7x8", f"{cfg.max_side}x{cfg.max_side}", f"{cfg.max_side + 1}x10", "0x0",
                 "019x20", "100X100", "100x", "1000x999", "1019x1020", "1025x1024"]:
        assert bool(size.match(text)) == parses(side, text), text
    assert set(params["format"]["enum"]) == {"jpg", "jpeg", "png", "webp"}
    assert params["size"]["default"] == cfg.default_size
    assert {"200", "304", "308", "403", "404", "422", "503"} <= set(get["responses"])
    assert "HTTPValidationError" not in doc["components"]["schemas"]   # FastAPI's 422 body, never sent here


def test_the_schema_check_fails_a_response_the_schema_does_not_declare(client, city):
    import httpx

    doc = client.get("/openapi.json").json()
    request = httpx.Request("GET", "http://testserver/thumbnail")

    def response(status, **kw):
        return httpx.Response(status, request=request, headers={"Cache-Control": "no-store"}, **kw)

    check_response(doc, "GET", "/thumbnail", response(422, json={"detail": "bad seed"}))   # what the server sends
    with pytest.raises(SchemaMismatch, match="does not match"):                          # FastAPI's own 422 body
        check_response(doc, "GET", "/thumbnail", response(422, json={"detail": [{"loc": ["query", "seed"]}]}))
    with pytest.raises(SchemaMismatch, match="not declared"):
        check_response(doc, "GET", "/thumbnail", response(418, json={"detail": "teapot"}))
    with pytest.raises(SchemaMismatch, match="Location"):
        check_response(doc, "GET", "/thumbnail", response(308))
    with pytest.raises(SchemaMismatch, match="no POST"):   # the checked client checks what the server sends
        client.post("/thumbnail", params={"seed": "3", "city": city})
    # and the real thing, through the checked client: a 308 with its Location, then the image
    r = client.get("/thumbnail", params={"seed": "3", "city": city}, follow_redirects=True)
    assert r.status_code == 200 and r.history and r.history[0].status_code == 308
