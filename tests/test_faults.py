"""Faults an operator meets, each a one-line `error:` with exit 2 that says what to do, and a
workspace left as it was or resumable: a full disk (a real small tmpfs where the tests run as
root, else an injected ENOSPC), a damaged catalog, half-renamed arrays, the workspace inside the
photos folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neighbourhoods.cli import main
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.demo.toytown import draw_toytown


def cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neighbourhoods", *map(str, argv)], capture_output=True, text=True)


def one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2 and exactly one `error:` line, the last thing printed (progress bars may precede it)."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [line for line in out.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in out.stderr and lines and lines[-1].startswith("error: "), out.stderr[-2000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, out.stderr[-2000:]
    for w in words:
        assert w in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    photos, labels = draw_toytown(root / "toy", per_city=6)
    return photos, labels


def ingest_args(photos, labels, ws):
    return ["ingest", photos, "-w", ws, "--labels", labels, "--res", "48x64", "--workers", "1"]


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_full_disk_during_ingest_is_one_line_and_a_rerun_finishes_the_same(toy, tmp_path):
    photos, labels = toy
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "160k"):
        pytest.skip("needs root and tmpfs for a real full disk")
    try:
        out = cli(*ingest_args(photos, labels, disk / "ws"))
        one_line_error(out, "space", "run the same command again")
        assert not [p for p in disk.rglob("*") if ".tmp" in p.name], "temporary files of the failed write are removed"
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert cli(*ingest_args(photos, labels, disk / "ws")).returncode == 0
        assert cli(*ingest_args(photos, labels, tmp_path / "clean")).returncode == 0
        for name in ("images.npy", "photo_ids.npy"):
            assert np.array_equal(np.load(disk / "ws" / "prepared" / "48x64" / name),
                                  np.load(tmp_path / "clean" / "prepared" / "48x64" / name))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_arrays_larger_than_the_free_space_are_refused_before_writing(toy, tmp_path, monkeypatch):
    photos, labels = toy
    from neighbourhoods.core import errors

    monkeypatch.setattr(errors, "_free_mb", lambda where: 0.01)
    with pytest.raises(NeighbourhoodsError, match="not enough space for the 48x64 arrays"):
        from neighbourhoods.ingest import ingest
        ingest(photos, tmp_path / "ws", labels=labels, res=[(48, 64)], workers=1, progress=False)
    assert not list((tmp_path / "ws" / "prepared").rglob("*.npy"))


def test_a_checkpoint_that_cannot_be_written_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import safetensors.torch
    from torch import nn

    from neighbourhoods.models import runs

    def full(*a, **kw):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" })")   # safetensors' own words

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(NeighbourhoodsError, match="no space left.*checkpoint 0000000064"):
        runs.save_checkpoint(tmp_path / "run", 64, {"G": nn.Linear(2, 2)}, {}, keep=2)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_a_damaged_catalog_is_one_line_for_every_verb(toy, tmp_path, damage):
    photos, labels = toy
    ws = tmp_path / "ws"
    assert cli(*ingest_args(photos, labels, ws)).returncode == 0
    catalog = ws / "catalog.sqlite"
    for side in ("-wal", "-shm"):
        Path(str(catalog) + side).unlink(missing_ok=True)
    data = catalog.read_bytes()
    catalog.write_bytes(os.urandom(len(data)) if damage == "random bytes" else data[: len(data) // 3])
    for argv in (ingest_args(photos, labels, ws), ["cluster", "-w", ws, "--res", "64"],
                 ["train", "-w", ws, "--res", "48x64", "--kimg", "0.01"],
                 ["select", "-w", ws, "--list"]):
        one_line_error(cli(*argv), "damaged", "restore it from a backup")


def test_prepared_arrays_half_renamed_by_a_kill(toy, tmp_path):
    photos, labels = toy
    ws = tmp_path / "ws"
    assert cli(*ingest_args(photos, labels, ws)).returncode == 0
    (ws / "prepared" / "48x64" / "photo_ids.npy").unlink()      # images.npy renamed into place, photo_ids not
    one_line_error(cli("train", "-w", ws, "--res", "48x64", "--kimg", "0.01"), "incomplete", "rerun")
    assert cli(*ingest_args(photos, labels, ws)).returncode == 0   # the rerun finishes it
    assert (ws / "prepared" / "48x64" / "photo_ids.npy").is_file()


def test_the_workspace_cannot_be_the_photos_folder(toy, tmp_path):
    photos, labels = toy
    copy = tmp_path / "photos"
    shutil.copytree(photos, copy)
    one_line_error(cli("ingest", copy, "-w", copy), "cannot be the photos folder")
    assert not (copy / "catalog.sqlite").exists()
    # a workspace *inside* the photos folder is fine: its own files are never ingested
    out = cli("ingest", copy, "-w", copy / "ws", "--res", "48x64", "--workers", "1", "--json")
    assert out.returncode == 0, out.stderr


def test_a_file_in_the_way_of_the_workspace_or_the_output(toy, tmp_path, capsys):
    photos, labels = toy
    (tmp_path / "file").write_text("x")
    assert main(["ingest", str(photos), "-w", str(tmp_path / "file")]) == 2
    assert "error:" in capsys.readouterr().err
