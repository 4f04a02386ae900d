"""The workspace lock: one writer at a time, a one-line refusal naming the holder, released
when the holder dies (kill -9 included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from neighbourhoods.cli import main
from neighbourhoods.core.locks import WorkspaceBusy, training_run, writing_workspace
from neighbourhoods.demo.toytown import draw_toytown


@pytest.fixture
def town(tmp_path) -> tuple[Path, Path, Path]:
    photos, labels = draw_toytown(tmp_path / "town", cities=("Pinecrest", "Sunvale"), per_city=6)
    return photos, labels, tmp_path / "ws"


def holder(code: str) -> subprocess.Popen:
    """A separate process running `code` (which holds a lock), once it says it holds it."""
    script = textwrap.dedent(code) + "\nprint('held', flush=True)\nimport time; time.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def ingest_cli(photos: Path, labels: Path, ws: Path) -> list[str]:
    return ["ingest", str(photos), "-w", str(ws), "--labels", str(labels), "--res", "32x32", "--workers", "1",
            "--json"]


def test_a_second_writer_is_refused_in_one_line_naming_the_holder_until_it_is_killed(town, capsys):
    photos, labels, ws = town
    ws.mkdir()
    proc = holder(f"""
        from neighbourhoods.core.locks import writing_workspace
        lock = writing_workspace({str(ws)!r}, "ingest")
        lock.__enter__()
    """)
    try:
        assert main(ingest_cli(photos, labels, ws)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert err.startswith("error: workspace") and f"PID {proc.pid} (ingest, since " in err
        assert not (ws / "catalog.sqlite").exists()            # nothing was touched
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert main(ingest_cli(photos, labels, ws)) == 0          # the kernel released it with the process


def test_ingest_is_refused_while_a_run_trains_and_runs_train_side_by_side(town, capsys):
    photos, labels, ws = town
    assert main(ingest_cli(photos, labels, ws)) == 0
    capsys.readouterr()
    proc = holder(f"""
        from neighbourhoods.core.locks import training_run
        lock = training_run({str(ws)!r}, {str(ws / "runs" / "first")!r})
        lock.__enter__()
    """)
    try:
        assert main(ingest_cli(photos, labels, ws)) == 2
        err = capsys.readouterr().err
        assert f"PID {proc.pid} (train, since " in err and "training run 'first'" in err
        with training_run(ws, ws / "runs" / "second"):      # another run may train beside it
            pass
        with pytest.raises(WorkspaceBusy, match=f"run 'first' is in use by PID {proc.pid}"):
            with training_run(ws, ws / "runs" / "first"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with writing_workspace(ws, "ingest"):
        pass


def test_a_file_where_a_folder_should_be_is_a_one_line_error(town, tmp_path, capsys):
    photos, labels, _ = town
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(ingest_cli(photos, labels, blocker)) == 2
    assert main(ingest_cli(photos, labels, blocker / "ws")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot use {blocker} as the workspace folder: {blocker} is a file",
                   f"error: cannot use {blocker / 'ws'} as the workspace folder: {blocker} is a file"]
