"""`report`: one self-contained HTML file that a real browser renders with every image loaded."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from toy_run import CITIES, toy_run

from neighbourhoods import evaluate as ev
from neighbourhoods import report
from neighbourhoods.cli import main

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    return toy_run(tmp_path_factory)


@pytest.fixture(scope="module")
def evaluated(toy):
    # A copy of the toy run that only this module evaluates: test_evaluate, on the same worker,
    # evaluates the shared run again with one novelty space, and the report shows the latest.
    run = "tiny-report"
    if not toy.ws.run_dir(run).is_dir():
        shutil.copytree(toy.run_dir, toy.ws.run_dir(run), ignore=shutil.ignore_patterns("eval", "report.html"))
    ev.evaluate(toy.ws, run, ev.EvaluateConfig(n=12, kid_subsets=10, min_city_holdout=3), progress=False)
    return replace(toy, run=run)


@pytest.fixture(scope="module")
def report_path(evaluated) -> Path:
    return report.write_report(evaluated.ws, evaluated.run)


def test_report_is_one_self_contained_file(report_path):
    text = report_path.read_text()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'<(script|link|iframe)\b', text)
    assert not re.search(r'(src|href)="(https?:|file:|/)', text)


def test_report_shows_metrics_data_curves_progress_cities_and_novelty(report_path, evaluated):
    text = report_path.read_text()
    evaluation = ev.latest_evaluation(evaluated.run_dir)
    assert f"{evaluation['quality']['fid']:.2f}" in text                      # the metrics table
    assert "real-vs-real floor" in text
    assert all(city in text for city in CITIES)                              # data summary and city grid
    assert "<svg" in text and "loss_d" in text                               # loss curves
    n_grids = len(list((evaluated.run_dir / "samples").glob("progress-*.png")))
    assert text.count("<figcaption>") == min(n_grids, 6)                     # progress over time
    assert text.count('alt="samples of ') == len(CITIES)                      # one row per city
    pairs = text[text.index("beside their nearest training photos"):]
    assert pairs.count("similarity 0.") + pairs.count("similarity 1.") >= 2  # novelty pairs


def test_every_inline_chart_is_well_formed_svg(report_path):
    charts = re.findall(r"<svg.*?</svg>", report_path.read_text(), flags=re.S)
    assert len(charts) >= 3   # losses and one histogram per feature space
    for chart in charts:
        ET.fromstring(chart)


def test_report_without_an_evaluation_says_how_to_make_one(evaluated, tmp_path):
    copy = tmp_path / "copy-of-run"
    shutil.copytree(evaluated.run_dir, copy, ignore=shutil.ignore_patterns("eval", "report.html"))
    text = report.build_report(evaluated.ws, str(copy))
    assert "neighbourhoods evaluate --workspace" in text
    assert "not evaluated yet" in text


def test_report_shows_the_thumbnails_figures_beside_the_samples(evaluated, tmp_path):
    from neighbourhoods.scoring import ScoringConfig, score_run

    copy = tmp_path / "copy-of-run"
    shutil.copytree(evaluated.run_dir, copy, ignore=shutil.ignore_patterns("eval", "report.html"))
    cfg = ScoringConfig(n=8, kid_subsets=5, min_city_holdout=3, novelty_spaces=("inception",))
    native = score_run(evaluated.ws, copy, cfg, progress=False)
    served = score_run(evaluated.ws, copy, replace(cfg, size=(40, 30), upscale="lanczos", novelty_spaces=(),
                                                   gated=True), progress=False)
    text = report.build_report(evaluated.ws, str(copy))
    assert f"{native['quality']['fid']:.2f}" in text
    assert "As served" in text and "40x30 thumbnails (lanczos, jpg)" in text
    assert f"{served['quality']['fid']:.2f}" in text
    # the set through the gates beside it, per city, and the sheet of what they let through and reject
    gated = served["gated"]
    assert "through the gates" in text and f"{gated['fid']:.2f}" in text
    assert f"{gated['accepted_share'] * 100:.1f}%" in text
    assert served["sheet"].endswith("served-40x30.jpg") and "data:image/jpeg;base64," in text
    assert "Per city as served at 40x30" in text


def test_training_kid_curve_is_drawn_when_logged(tmp_path):
    lines = [{"images_seen": i * 1000, "loss_g": 1.0, "loss_d": 1.0, "kid": 0.1 / (i + 1), "kid_std": 0.01}
             for i in range(5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{torn")
    html = report.curves_section(tmp_path)
    assert "KID during training" in html
    assert html.count("<svg") == 2


def test_the_served_quality_curve_and_the_best_snapshot_are_drawn(tmp_path):
    lines = [{"images_seen": i * 1000, "loss_g": 1.0, "loss_d": 1.0, "kid_train": 0.1 / (i + 1) + (i == 3) * 0.1,
              "kid_train_std": 0.01} for i in range(5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best-0000004000.safetensors").write_bytes(b"")
    (tmp_path / "checkpoints" / "best.json").write_text(json.dumps({"file": "best-0000004000.safetensors",
                                                                   "images_seen": 4000}))
    for images, kid in ((2000, 0.05), (4000, 0.03)):   # what bench/curve.py has evaluate write per kept checkpoint
        folder = tmp_path / "eval" / f"{images:010d}"
        folder.mkdir(parents=True)
        (folder / "metrics-256x192.json").write_text(json.dumps(
            {"quality": {"kid": {"mean": kid, "std": 0.001}, "precision": 0.5, "recall": 0.1}}))
    html = report.curves_section(tmp_path)
    assert "a fixed draw of training photos" in html and "best snapshot (used by" in html and "4,000 images" in html
    assert "thumbnails served at 256x192 over training" in html
    assert html.count("<svg") == 4   # losses, the training curve, served KID, served precision and recall


def test_city_names_are_escaped(tmp_path):
    html = report.table(["city"], [[report.esc('<script>alert("x")</script>')]])
    assert "<script>" not in html


def test_cli_report_prints_the_path(evaluated, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "--workspace", str(evaluated.ws.root), "--run", evaluated.run, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.stat().st_size > 10_000


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian chromium not installed at /usr/bin/chromium")
def test_report_opens_in_headless_chromium_with_every_image_loaded(report_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report_path.as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert len(images) == report_path.read_text().count("<img ")
    broken = [alt for alt, complete, width in images if not complete or width == 0]
    assert not broken, f"images that did not load: {broken}"
    assert not errors
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
