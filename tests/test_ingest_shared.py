"""End-to-end ingest of the real photo collections in ../shared/data (skipped where absent)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from neighbourhoods.core.prepared import load_split
from neighbourhoods.core.workspace import Workspace
from neighbourhoods.ingest import ingest

pytestmark = pytest.mark.slow


def test_ingest_socal_with_listings_csv(shared_data, tmp_path):
    socal = shared_data / "socal"
    summary = ingest(socal / "images", tmp_path / "ws", labels=socal / "listings.csv", file_column="file",
                     label_column="city", res=[(48, 64)], progress=False)
    n_files = len(list((socal / "images").iterdir()))
    assert summary.files == n_files
    assert summary.kept + summary.duplicates + sum(summary.rejected.values()) == n_files
    assert summary.duplicates >= 200            # "several hundred" byte-identical copies
    assert summary.unlabelled == 0 and not summary.malformed_label_rows
    assert len(summary.labels) >= 300 and summary.labels["San Diego, CA"] >= 100
    images = np.load(tmp_path / "ws" / "prepared" / "48x64" / "images.npy", mmap_mode="r")
    assert images.shape == (summary.kept, 48, 64, 3) and images.dtype == np.uint8
    assert 20 < images[:: max(1, summary.kept // 200)].mean() < 235     # real pixels, not a blank array
    names = json.loads((tmp_path / "ws" / "labels.json").read_text())["names"]
    hold = load_split(Workspace(tmp_path / "ws"), (48, 64), "holdout")
    assert 0.05 * summary.kept < len(hold) < 0.12 * summary.kept
    assert names.index("San Diego, CA") in set(hold.labels.tolist())


def test_ingest_houses_with_a_csv_mapping_files_to_cities(shared_data, tmp_path):
    houses = shared_data / "houses"
    city = {r["house_id"]: r["city"] for r in csv.DictReader(open(houses / "houses.csv", newline=""))}
    table = tmp_path / "houses_files.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "city"])
        for p in sorted((houses / "images").iterdir()):
            w.writerow([f"images/{p.name}", city[p.name.split("_")[0]]])
    summary = ingest(houses, tmp_path / "ws", labels=table, res=[(64, 64)], progress=False)
    n_files = len(list((houses / "images").iterdir())) + 1      # + houses.csv itself: accounted for
    assert summary.files == n_files and summary.rejected == {"not-an-image": 1}
    assert summary.duplicates >= 14
    no_city = sum(1 for p in (houses / "images").iterdir() if not city[p.name.split("_")[0]])
    assert len(summary.malformed_label_rows) == no_city            # empty city cells are reported
    assert len(summary.unlabelled_files) == no_city + 1
    assert summary.kept + summary.duplicates == n_files - 1
