"""`serve` as operators meet it: one canonical URL per image, signed URLs, the novelty guard on,
a real server process over a real socket (same bytes in two processes, slow clients closed),
and a workspace on a read-only file system."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from openapi_check import checked_client

from neighbourhoods.cli import main
from neighbourhoods.core import urls
from neighbourhoods.serve import ServeConfig, build, create_app
from neighbourhoods.thumbnails.guard import Guard

KEY = b"k" * 32


@pytest.fixture(scope="module")
def thumbs(served_run):
    ws, run = served_run
    return build(ws, run, ServeConfig(max_batch=8, max_wait_ms=5), novelty=False)


@pytest.fixture(scope="module")
def client(thumbs):
    with checked_client(create_app(thumbs), follow_redirects=False) as c:
        yield c


@pytest.fixture(scope="module")
def city(thumbs):
    return thumbs.source.city_map.cities[0]


def canonical(city, seed=1, size="256x192", fmt="jpg", **extra) -> str:
    return urls.canonical_path(urls.Thumb(city, seed, size, fmt, extra.get("fallback")))


# --- one URL per image ----------------------------------------------------------------------------
def test_the_canonical_url_serves_the_image(client, city):
    r = client.get(canonical(city))
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("spelling", [
    "/thumbnail?seed=1&city={q}&size=256x192&format=jpg",          # another order
    "/thumbnail?city={q}&seed=1",                                  # size and format left to the defaults
    "/thumbnail?city={q}&seed=1&size=256x192&format=jpeg",         # an alias of the format
    "/thumbnail?city={plus}&seed=1&size=256x192&format=jpg",       # '+' for a space, or a letter percent-encoded
    "/thumbnail?city={upper}&seed=1&size=256x192&format=jpg",      # the city in other case
])
def test_other_spellings_of_one_image_redirect_to_the_canonical_url(client, city, spelling):
    plus = city.replace(" ", "+") if " " in city else f"%{ord(city[0]):02X}" + quote(city[1:], safe="")
    url = spelling.format(q=quote(city, safe=""), plus=plus, upper=quote(city.upper(), safe=""))
    r = client.get(url)
    assert r.status_code == 308 and r.headers["location"] == canonical(city)
    assert "immutable" in r.headers["cache-control"]


@pytest.mark.parametrize("query, message", [
    ("city={q}&seed=1&seed=2", "given twice"),
    ("city={q}&city={q}&seed=1", "given twice"),
    ("city={q}&seed=1&nocache=7", "unknown parameter"),
    ("city={q}&seed=1.0", "bad seed"), ("city={q}&seed=%2B5", "bad seed"), ("city={q}&seed=5_000", "bad seed"),
    ("city={q}&seed=05", "bad seed"), ("city={q}&seed=%D9%A3", "bad seed"),   # Arabic-Indic three
    ("city={q}&seed=%EF%BC%95", "bad seed"),                                 # full-width five
    ("city={q}&seed=1&size=0256x192", "bad size"), ("city={q}&seed=1&size=256X192", "bad size"),
])
def test_non_canonical_values_and_repeats_are_422(client, city, query, message):
    r = client.get("/thumbnail?" + query.format(q=quote(city, safe="")))
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_a_bounded_seed_range(served_run, city):
    ws, run = served_run
    bounded = build(ws, run, ServeConfig(max_seed=99), novelty=False)
    with checked_client(create_app(bounded), follow_redirects=False) as c:
        assert c.get(canonical(city, seed=99)).status_code == 200
        assert c.get(canonical(city, seed=100)).status_code == 422


def test_healthz_reports_the_servers_memory(client):
    body = client.get("/healthz").json()
    assert body["rss_mb"] > 10 and body["peak_rss_mb"] >= body["rss_mb"] and body["signed_urls"] is False


# --- signed URLs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def signed_client(served_run):
    ws, run = served_run
    signed = build(ws, run, ServeConfig(url_key=KEY), novelty=False)
    with checked_client(create_app(signed), follow_redirects=False) as c:
        yield c


@pytest.mark.parametrize("size, fmt, fallback", [("256x192", "jpg", None), ("128x96", "webp", None),
                                                 ("300x200", "png", "any")])
def test_a_signed_url_serves_and_the_signer_agrees_with_the_server(signed_client, city, size, fmt, fallback):
    url = urls.signed_url(city, 7, size=size, format=fmt, fallback=fallback, key=KEY)
    assert url.startswith(canonical(city, 7, size, fmt, fallback=fallback) + "&sig=")
    assert signed_client.get(url).status_code == 200


def test_unsigned_tampered_or_wrongly_keyed_urls_are_403(signed_client, city):
    url = urls.signed_url(city, 7, key=KEY)
    for bad in (canonical(city, 7),                                   # unsigned
                url.replace("seed=7", "seed=8"),                      # another seed, same signature
                url[:-2] + ("AA" if not url.endswith("AA") else "BB"),  # a changed signature
                urls.signed_url(city, 7, key=b"another key, 32 bytes long......")):
        r = signed_client.get(bad)
        assert r.status_code == 403 and r.headers["cache-control"] == "no-store", bad


def test_a_signed_url_in_another_order_redirects_with_its_signature(signed_client, city):
    url = urls.signed_url(city, 7, key=KEY)
    sig = url.rsplit("&sig=", 1)[1]
    r = signed_client.get(f"/thumbnail?sig={sig}&seed=7&city={quote(city, safe='')}&size=256x192&format=jpg")
    assert r.status_code == 308 and r.headers["location"] == url


def test_the_sign_verb_and_a_short_key(city, capsys, monkeypatch):
    monkeypatch.setenv(urls.KEY_ENV, KEY.decode())
    assert main(["sign", "--city", city, "--seed", "3", "--base", "https://img.example.com/"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == "https://img.example.com" + urls.signed_url(city, 3, key=KEY)
    monkeypatch.setenv(urls.KEY_ENV, "short")
    assert main(["sign", "--city", city, "--seed", "3"]) == 2
    assert "at least 16" in capsys.readouterr().err
    monkeypatch.delenv(urls.KEY_ENV)
    assert main(["sign", "--city", city, "--seed", "3"]) == 2
    assert "no signing key" in capsys.readouterr().err


# --- the novelty guard on -------------------------------------------------------------------------
def test_serve_answers_503_when_every_retry_is_a_near_copy(served_run, city):
    ws, run = served_run
    thumbs = build(ws, run, ServeConfig(), novelty=False)
    thumbs.guard = Guard(embed=lambda images: np.ones((len(images), 1)), similarity=lambda f: f[:, 0], threshold=0.5,
                         max_attempts=3)
    with checked_client(create_app(thumbs), follow_redirects=False) as c:
        r = c.get(canonical(city, 5))
        assert r.status_code == 503 and "memorisation threshold" in r.json()["detail"]
        assert r.headers["cache-control"] == "no-store"


def test_generate_with_the_guard_on_and_its_error(served_run, tmp_path, capsys, monkeypatch, city):
    ws, run = served_run
    assert main(["generate", "-w", str(ws), "--run", run, "--city", city, "-n", "3", "--out", str(tmp_path / "a")]) == 0
    assert len(list((tmp_path / "a").rglob("*.jpg"))) >= 3
    from neighbourhoods.metrics import novelty

    real = novelty.NoveltyIndex.build

    def always_copies(*a, **kw):
        index = real(*a, **kw)
        index.threshold = -1.0           # every sample is "closer than any real photo": a memorising model
        return index

    monkeypatch.setattr(novelty.NoveltyIndex, "build", always_copies)
    assert main(["generate", "-w", str(ws), "--run", run, "--city", city, "-n", "2", "--out", str(tmp_path / "b")]) == 2
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "memorisation threshold" in lines[-1]
    assert sum(line.startswith("error: ") for line in lines) == 1 and not any("Traceback" in x for x in lines)


# --- a real server process -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(ws, run, *flags) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "neighbourhoods", "serve", "-w", str(ws), "--run", run,
                             "--port", str(port), *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("serve exited: " + proc.stdout.read().decode(errors="replace")[-2000:])
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("serve did not answer /healthz within 120 s")


def _get(port, path) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, body


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_two_server_processes_give_the_same_bytes_and_etag_and_close_slow_clients(served_run, city):
    ws, run = served_run
    path = canonical(city, 11)
    first, port1 = _start(ws, run, "--header-timeout", "1")      # the novelty guard is on (the default)
    try:
        status, headers, body = _get(port1, path)
        assert status == 200 and body[:2] == b"\xff\xd8"
        # slowloris: connections that never finish their request head are closed by the server
        slow = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port1))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")   # no blank line: the head never ends
            s.settimeout(10)
            slow.append(s)
        start = time.monotonic()
        for s in slow:
            assert s.recv(1024) == b""                            # closed by the server
            s.close()
        assert time.monotonic() - start < 8
        assert _get(port1, "/healthz")[0] == 200                  # and it still serves
    finally:
        _stop(first)
    second, port2 = _start(ws, run)
    try:
        status2, headers2, body2 = _get(port2, path)
    finally:
        _stop(second)
    assert status2 == 200 and body2 == body and headers2["etag"] == headers["etag"]


# --- a read-only workspace ------------------------------------------------------------------------
@pytest.fixture
def readonly_copy(served_run, tmp_path):
    """The served workspace copied and bind-mounted read-only (needs root and mount; skips else)."""
    ws, run = served_run
    build(ws, run)                         # the guard's feature cache, as a finished workspace has it
    src, mnt = tmp_path / "src", tmp_path / "ro"
    shutil.copytree(ws, src)
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a read-only file system needs root and `mount --bind -o ro` here")
    try:
        probe = mnt / "probe"
        with pytest.raises(OSError):
            probe.write_text("x")
        yield mnt, run
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_generate_and_serve_from_a_read_only_workspace(readonly_copy, tmp_path, city):
    ws, run = readonly_copy
    assert main(["generate", "-w", str(ws), "--run", run, "--city", city, "-n", "2", "--out", str(tmp_path / "t")]) == 0
    thumbs = build(ws, run)                                       # guard on
    with checked_client(create_app(thumbs), follow_redirects=False) as c:
        assert c.get(canonical(city, 2)).status_code == 200
        assert c.get("/healthz").json()["novelty_guard"] is True


def test_a_read_only_workspace_without_the_guards_cache_still_serves(served_run, tmp_path, city):
    ws, run = served_run
    src, mnt = tmp_path / "src", tmp_path / "ro"
    shutil.copytree(ws, src)
    for cache in (src / "embeddings").glob("eval-*.npz"):
        cache.unlink()
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a read-only file system needs root and `mount --bind -o ro` here")
    try:
        thumbs = build(mnt, run)           # features computed and kept in memory, not cached
        with checked_client(create_app(thumbs), follow_redirects=False) as c:
            assert c.get(canonical(city, 4)).status_code == 200
        assert not list(Path(mnt, "embeddings").glob("eval-*.npz"))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
