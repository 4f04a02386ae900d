"""Toy town: the built-in dataset every stage can be demonstrated and tested on."""

from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from neighbourhoods.demo.toytown import SIZE, draw_toytown


def _rows(labels_csv):
    with open(labels_csv, newline="") as f:
        return list(csv.DictReader(f))


def _pixels(photos, rows):
    return np.stack([np.asarray(Image.open(photos / r["file"]).convert("RGB"), np.float32) for r in rows])


def test_same_arguments_draw_the_same_bytes(tmp_path):
    a_photos, a_csv = draw_toytown(tmp_path / "a", cities=("Pinecrest", "Sunvale"), per_city=6, seed=3)
    b_photos, b_csv = draw_toytown(tmp_path / "b", cities=("Pinecrest", "Sunvale"), per_city=6, seed=3)
    assert a_csv.read_bytes() == b_csv.read_bytes()
    for row in _rows(a_csv):
        assert (a_photos / row["file"]).read_bytes() == (b_photos / row["file"]).read_bytes()


def test_another_seed_draws_other_houses(tmp_path):
    a_photos, a_csv = draw_toytown(tmp_path / "a", cities=("Sunvale",), per_city=4, seed=0)
    b_photos, _ = draw_toytown(tmp_path / "b", cities=("Sunvale",), per_city=4, seed=1)
    first = _rows(a_csv)[0]["file"]
    assert (a_photos / first).read_bytes() != (b_photos / first).read_bytes()


def test_every_photo_is_labelled_with_city_and_kind(tmp_path):
    photos, labels_csv = draw_toytown(tmp_path, cities=("Pinecrest", "Sunvale", "Harborview"), per_city=20)
    rows = _rows(labels_csv)
    assert sorted(p.name for p in photos.iterdir()) == sorted(r["file"] for r in rows)
    assert {r["city"] for r in rows} == {"Pinecrest", "Sunvale", "Harborview"}
    for city in ("Pinecrest", "Sunvale", "Harborview"):
        kinds = [r["kind"] for r in rows if r["city"] == city]
        assert len(kinds) == 20
        assert {"exterior", "interior", "floorplan"} <= set(kinds)
        assert kinds.count("exterior") > len(kinds) / 2   # mostly exteriors, like a listing feed
    assert all(Image.open(photos / r["file"]).size == SIZE for r in rows)


def test_exteriors_differ_more_between_cities_than_within(tmp_path):
    photos, labels_csv = draw_toytown(tmp_path, cities=("Pinecrest", "Sunvale"), per_city=20)
    rows = [r for r in _rows(labels_csv) if r["kind"] == "exterior"]
    colour = {city: _pixels(photos, [r for r in rows if r["city"] == city]).mean(axis=(1, 2))
              for city in ("Pinecrest", "Sunvale")}   # mean RGB per photo
    between = np.linalg.norm(colour["Pinecrest"].mean(0) - colour["Sunvale"].mean(0))
    within = max(colour[c].std(0).mean() for c in colour)
    assert between > 3 * within


def test_exteriors_vary_within_a_city(tmp_path):
    photos, labels_csv = draw_toytown(tmp_path, cities=("Harborview",), per_city=20)
    ext = _pixels(photos, [r for r in _rows(labels_csv) if r["kind"] == "exterior"])
    # pairwise differences are large: not one house with noise on top
    diffs = [np.abs(ext[i] - ext[j]).mean() for i in range(len(ext)) for j in range(i + 1, len(ext))]
    assert min(diffs) > 5


def test_floorplans_are_line_drawings_and_interiors_are_not(tmp_path):
    photos, labels_csv = draw_toytown(tmp_path, cities=("Pinecrest", "Sunvale"), per_city=20)
    rows = _rows(labels_csv)
    white = {kind: (_pixels(photos, [r for r in rows if r["kind"] == kind]).min(axis=3) > 225).mean()
             for kind in ("exterior", "interior", "floorplan")}
    assert white["floorplan"] > 0.8
    assert white["interior"] < 0.4 and white["exterior"] < 0.4


def test_unknown_city_gets_a_style_of_its_own(tmp_path):
    photos, labels_csv = draw_toytown(tmp_path, cities=("Springfield",), per_city=5)
    assert {r["city"] for r in _rows(labels_csv)} == {"Springfield"}
    assert len(list(photos.iterdir())) == 5


def test_drawing_again_leaves_the_files_untouched(tmp_path):
    photos, labels_csv = draw_toytown(tmp_path, cities=("Sunvale",), per_city=5)
    before = {p.name: p.stat().st_mtime_ns for p in [*photos.iterdir(), labels_csv]}
    draw_toytown(tmp_path, cities=("Sunvale",), per_city=5)
    assert {p.name: p.stat().st_mtime_ns for p in [*photos.iterdir(), labels_csv]} == before
