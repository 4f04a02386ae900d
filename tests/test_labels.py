"""Labels: listing-keyed tables (real exports), joined label columns, and label files that are
broken in the ways real exports are, each reported as a label problem, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.ingest.labels import key_matcher, read_labels
from tests.test_ingest import photo, rows, run, save


def listing_photos(tmp_path):
    """Photos named <house_id>_<n>.jpg, as a listing export names them, plus two odd names."""
    d = tmp_path / "photos"
    for house, n in ((1, 2), (2, 2), (3, 1), (10, 1), (99, 1)):
        for i in range(1, n + 1):
            save(photo(seed=house * 10 + i), d / f"{house}_{i}.jpg", quality=90)
    save(photo(seed=7), d / "frontview.jpg", quality=90)   # no key in the name
    return d


LISTINGS = ("house_id,bedrooms,city,state,price\n"
            "1,4,Scottsdale,AZ,869500\n"
            "2,3,,,865200\n"                 # zip code unknown: no city (as in houses.csv)
            "3,2,Alpine,CA,500000\n"
            "10,5,Alpine,CA,600000\n"
            "4,3,Acton,CA,400000\n")        # a listing with no photo


def test_listings_keyed_by_house_id_with_joined_columns_and_every_mismatch_reported(tmp_path):
    d = listing_photos(tmp_path)
    (tmp_path / "houses.csv").write_text(LISTINGS)
    summary = run(d, tmp_path / "ws", labels=tmp_path / "houses.csv", key_column="house_id",
                  label_column=["city", "state"], key_pattern="{key}_*.jpg")
    r = rows(tmp_path / "ws")
    assert r["1_1.jpg"]["label"] == r["1_2.jpg"]["label"] == "Scottsdale, AZ"
    assert r["3_1.jpg"]["label"] == r["10_1.jpg"]["label"] == "Alpine, CA"    # 1 is not a prefix match of 10
    assert r["2_1.jpg"]["label"] is None and r["99_1.jpg"]["label"] is None
    assert summary.labels == {"Alpine, CA": 2, "Scottsdale, AZ": 2}
    assert summary.no_key_files == ["frontview.jpg"]
    assert summary.unmatched_labels == ["4"]                                   # listing 4 has no photo
    assert sorted(summary.unlabelled_files) == ["2_1.jpg", "2_2.jpg", "99_1.jpg", "frontview.jpg"]
    assert summary.malformed_label_rows == ["line 3: empty city, state for house_id 2"]
    text = summary.describe()
    assert "keyed by house_id" in text and "1 file names give no house_id" in text
    assert "1 listings have no photo (house_id 4)" in text
    assert summary.to_json()["no_key_files"] == 1


def test_key_from_a_regular_expression_and_the_default_pattern(tmp_path):
    d = listing_photos(tmp_path)
    (tmp_path / "houses.csv").write_text(LISTINGS)
    by_regex = run(d, tmp_path / "ws1", labels=tmp_path / "houses.csv", key_column="house_id",
                   key_pattern=r"^(\d+)_\d+\.jpg$")
    by_default = run(d, tmp_path / "ws2", labels=tmp_path / "houses.csv", key_column="house_id")
    assert by_regex.labels == by_default.labels == {"Alpine": 2, "Scottsdale": 2}
    assert by_regex.no_key_files == by_default.no_key_files == ["frontview.jpg"]


@pytest.mark.parametrize("pattern, name, key", [
    ("{key}_*.jpg", "12_3.jpg", "12"), ("{key}_*.jpg", "12_3.JPG", "12"), ("{key}_*.jpg", "12.jpg", None),
    ("{key}.*", "A-7.png", "A-7"), ("listing-{key}-?.jpg", "listing-x9-2.jpg", "x9"),
    (r"(\d+)", "img_0042_b.jpg", "0042"), ("{key}/*", "55/front.jpg", "55"),
])
def test_key_patterns(pattern, name, key):
    assert key_matcher(pattern)(name) == key


@pytest.mark.parametrize("pattern, message", [
    ("(a)(b)", "exactly one group"), ("no-group", "exactly one group"), ("{key}{key}", "once"),
    ("([", "neither a glob"),
])
def test_bad_key_patterns_are_one_line_errors(tmp_path, pattern, message):
    (tmp_path / "houses.csv").write_text(LISTINGS)
    with pytest.raises(NeighbourhoodsError, match=message):
        read_labels(tmp_path / "houses.csv", key_column="house_id", key_pattern=pattern)


def test_key_options_need_a_listings_table(tmp_path):
    with pytest.raises(NeighbourhoodsError, match="need a listings table"):
        read_labels(None, key_column="house_id")
    (tmp_path / "houses.csv").write_text(LISTINGS)
    with pytest.raises(NeighbourhoodsError, match="needs --key-column"):
        read_labels(tmp_path / "houses.csv", key_pattern="{key}_*")
    with pytest.raises(NeighbourhoodsError, match="no column 'listing'.*house_id"):
        read_labels(tmp_path / "houses.csv", key_column="listing")


def test_the_cli_takes_repeated_label_columns_and_a_key(tmp_path):
    d = listing_photos(tmp_path)
    (tmp_path / "houses.csv").write_text(LISTINGS)
    out = subprocess.run([sys.executable, "-m", "neighbourhoods", "ingest", str(d), "-w", str(tmp_path / "ws"),
                          "--labels", str(tmp_path / "houses.csv"), "--key-column", "house_id",
                          "--label-column", "city", "--label-column", "state", "--res", "32x32",
                          "--min-side", "16", "--workers", "1", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["labels"] == {"Alpine, CA": 2, "Scottsdale, AZ": 2} and summary["label_key"] == "house_id"


def test_the_houses_collection_keyed_by_house_id(shared_data, tmp_path):
    """../shared/data/houses: houses.csv keyed by house_id, photos <house_id>_<n>.jpg."""
    import csv

    houses = shared_data / "houses"
    with open(houses / "houses.csv", newline="") as f:
        table = {r["house_id"]: r for r in csv.DictReader(f)}
    summary = run(houses / "images", tmp_path / "ws", labels=houses / "houses.csv", key_column="house_id",
                  label_column=["city", "state"], workers=2)
    con_rows = rows(tmp_path / "ws")
    assert len(con_rows) == 2140 and not summary.no_key_files and not summary.unmatched_labels
    for name, r in con_rows.items():
        listing = table[name.split("_")[0]]
        expected = f"{listing['city']}, {listing['state']}" if listing["city"] else None
        assert r["label"] == expected, name
    no_city = {k for k, r in table.items() if not r["city"]}
    assert sorted(summary.unlabelled_files) == sorted(n for n in con_rows if n.split("_")[0] in no_city)
    assert len(summary.malformed_label_rows) == len(no_city) > 0   # each reported: "line N: empty city, state"


# --- label files broken as real exports are ----------------------------------------------------
def labelled(tmp_path):
    d = tmp_path / "photos"
    for i in range(3):
        save(photo(seed=300 + i), d / f"p{i}.jpg", quality=90)
    return d


def test_a_huge_cell_is_a_malformed_row(tmp_path):
    d = labelled(tmp_path)
    (tmp_path / "l.csv").write_text("file,city\np0.jpg,Oakdale\np1.jpg," + "x" * 5_000_000 + "\np2.jpg,Oakdale\n")
    summary = run(d, tmp_path / "ws", labels=tmp_path / "l.csv")
    assert summary.labels == {"Oakdale": 2}
    assert summary.malformed_label_rows == ["line 3: label of 5,000,000 characters for file p1.jpg"]


def test_control_characters_and_missing_value_spellings_are_not_cities(tmp_path):
    d = labelled(tmp_path)
    (tmp_path / "l.csv").write_bytes(b"file,city\np0.jpg,Oak\x00dale\np1.jpg,NaN\np2.jpg,Seaside\n")
    summary = run(d, tmp_path / "ws", labels=tmp_path / "l.csv")
    assert summary.labels == {"Seaside": 1}
    assert [m.split(":")[0] for m in summary.malformed_label_rows] == ["line 2", "line 3"]
    assert "control character" in summary.malformed_label_rows[0]


def test_cp1252_labels_keep_their_quotes_and_dashes(tmp_path):
    d = labelled(tmp_path)
    (tmp_path / "l.csv").write_bytes("file,city\np0.jpg,Rancho Santa Fe \u2013 Covenant\np1.jpg,O\u2019Neill\n"
                                     .encode("cp1252"))
    summary = run(d, tmp_path / "ws", labels=tmp_path / "l.csv")
    assert summary.labels == {"O\u2019Neill": 1, "Rancho Santa Fe \u2013 Covenant": 1}


@pytest.mark.parametrize("doc, message", [
    ({"labels": 5}, 'no "labels" list'), ([1, 2], 'no "labels" list'),
])
def test_dataset_json_of_the_wrong_shape_is_one_line(tmp_path, doc, message):
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(NeighbourhoodsError, match=message):
        read_labels(tmp_path / "dataset.json")


def test_deeply_nested_dataset_json_is_one_line(tmp_path):
    (tmp_path / "dataset.json").write_text('{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(NeighbourhoodsError, match="nested too deeply"):
        read_labels(tmp_path / "dataset.json")


def test_dataset_json_labels_must_be_classes(tmp_path):
    (tmp_path / "dataset.json").write_text(
        '{"labels": [["a.jpg", 1], ["b.jpg", 1.5], ["c.jpg", "7"], ["d.jpg", NaN], ["e.jpg", 2], ["f.jpg", true]]}')
    table = read_labels(tmp_path / "dataset.json")
    assert table.entries == {"a.jpg": "1", "e.jpg": "2"}
    assert [m.split(":")[0] for m in table.malformed] == ["entry 1", "entry 2", "entry 3", "entry 5"]
    assert "string where the other labels are integers" in table.malformed[1] and "NaN" in table.malformed[2]
    (tmp_path / "names.json").write_text('{"labels": [["a.jpg", "Oakdale"], ["b.jpg", "7"]]}')
    assert read_labels(tmp_path / "names.json").entries == {"a.jpg": "Oakdale", "b.jpg": "7"}   # names only: fine
