"""`neighbourhoods demo`: the whole pipeline on toy town in one call."""

from __future__ import annotations

import json

import pytest

from neighbourhoods.cli import main
from neighbourhoods.core import catalog
from neighbourhoods.demo import demo


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory):
    ws = tmp_path_factory.mktemp("demo") / "ws"
    # a small toy town and a few seconds of training: the sequence, not the quality, is under test
    return ws, demo(ws, toy_per_city=30, minutes=0.05, eval_samples=8, upscaler_steps=20, progress=False)


def test_demo_trains_only_on_the_exteriors_it_selected(demo_result):
    ws, _ = demo_result
    kinds = {}
    with open(ws / "toytown" / "labels.csv") as f:
        next(f)
        for line in f:
            file, _city, kind = line.strip().split(",")
            kinds[file] = kind
    con = catalog.connect(ws / "catalog.sqlite")
    rows = con.execute("SELECT path, selected FROM photos WHERE status = 'kept'").fetchall()
    con.close()
    selected_kinds = {kinds[r["path"].rsplit("/", 1)[-1]] for r in rows if r["selected"]}
    assert selected_kinds == {"exterior"}


def test_demo_writes_a_run_metrics_and_a_report(demo_result):
    ws, result = demo_result
    assert (result.run_dir / "checkpoints" / "latest.json").is_file()
    assert result.metrics["n_generated"] == 8 and result.metrics["quality"]["kid"]["std"] >= 0
    assert result.report.is_file() and result.report.stat().st_size > 10_000
    assert json.loads((result.run_dir / "config.json").read_text())["model"] == "projected"


def test_demo_ends_with_the_command_that_serves_its_run(demo_result):
    ws, result = demo_result
    assert result.serve_command.startswith("neighbourhoods serve --workspace ")
    assert "--run demo" in result.serve_command
    assert result.describe().rstrip().endswith(result.serve_command)


def test_demo_labels_without_data_is_a_one_line_error(capsys):
    assert main(["demo", "--labels", "x.csv"]) == 2
    assert capsys.readouterr().err.strip() == "error: --labels needs --data (the built-in toy town has its own labels)"
