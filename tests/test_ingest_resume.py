"""A kill -9 at any moment leaves a workspace the next run completes to exactly the result of
an uninterrupted run: same catalog rows, same labels.json, byte-identical arrays."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from neighbourhoods.demo.toytown import draw_toytown
from neighbourhoods.ingest import ingest

RES = ["64x64", "48x64"]


def _cmd(photos, labels, ws, workers):
    cmd = [sys.executable, "-m", "neighbourhoods", "ingest", str(photos), "--workspace", str(ws),
           "--labels", str(labels), "--workers", str(workers), "--json"]
    for r in RES:
        cmd += ["--res", r]
    return cmd


def _decoded(ws, where: str = "status != 'pending'") -> int:
    """Rows of the catalog matching `where` (default: photos decoded so far)."""
    try:
        con = sqlite3.connect(f"file:{ws / 'catalog.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(f"SELECT COUNT(*) FROM photos WHERE {where}").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0   # not created yet


def _snapshot(ws) -> dict:
    con = sqlite3.connect(ws / "catalog.sqlite")
    try:
        photos = con.execute("SELECT * FROM photos ORDER BY id").fetchall()
    finally:
        con.close()
    snap = {"photos": photos, "labels.json": (ws / "labels.json").read_bytes()}
    for r in RES:
        for name in ("images.npy", "photo_ids.npy"):
            snap[f"{r}/{name}"] = (ws / "prepared" / r / name).read_bytes()
    return snap


def _collection(tmp_path, per_city=100):
    photos, labels = draw_toytown(tmp_path / "toy", cities=("Pinecrest", "Sunvale", "Harborview", "Brickton"),
                                  per_city=per_city, seed=5)
    shutil.copy(photos / "0001.jpg", photos / "9001.jpg")            # a duplicate to decide
    (photos / "9002.jpg").write_bytes((photos / "0002.jpg").read_bytes()[:700])  # a truncated file
    (photos / "9003.txt").write_text("not a photo")
    return photos, labels


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    photos, labels = _collection(tmp_path, per_city=60)
    reference = tmp_path / "reference"
    ingest(photos, reference, labels=labels, res=[(64, 64), (48, 64)], workers=1, progress=False)

    ws = tmp_path / "interrupted"
    # 1. kill -9 in the middle of decoding, as soon as some results are committed
    proc = subprocess.Popen(_cmd(photos, labels, ws, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while _decoded(ws) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "ingest finished before it could be killed"
    partial = _decoded(ws)
    assert 0 < partial < 243

    # 2. more kills at seeded random moments (start-up, decoding, deciding, writing arrays)
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen(_cmd(photos, labels, ws, rng.choice([1, 2])),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 2.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    # 3. an uninterrupted run completes the workspace
    done = subprocess.run(_cmd(photos, labels, ws, 2), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _snapshot(ws) == _snapshot(reference)
    # no temporary files of interrupted writes are left behind (the lock file stays: it is the lock)
    leftovers = [p.name for p in ws.rglob(".*") if p.is_file() and p.name != ".lock"]
    assert leftovers == []


def test_ctrl_c_stops_with_one_line_and_the_next_run_completes(tmp_path):
    photos, labels = _collection(tmp_path, per_city=50)
    ws = tmp_path / "ws"
    # a new session stands in for the terminal: Ctrl-C signals the whole process group
    proc = subprocess.Popen(_cmd(photos, labels, ws, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    # Ctrl-C as soon as discovery has committed the pending rows: decoding is starting. (Waiting
    # for the first decoded photo raced the end of the whole run on a fast moment.)
    deadline = time.monotonic() + 60
    while _decoded(ws, "1") == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().endswith("interrupted")
    done = subprocess.run(_cmd(photos, labels, ws, 2), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["files"] == 203


_CTRL_C_DURING_FORK = """
import os, signal, sys
from neighbourhoods.ingest import _start_pool
# the Ctrl-C lands exactly while the main thread forks a worker: inside CPython's at-fork hooks
os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGINT))
try:
    pool = _start_pool("fork", 2)
except KeyboardInterrupt:
    sys.exit(130)
pool.terminate()
"""


@pytest.mark.skipif(not hasattr(os, "register_at_fork") or not hasattr(signal, "pthread_sigmask"),
                    reason="needs fork and POSIX signal masks")
def test_ctrl_c_while_the_pool_forks_is_not_lost():
    # Unguarded, the KeyboardInterrupt raised in the at-fork hook is printed and dropped, and the
    # ingest went on to exit 0 (the race the test above once hit).
    run = subprocess.run([sys.executable, "-c", _CTRL_C_DURING_FORK], capture_output=True, text=True, timeout=60)
    assert run.returncode == 130, run.stderr
    assert "Exception ignored" not in run.stderr
