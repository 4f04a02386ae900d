"""ingest: every file accounted for, converted or rejected with a reason, duplicates, splits,
prepared arrays, incremental re-runs. Small files the tests make themselves."""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3

import numpy as np
import pytest
from PIL import Image

from neighbourhoods.cli import main
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.prepared import load_split
from neighbourhoods.core.workspace import Workspace
from neighbourhoods.ingest import ingest


def photo(size=(80, 60), seed=0) -> Image.Image:
    """A small photo with structure (gradients + blocks), so hashes and resizes are meaningful."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, rng.integers(0, 255))], axis=-1)
    for _ in range(4):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        arr[y0:y0 + h // 4, x0:x0 + w // 4] = rng.integers(0, 255, 3)
    return Image.fromarray(arr.astype(np.uint8))


def save(img: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def rows(ws):
    con = sqlite3.connect(ws / "catalog.sqlite")
    con.row_factory = sqlite3.Row
    try:
        return {os.path.basename(r["path"]): dict(r) for r in con.execute("SELECT * FROM photos ORDER BY id")}
    finally:
        con.close()


def run(photos, ws, **kw):
    kw.setdefault("res", [(32, 32)])
    kw.setdefault("workers", 1)
    kw.setdefault("min_side", 16)
    return ingest(photos, ws, progress=False, **kw)


# --- bad inputs: rejected with a reason, never a crash ----------------------------------------
@pytest.fixture
def bad_inputs(tmp_path):
    d = tmp_path / "photos"
    save(photo(seed=1), d / "good.jpg", quality=90)
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("three bedrooms, close to the beach\n")
    jpeg = io.BytesIO()
    photo((400, 300), seed=2).save(jpeg, "JPEG", quality=95)
    (d / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    png = io.BytesIO()
    photo((80, 60), seed=3).save(png, "PNG")
    data = bytearray(png.getvalue())
    idat = data.index(b"IDAT")
    data[idat + 8: idat + 40] = b"\x00" * 32          # corrupt the compressed pixel data
    (d / "corrupt.png").write_bytes(bytes(data))
    (d / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200)
    save(photo(seed=4), d / "drawing.eps", format="EPS")
    save(photo((20, 12), seed=5), d / "tiny.png")
    save(Image.new("1", (12_000, 10_000)), d / "bomb.png")  # 120 Mpx, a few kB on disk
    return d


def test_each_bad_input_kind_is_rejected_with_its_reason(bad_inputs, tmp_path):
    summary = run(bad_inputs, tmp_path / "ws")
    got = {name: (r["status"], r["reason"]) for name, r in rows(tmp_path / "ws").items()}
    assert got == {
        "good.jpg": ("kept", None),
        "empty.jpg": ("rejected", "empty-file"),
        "notes.txt": ("rejected", "not-an-image"),
        "truncated.jpg": ("rejected", "truncated"),
        "corrupt.png": ("rejected", "unreadable"),
        "phone.heic": ("rejected", "unsupported-format"),
        "drawing.eps": ("rejected", "unsupported-format"),
        "tiny.png": ("rejected", "too-small"),
        "bomb.png": ("rejected", "too-many-pixels"),
    }
    assert summary.files == 9 and summary.kept == 1
    assert summary.rejected == {"empty-file": 1, "not-an-image": 1, "truncated": 1, "unreadable": 1,
                                "unsupported-format": 2, "too-small": 1, "too-many-pixels": 1}


def test_bad_inputs_are_rejected_the_same_in_worker_processes(bad_inputs, tmp_path):
    one = run(bad_inputs, tmp_path / "one")
    two = run(bad_inputs, tmp_path / "two", workers=2)
    assert one.to_json()["rejected"] == two.to_json()["rejected"]


def test_min_side_and_max_pixels_are_configurable(tmp_path):
    d = tmp_path / "photos"
    save(photo((80, 60)), d / "a.png")
    run(d, tmp_path / "ws1", min_side=61)
    assert rows(tmp_path / "ws1")["a.png"]["reason"] == "too-small"
    run(d, tmp_path / "ws2", max_pixels=80 * 60 - 1)
    assert rows(tmp_path / "ws2")["a.png"]["reason"] == "too-many-pixels"
    run(d, tmp_path / "ws3", min_side=60, max_pixels=80 * 60)
    assert rows(tmp_path / "ws3")["a.png"]["status"] == "kept"


# --- converted, not rejected ------------------------------------------------------------------
def prepared(ws, res=(32, 32)):
    return np.load(ws / "prepared" / f"{res[0]}x{res[1]}" / "images.npy")


def test_odd_modes_are_converted_to_rgb(tmp_path):
    d = tmp_path / "photos"
    base = photo((64, 64), seed=7)
    save(base.convert("CMYK"), d / "1_cmyk.jpg", quality=95)
    save(base.convert("L"), d / "2_gray.png")
    save(base.convert("P", palette=Image.ADAPTIVE), d / "3_palette.png")
    gray16 = (np.asarray(base.convert("L"), np.uint16) * 257)
    save(Image.fromarray(gray16), d / "4_gray16.png")
    save(base, d / "5_rgb.png")
    run(d, tmp_path / "ws")
    assert all(r["status"] == "kept" for r in rows(tmp_path / "ws").values())
    arr = prepared(tmp_path / "ws").astype(int)
    cmyk, gray, palette, gray16_out, rgb = arr
    assert np.abs(cmyk - rgb).mean() < 8
    assert np.abs(palette - rgb).mean() < 8
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.abs(gray16_out - gray).max() <= 1   # 16-bit scaled down, not clipped to white


def test_alpha_is_composited_on_white(tmp_path):
    d = tmp_path / "photos"
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:, :20] = (200, 0, 0, 255)    # opaque red left half, transparent right half
    save(Image.fromarray(rgba, "RGBA"), d / "alpha.png")
    run(d, tmp_path / "ws")
    out = prepared(tmp_path / "ws")[0]
    assert (out[:, :12] == (200, 0, 0)).all()
    assert (out[:, -12:] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    d = tmp_path / "photos"
    arr = np.zeros((60, 100, 3), np.uint8)
    arr[:, :50] = (255, 0, 0)          # stored landscape: red left, blue right
    arr[:, 50:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                   # "rotate 90 CW to display": displayed portrait, red on top
    save(Image.fromarray(arr), d / "rotated.jpg", quality=95, exif=exif.tobytes())
    run(d, tmp_path / "ws")
    row = rows(tmp_path / "ws")["rotated.jpg"]
    assert (row["width"], row["height"]) == (60, 100)
    out = prepared(tmp_path / "ws").astype(int)[0]
    assert out[:8, :, 0].mean() > 200 and out[-8:, :, 2].mean() > 200


# --- resizing ---------------------------------------------------------------------------------
def test_crop_fills_a_4_3_target_and_pad_letterboxes(tmp_path):
    d = tmp_path / "photos"
    arr = np.full((90, 90, 3), 255, np.uint8)
    arr[:, :15] = (0, 200, 0)          # green strip on the left edge of a square photo
    save(Image.fromarray(arr), d / "square.png")
    run(d, tmp_path / "crop", res=[(48, 64)], fit="crop")
    run(d, tmp_path / "pad", res=[(48, 64)], fit="pad")
    crop, pad = prepared(tmp_path / "crop", (48, 64))[0], prepared(tmp_path / "pad", (48, 64))[0]
    assert crop.shape == pad.shape == (48, 64, 3)
    assert (crop[:, 0] == (0, 200, 0)).all() or np.abs(crop[:, 0].astype(int) - (0, 200, 0)).max() < 4
    assert (pad[:, :6] == 0).all() and (pad[:, -6:] == 0).all()      # black bars left and right
    assert np.abs(pad[:, 9].astype(int) - (0, 200, 0)).max() < 4      # the photo starts after the bar


def test_large_jpegs_are_decoded_in_draft_mode_without_losing_quality(tmp_path):
    d = tmp_path / "photos"
    big = photo((1600, 1200), seed=11)
    save(big, d / "big.jpg", quality=95)
    run(d, tmp_path / "ws", res=[(48, 64)])
    full = np.asarray(big.resize((64, 48), Image.LANCZOS), np.float32)
    assert np.abs(prepared(tmp_path / "ws", (48, 64))[0].astype(np.float32) - full).mean() < 3
    assert rows(tmp_path / "ws")["big.jpg"]["width"] == 1600   # catalog keeps the true size


# --- duplicates -------------------------------------------------------------------------------
def test_byte_identical_files_are_duplicates_of_the_first(tmp_path):
    d = tmp_path / "photos"
    save(photo(seed=1), d / "a.jpg", quality=90)
    save(photo(seed=2), d / "b.jpg", quality=90)
    shutil.copy(d / "a.jpg", d / "c.jpg")
    (d / "sub").mkdir()
    shutil.copy(d / "a.jpg", d / "sub" / "a_again.jpg")
    summary = run(d, tmp_path / "ws")
    r = rows(tmp_path / "ws")
    assert r["a.jpg"]["status"] == "kept"
    for name in ("c.jpg", "a_again.jpg"):
        assert r[name]["status"] == "duplicate" and r[name]["duplicate_of"] == r["a.jpg"]["id"]
    assert summary.duplicates == 2 and summary.kept == 2
    assert len(np.load(tmp_path / "ws" / "prepared" / "32x32" / "photo_ids.npy")) == 2


def test_near_identical_photos_are_flagged_not_dropped(tmp_path):
    d = tmp_path / "photos"
    save(photo((160, 120), seed=1), d / "a.jpg", quality=95)
    save(photo((160, 120), seed=1).resize((120, 90), Image.LANCZOS), d / "b.jpg", quality=60)  # re-encoded copy
    save(photo((160, 120), seed=2), d / "c.jpg", quality=95)
    summary = run(d, tmp_path / "ws")
    r = rows(tmp_path / "ws")
    assert r["b.jpg"]["status"] == "kept" and r["b.jpg"]["near_duplicate_of"] == r["a.jpg"]["id"]
    assert r["c.jpg"]["near_duplicate_of"] is None and r["a.jpg"]["near_duplicate_of"] is None
    assert summary.near_duplicates == 1
    run(d, tmp_path / "ws0", near_duplicate_distance=0)
    assert rows(tmp_path / "ws0")["b.jpg"]["near_duplicate_of"] is None


# --- labels -----------------------------------------------------------------------------------
def labelled_folder(tmp_path, n=3):
    d = tmp_path / "photos"
    for city in ("Oakdale", "Seaside"):
        for i in range(n):
            save(photo(seed={"Oakdale": 100, "Seaside": 200}[city] + i), d / city / f"{city[0]}{i}.jpg", quality=90)
    return d


def test_subfolders_name_the_labels(tmp_path):
    d = labelled_folder(tmp_path)
    save(photo(seed=99), d / "loose.jpg", quality=90)
    summary = run(d, tmp_path / "ws")
    r = rows(tmp_path / "ws")
    assert r["O0.jpg"]["label"] == "Oakdale" and r["S2.jpg"]["label"] == "Seaside"
    assert r["loose.jpg"]["label"] is None and summary.unlabelled == 1
    assert json.loads((tmp_path / "ws" / "labels.json").read_text()) == {
        "names": ["Oakdale", "Seaside"], "counts": {"Oakdale": 3, "Seaside": 3}}


def test_csv_labels_with_unmatched_unlabelled_and_malformed_rows_reported(tmp_path):
    d = labelled_folder(tmp_path)
    table = tmp_path / "listings.csv"
    table.write_text("photo,town,price\n"
                     "Oakdale/O0.jpg,Hill Town,1\n"          # relative path
                     "O1.jpg,Hill Town,2\n"                  # bare file name
                     "S0.jpg,\"Bay City, CA\",3\n"           # quoted comma
                     "S1.jpg,,4\n"                           # empty label: malformed
                     "S2.jpg,Bay City,5,extra\n"             # wrong field count: malformed
                     "gone.jpg,Hill Town,6\n")               # names no photo
    summary = run(d, tmp_path / "ws", labels=table, file_column="photo", label_column="town")
    r = rows(tmp_path / "ws")
    assert r["O0.jpg"]["label"] == "Hill Town" and r["O1.jpg"]["label"] == "Hill Town"
    assert r["S0.jpg"]["label"] == "Bay City, CA"
    assert r["S1.jpg"]["label"] is None and r["O2.jpg"]["label"] is None
    assert summary.unmatched_labels == ["gone.jpg"]
    assert sorted(summary.unlabelled_files) == ["Oakdale/O2.jpg", "Seaside/S1.jpg", "Seaside/S2.jpg"]
    assert len(summary.malformed_label_rows) == 2
    text = summary.describe()
    assert "gone.jpg" in text and "malformed" in text and "no label entry for 3" in text


def test_csv_without_the_named_columns_is_a_clear_error(tmp_path):
    d = labelled_folder(tmp_path)
    table = tmp_path / "listings.csv"
    table.write_text("file,town\nO0.jpg,Hill Town\n")
    with pytest.raises(NeighbourhoodsError, match="no column 'city'.*file, town"):
        run(d, tmp_path / "ws", labels=table)


def test_stylegan_dataset_json_labels(tmp_path):
    d = labelled_folder(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [
        ["Oakdale/O0.jpg", 0], ["Oakdale/O1.jpg", 0], ["Seaside/S0.jpg", 1], ["Seaside/S1.jpg", None],
        ["Seaside/S2.jpg"], ["Nowhere/x.jpg", 1]]}))
    summary = run(d, tmp_path / "ws", labels=tmp_path / "dataset.json")
    r = rows(tmp_path / "ws")
    assert (r["O0.jpg"]["label"], r["S0.jpg"]["label"], r["S1.jpg"]["label"]) == ("0", "1", None)
    assert summary.label_source == "dataset.json"
    assert summary.unmatched_labels == ["Nowhere/x.jpg"] and len(summary.malformed_label_rows) == 2


# --- split ------------------------------------------------------------------------------------
def test_holdout_is_about_a_tenth_of_big_labels_and_stable_when_photos_are_added(tmp_path):
    d = tmp_path / "photos"
    for i in range(60):
        save(photo((40, 30), seed=1000 + i), d / "Big" / f"b{i:03d}.png")
    for i in range(5):
        save(photo((40, 30), seed=2000 + i), d / "Small" / f"s{i}.png")
    run(d, tmp_path / "ws", near_duplicate_distance=0)
    before = {n: r["split"] for n, r in rows(tmp_path / "ws").items()}
    big = [s for n, s in before.items() if n.startswith("b")]
    assert 1 <= big.count("holdout") <= 15
    assert all(s == "train" for n, s in before.items() if n.startswith("s"))   # under holdout_min
    for i in range(60, 90):
        save(photo((40, 30), seed=1000 + i), d / "Big" / f"b{i:03d}.png")
    run(d, tmp_path / "ws", near_duplicate_distance=0)
    after = {n: r["split"] for n, r in rows(tmp_path / "ws").items()}
    assert {n: after[n] for n in before if n.startswith("b")} == {n: before[n] for n in before if n.startswith("b")}
    ws = Workspace(tmp_path / "ws")
    train, hold = load_split(ws, (32, 32), "train"), load_split(ws, (32, 32), "holdout")
    assert len(train) + len(hold) == 95 and not set(train.photo_ids) & set(hold.photo_ids)


# --- incremental ------------------------------------------------------------------------------
def test_rerun_decodes_only_new_and_changed_files_and_forgets_removed_ones(tmp_path):
    d = labelled_folder(tmp_path)
    first = run(d, tmp_path / "ws")
    assert first.decoded == 6
    ids = {n: r["id"] for n, r in rows(tmp_path / "ws").items()}
    assert run(d, tmp_path / "ws").decoded == 0
    save(photo(seed=500), d / "Oakdale" / "O9.jpg", quality=90)                 # new
    save(photo(seed=501), d / "Seaside" / "S0.jpg", quality=90)                 # changed
    (d / "Seaside" / "S1.jpg").unlink()                                          # removed
    again = run(d, tmp_path / "ws")
    assert (again.decoded, again.new, again.changed, again.removed) == (2, 1, 1, 1)
    after = rows(tmp_path / "ws")
    assert "S1.jpg" not in after and after["O9.jpg"]["id"] > max(ids.values())
    assert all(after[n]["id"] == ids[n] for n in after if n in ids)   # ids are stable
    kept = sorted(r["id"] for r in after.values() if r["status"] == "kept")
    assert np.load(tmp_path / "ws" / "prepared" / "32x32" / "photo_ids.npy").tolist() == kept


def test_new_resolution_prepares_arrays_for_every_kept_photo(tmp_path):
    d = labelled_folder(tmp_path)
    run(d, tmp_path / "ws")
    summary = run(d, tmp_path / "ws", res=[(32, 32), (24, 32)])
    assert summary.prepared == ["32x32", "24x32"]
    assert prepared(tmp_path / "ws", (24, 32)).shape == (6, 24, 32, 3)


# --- CLI --------------------------------------------------------------------------------------
def test_cli_json_summary_has_the_documented_keys(tmp_path, capsys):
    d = labelled_folder(tmp_path)
    (d / "junk.txt").write_text("x")
    assert main(["ingest", str(d), "--workspace", str(tmp_path / "ws"), "--res", "32x32", "--min-side", "16",
                 "--workers", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"files", "kept", "duplicates", "rejected", "labels"} <= set(out)
    assert out["files"] == 7 and out["kept"] == 6 and out["rejected"] == {"not-an-image": 1}
    assert out["labels"] == {"Oakdale": 3, "Seaside": 3}


def test_cli_reports_a_missing_folder_as_one_line(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "nope"), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_workspace_refuses_a_different_photos_folder(tmp_path):
    d = labelled_folder(tmp_path)
    run(d, tmp_path / "ws")
    other = tmp_path / "other"
    save(photo(seed=3), other / "x.jpg", quality=90)
    with pytest.raises(NeighbourhoodsError, match="catalogs .*photos"):
        run(other, tmp_path / "ws")
    assert len(rows(tmp_path / "ws")) == 6      # nothing was removed


def test_near_duplicates_share_the_split_of_their_original(tmp_path):
    d = tmp_path / "photos"
    for i in range(40):
        original = photo((160, 120), seed=3000 + i)
        save(original, d / "City" / f"a{i:02d}.jpg", quality=95)
        save(original.resize((120, 90), Image.LANCZOS), d / "City" / f"b{i:02d}.jpg", quality=70)
    run(d, tmp_path / "ws", holdout=0.3)
    r = rows(tmp_path / "ws")
    by_id = {row["id"]: row for row in r.values()}
    flagged = [row for row in r.values() if row["near_duplicate_of"] is not None]
    assert len(flagged) >= 30
    assert {row["split"] for row in r.values()} == {"train", "holdout"}
    assert all(row["split"] == by_id[row["near_duplicate_of"]]["split"] for row in flagged)


def test_a_file_that_vanishes_before_it_is_read_is_missing_not_a_crash(tmp_path):
    from neighbourhoods.ingest.decode import DecodeSettings, decode_one
    result = decode_one((7, str(tmp_path / "gone.jpg"), DecodeSettings(res=((32, 32),))))
    assert (result["status"], result["reason"]) == ("rejected", "missing")


def test_latin1_labels_file_is_read(tmp_path):
    d = labelled_folder(tmp_path)
    table = tmp_path / "listings.csv"
    table.write_bytes("file,city\nO0.jpg,Cañon City\n".encode("latin-1"))
    run(d, tmp_path / "ws", labels=table)
    assert rows(tmp_path / "ws")["O0.jpg"]["label"] == "Cañon City"


def test_symlink_loops_and_dangling_links_do_not_hang_or_crash(tmp_path):
    d = labelled_folder(tmp_path)
    os.symlink(d, d / "Oakdale" / "loop")                  # a link back to the top
    os.symlink(tmp_path / "nowhere.jpg", d / "dangling.jpg")
    summary = run(d, tmp_path / "ws")
    assert summary.files == 6                                # each folder is walked once
    assert summary.unreadable_paths == [str(d / "dangling.jpg")]
    assert "could not be listed or read" in summary.describe()



def test_a_resolution_no_model_can_train_fails_at_ingest_in_one_line(tmp_path, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    Image.new("RGB", (64, 64), (120, 90, 60)).save(d / "a.png")
    assert main(["ingest", str(d), "--workspace", str(tmp_path / "ws"), "--res", "50x50"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no model can train at 50x50: projected needs a base of 3 or more px") and err.count("\n") == 1
    assert "dcgan needs a base of 3-8 px" in err and "96x128" in err
    assert not (tmp_path / "ws" / "catalog.sqlite").exists()      # refused before anything was written


def test_a_file_name_that_is_not_utf8_is_catalogued_as_it_is_on_disk(tmp_path):
    import subprocess
    import sys

    d = tmp_path / "photos"
    save(photo(seed=1), d / "good.jpg", quality=90)
    odd = os.fsencode(str(d)) + b"/caf\xe9-\xff.jpg"            # Latin-1 bytes from a zip or Windows dump
    with open(odd, "wb") as f:
        photo(seed=2).save(f, format="JPEG", quality=90)
    table = tmp_path / "labels.csv"
    table.write_text("file,city\ngood.jpg,Oakdale\n")
    summary = run(d, tmp_path / "ws", labels=table)
    assert summary.files == 2 and summary.kept == 2 and summary.labels == {"Oakdale": 1}
    con = sqlite3.connect(tmp_path / "ws" / "catalog.sqlite")
    stored = dict(con.execute("SELECT path, status FROM photos").fetchall())
    con.close()
    assert stored[odd] == "kept"                                  # the exact bytes, as on disk
    assert "no label entry for 1 files: caf\\xe9-\\xff.jpg" in summary.describe()
    again = run(d, tmp_path / "ws", labels=table)                 # a re-run finds it unchanged
    assert (again.new, again.changed, again.removed, again.decoded) == (0, 0, 0, 0)
    out = subprocess.run([sys.executable, "-m", "neighbourhoods", "ingest", str(d), "-w", str(tmp_path / "ws2"),
                          "--labels", str(table), "--res", "32x32", "--min-side", "16", "--workers", "1"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "caf\\xe9-\\xff.jpg" in out.stdout, out.stderr
