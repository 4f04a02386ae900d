"""Training interrupted for real, in a separate process: kill -9 at an unplanned moment and
Ctrl-C, each followed by a resume that ends bit-identical to an uninterrupted run (weights and
metrics.jsonl), for the default model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_train import TINY
from toy_run import make_toy_workspace

from neighbourhoods.models import runs

KIMG = "0.048"
FLAGS = ["--model", "projected", "--res", "32x32", "--batch", "8", "--min-city-photos", "5",
         "--model-kwargs", json.dumps(TINY["projected"]), "--snapshot-every", "16", "--sample-every", "16",
         "--tick-every", "8", "--threads", "1", "--quiet", "--no-upscaler"]
CLOCK_KEYS = ("time", "per_s", "sec", "wall")     # how fast, not what: differs run to run


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_toy_workspace(tmp_path_factory.mktemp("signals"), res=((32, 32),))


def train_cmd(ws, name, *extra):
    return [sys.executable, "-m", "neighbourhoods", "train", "-w", str(ws), *FLAGS, "--name", name, *extra]


@pytest.fixture(scope="module")
def reference(ws):
    out = subprocess.run(train_cmd(ws, "whole", "--kimg", KIMG), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return ws / "runs" / "whole"


def _wait_for_checkpoint(run: Path, proc, images: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if runs.latest_checkpoint(run)[1] >= images:
                return
        except Exception:
            pass
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at {images} images (exit {proc.poll()})")


def _metrics(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not any(c in k for c in CLOCK_KEYS)} for m in lines]


def _same_run(a: Path, b: Path) -> None:
    ca, cb = runs.latest_checkpoint(a)[0], runs.latest_checkpoint(b)[0]
    assert ca.name == cb.name
    for net in ("G", "G_ema", "D"):
        wa, wb = load_file(str(ca / f"{net}.safetensors")), load_file(str(cb / f"{net}.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:                                      # buffers too: BatchNorm statistics, the EMA
            assert (wa[k] == wb[k]).all(), f"{net}.{k} differs"
    assert _metrics(a) == _metrics(b)


def test_kill_9_mid_training_then_resume_is_bit_identical(ws, reference):
    run = ws / "runs" / "kill9"
    proc = subprocess.Popen(train_cmd(ws, "kill9", "--kimg", KIMG), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for_checkpoint(run, proc, 16)
        time.sleep(0.05)                                  # somewhere in the steps after it, unplanned
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    out = subprocess.run(train_cmd(ws, "kill9", "--kimg", KIMG, "--resume"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    _same_run(reference, run)


def test_ctrl_c_checkpoints_and_stops_then_resume_is_bit_identical(ws, reference):
    run = ws / "runs" / "ctrlc"
    proc = subprocess.Popen(train_cmd(ws, "ctrlc", "--kimg", KIMG), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_checkpoint(run, proc, 16)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err[-2000:]
    stopped_at = runs.latest_checkpoint(run)[1]
    assert stopped_at >= 16                                      # it saved where it stopped
    out = subprocess.run(train_cmd(ws, "ctrlc", "--kimg", KIMG, "--resume"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    _same_run(reference, run)
