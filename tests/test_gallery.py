"""The gallery page at / in a real browser (headless Debian chromium driven by Playwright)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(served_run):
    import uvicorn

    from neighbourhoods.serve import ServeConfig, build, create_app

    ws, run = served_run
    thumbs = build(ws, run, ServeConfig(), novelty=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(thumbs), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", thumbs
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page():
    if not CHROMIUM.is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium): skipping the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        pg = browser.new_page(viewport={"width": 1200, "height": 900})
        yield pg
        browser.close()


def _wait_for(page, js: str, timeout_s: float = 60.0) -> None:
    # polls with page.evaluate (CDP, not eval()): the page's own CSP, which forbids eval, stays on
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(js):
        assert time.monotonic() < deadline, f"timed out waiting for {js}"
        time.sleep(0.05)


def _all_images_loaded(page) -> bool:
    return page.evaluate("[...document.images].length > 0 && "
                         "[...document.images].every(i => i.complete && i.naturalWidth > 0)")


def test_gallery_shows_every_city_and_loads_every_thumbnail(server, page):
    url, thumbs = server
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    _wait_for(page, "document.images.length === 12 && [...document.images].every(i => i.complete)")
    assert _all_images_loaded(page)
    options = page.eval_on_selector_all("#city option", "os => os.map(o => o.value)")
    assert options == thumbs.source.class_names
    sizes = page.evaluate("[...document.images].map(i => [i.naturalWidth, i.naturalHeight])")
    assert all(s == [256, 192] for s in sizes)
    assert page.text_content("#status") == "" and errors == []
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "gallery.png"), full_page=True)


def test_choosing_a_city_and_paging_change_the_thumbnails(server, page):
    url, thumbs = server
    page.goto(url + "/")
    _wait_for(page, "document.images.length === 12")
    other = thumbs.source.class_names[-1]
    page.select_option("#city", other)
    page.click("#next")
    _wait_for(page, "[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    srcs = page.evaluate("[...document.images].map(i => decodeURIComponent(i.src.replace(/\\+/g, ' ')))")
    assert all(f"city={other}" in s for s in srcs)
    assert page.evaluate("[...document.images].map(i => +i.dataset.seed)") == list(range(12, 24))
    assert f"city={other}".replace(" ", "+") in page.url or other.replace(" ", "+") in page.url
