"""ONNX replicas: `export --format onnx`, then generate and serve with onnxruntime and no torch,
within 1/255 of the eager generator, with the novelty guard and the upscaler."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from neighbourhoods.cli import main
from neighbourhoods.core.latents import latents
from neighbourhoods.core.workspace import open_workspace
from neighbourhoods.models import runs

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def replica(served_run, tmp_path_factory):
    ws, run = served_run
    out = tmp_path_factory.mktemp("replica") / "tiny.onnx"
    assert main(["export", "-w", str(ws), "--run", run, "--out", str(out), "--format", "onnx", "--json"]) == 0
    return ws, run, out


def test_export_writes_the_replica_and_measures_it(replica):
    ws, run, out = replica
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["format"] == "onnx" and meta["noise"] == "core.latents"
    for suffix in (".onnx", ".guard.onnx", ".guard.npz"):
        assert out.with_suffix(suffix).is_file()
    from neighbourhoods.export import export_onnx
    result = export_onnx(ws, run, out)
    assert result["max_abs_diff"] <= 1                       # pixels within 1/255 of the eager generator
    assert result["guard_max_similarity_diff"] < 0.03        # fp32 here, bf16 (where native) in the eager guard
    assert result["realism_max_rel_diff"] < 0.05             # the realism gate: the same sets and thresholds


def test_the_replicas_realism_gate_is_the_runs(replica):
    from neighbourhoods.thumbnails.guard import load_guard
    from neighbourhoods.thumbnails.replica import load_replica_guard, load_replica_source
    from neighbourhoods.thumbnails.source import load_source

    ws, run, out = replica
    eager = load_guard(ws, load_source(ws, run), progress=False).realism
    onnx = load_replica_guard(out).realism
    assert np.array_equal(eager.thresholds, onnx.thresholds) and np.array_equal(eager.own, onnx.own)
    assert all(np.array_equal(a, b) for a, b in zip(eager.members, onnx.members))
    source = load_replica_source(out)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["guard"]["realism"]["quantile"] == 0.2 and len(meta["guard"]["realism"]["classes"]) == len(
        source.class_names)
    assert load_replica_guard(out, realism=False).realism is None


def test_replica_samples_match_the_eager_generator(replica):
    ws, run, out = replica
    from neighbourhoods.thumbnails.replica import load_replica_source

    gen = runs.load_generator(runs.resolve_run(open_workspace(ws), run))
    seeds = [0, 7, 2**40 + 3, 2**63 - 1]
    classes = [i % len(gen.class_names) for i in range(len(seeds))]
    eager = runs.sample(gen, classes, seeds)
    got = load_replica_source(out).sample(classes, seeds)
    assert np.abs(eager.astype(int) - got.astype(int)).max() <= 1


def test_latents_are_a_function_of_the_whole_seed():
    a, b = latents([5, 5 + 2**32], 16)
    assert not np.array_equal(a, b)                           # torch's generator kept only the low 32 bits
    assert np.array_equal(latents([5], 16)[0], a)


REPLICA_SCRIPT = """
import sys
from fastapi.testclient import TestClient
from neighbourhoods.cli import main
from neighbourhoods.core.urls import Thumb, canonical_path
from neighbourhoods.serve import ServeConfig, build, create_app
out, city, folder = sys.argv[1], sys.argv[2], sys.argv[3]
assert main(["generate", "--run", out, "--city", city, "-n", "3", "--out", folder]) == 0
thumbs = build(None, out, ServeConfig())                     # guard on, no workspace
with TestClient(create_app(thumbs), follow_redirects=False) as c:
    r = c.get(canonical_path(Thumb(city, 5, "256x192", "jpg")))
    assert r.status_code == 200 and r.content[:2] == b"\\xff\\xd8", r.text
    health = c.get("/healthz").json()
    assert health["novelty_guard"] is True, health
    assert health["generator_workers"] == 1, health          # onnxruntime: one worker is faster (docs/serve.md)
print("torch imported:", "torch" in sys.modules, "upscale:", thumbs.upscaler.name)
"""


def test_generate_and_serve_from_the_replica_import_no_torch(replica, tmp_path):
    ws, run, out = replica
    city = json.loads(out.with_suffix(".json").read_text())["class_names"][0]
    done = subprocess.run([sys.executable, "-c", REPLICA_SCRIPT, str(out), city, str(tmp_path / "thumbs")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch imported: False" in done.stdout, done.stdout
    assert len(list((tmp_path / "thumbs").rglob("*.jpg"))) >= 3


def test_a_replica_without_its_guard_files_says_so(replica, tmp_path, capsys):
    import shutil

    ws, run, out = replica
    copy = tmp_path / out.name
    shutil.copy(out, copy)
    shutil.copy(out.with_suffix(".json"), copy.with_suffix(".json"))
    assert main(["generate", "--run", str(copy), "--city", "x", "-n", "1", "--out", str(tmp_path / "o")]) == 2
    assert "has no novelty guard" in capsys.readouterr().err


def test_the_replica_carries_the_workspaces_espcn_upscaler(served_run, tmp_path):
    import shutil

    ws, run = served_run
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy)
    from neighbourhoods.upscale import ensure_sr
    ensure_sr(copy, steps=3, progress=False)
    out = tmp_path / "sr.onnx"
    from neighbourhoods.export import export_onnx
    result = export_onnx(copy, run, out)
    assert out.with_suffix(".sr.onnx").is_file() and result["upscale"]["name"] == "espcn"
    assert result["upscale_max_abs_diff"] <= 1
    from neighbourhoods.thumbnails.replica import load_replica_upscaler
    up = load_replica_upscaler(out)
    assert up.name == "espcn" and up.fingerprint.startswith("onnx-espcn:")


@pytest.mark.parametrize("res, kwargs", [((48, 64), {}), ((64, 64), {}), ((96, 128), {}), ((192, 256), {}),
                                         ((96, 128), {"cond_from": 1, "z_skip": True})])
def test_the_default_model_exports_to_onnx_exactly(tmp_path, res, kwargs):
    """The projected generator (BatchNorm after a reshape, the noise maps, SLE) as ONNX, at every
    website resolution (at 96x128 the 6 x 8 map's non-uniform SLE pooling once broke the export),
    and with skip-z (z concatenated into every conditional BatchNorm's input)."""
    import torch

    from neighbourhoods.export import _onnx, _wrapper
    from neighbourhoods.models import projected
    from neighbourhoods.models.generator import ConditionalBatchNorm
    from neighbourhoods.thumbnails.replica import _session

    torch.manual_seed(0)
    G = projected.Generator(num_classes=3, res=res, z_dim=16, embed_dim=8, max_channels=16, min_channels=8,
                            **kwargs).eval()
    for norm in (m for m in G.modules() if isinstance(m, ConditionalBatchNorm)):
        norm.gain.weight.data.normal_(0, 0.1)   # off their zero start, so the city (and z) reach every level
        norm.bias.weight.data.normal_(0, 0.1)
    z = torch.from_numpy(latents([1, 2, 3], G.z_dim))
    labels = torch.tensor([0, 1, 2])
    _onnx(_wrapper(G), (z, labels), tmp_path / "g.onnx", ["z", "labels"], ["images"],
          {"z": {0: "n"}, "labels": {0: "n"}, "images": {0: "n"}})
    with torch.no_grad():
        eager = _wrapper(G)(z, labels).numpy()
    got = _session(tmp_path / "g.onnx").run(None, {"z": z.numpy(), "labels": labels.numpy()})[0]
    assert got.shape == (3, *res, 3) and np.abs(eager.astype(int) - got.astype(int)).max() <= 1
