"""Which label (city) each photo has, from any of three sources, with every mismatch reported.

    - a CSV table: one row per photo, a file column (name or relative path) and a label column;
    - a StyleGAN-style dataset.json: {"labels": [["sub/img.png", 3], ...]};
    - no labels file: the first sub-folder under the photos folder names the label.

Nothing is dropped silently: rows that name no photo (`unmatched`), photos that no row names
(`unlabelled`) and rows that cannot be read (`malformed`) are all returned for the summary.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from neighbourhoods.core.errors import NeighbourhoodsError


@dataclass
class LabelTable:
    entries: dict[str, str] = field(default_factory=dict)   # normalised file reference -> label
    malformed: list[str] = field(default_factory=list)      # "line 7: empty label", ...
    source: str = "folders"                                 # csv / dataset.json / folders


@dataclass
class LabelMatch:
    labels: dict[str, str | None]   # relative photo path -> label (None: no row names it)
    unmatched: list[str]            # table entries that name no photo
    unlabelled: list[str]           # relative photo paths that no entry names
    ambiguous: list[str]            # photo paths that several entries could name
    malformed: list[str]            # unreadable rows of the labels file


def _norm(ref: str) -> str:
    ref = ref.strip().replace("\\", "/")
    while ref.startswith("./"):
        ref = ref[2:]
    return ref


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # spreadsheets still export this; every byte decodes


def read_csv_labels(path: Path, file_column: str, label_column: str) -> LabelTable:
    table = LabelTable(source="csv")
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))   # quoted cells may hold newlines
    header = next(reader, None)
    if not header:
        raise NeighbourhoodsError(f"labels file {path} is empty")
    header = [h.strip() for h in header]
    missing = [c for c in (file_column, label_column) if c not in header]
    if missing:
        raise NeighbourhoodsError(
            f"labels file {path} has no column {', '.join(repr(m) for m in missing)} "
            f"(columns: {', '.join(header)}); pass --file-column/--label-column")
    fi, li = header.index(file_column), header.index(label_column)
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines are layout, not data
        if len(row) != len(header):
            table.malformed.append(f"line {line}: {len(row)} fields, header has {len(header)}")
            continue
        ref, label = _norm(row[fi]), row[li].strip()
        if not ref:
            table.malformed.append(f"line {line}: empty {file_column}")
            continue
        if not label:
            table.malformed.append(f"line {line}: empty {label_column} for {ref}")
            continue
        _add(table, ref, label, f"line {line}")
    return table


def read_dataset_json(path: Path) -> LabelTable:
    table = LabelTable(source="dataset.json")
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise NeighbourhoodsError(f"labels file {path} is not valid JSON: {e}") from None
    entries = doc.get("labels") if isinstance(doc, dict) else None
    if entries is None:
        raise NeighbourhoodsError(f"{path} has no \"labels\" list (StyleGAN dataset.json: "
                                  "{\"labels\": [[\"file.png\", 0], ...]})")
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            table.malformed.append(f"entry {i}: expected [file, label], got {json.dumps(entry)[:60]}")
            continue
        ref, label = _norm(entry[0]), entry[1]
        if label is None or isinstance(label, (list, dict, bool)):
            table.malformed.append(f"entry {i}: label {json.dumps(label)[:40]} for {ref} is not a class")
            continue
        _add(table, ref, str(label), f"entry {i}")
    return table


def _add(table: LabelTable, ref: str, label: str, where: str) -> None:
    old = table.entries.get(ref)
    if old is not None and old != label:
        table.malformed.append(f"{where}: {ref} labelled {label!r} but already {old!r}; keeping {old!r}")
        return
    table.entries[ref] = label


def read_labels(path: str | Path | None, file_column: str = "file", label_column: str = "city") -> LabelTable | None:
    """The labels file as a table, or None for folder labels."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise NeighbourhoodsError(f"labels file {path} not found")
    if path.suffix.lower() == ".json":
        return read_dataset_json(path)
    return read_csv_labels(path, file_column, label_column)


def match_labels(table: LabelTable | None, rel_paths: list[str], root: Path) -> LabelMatch:
    """Give each photo (path relative to `root`, '/'-separated) its label.

    An entry names a photo when it equals the photo's relative path, its absolute path, or when
    one is a path suffix of the other ('images/1.jpg' names '1.jpg' under socal/images and vice
    versa), so a table written for a parent or child folder still matches.
    """
    if table is None:
        labels = {rel: (rel.split("/")[0] if "/" in rel else None) for rel in rel_paths}
        return LabelMatch(labels, [], [rel for rel, lab in labels.items() if lab is None], [], [])
    by_name: dict[str, list[str]] = {}
    for ref in table.entries:
        by_name.setdefault(PurePosixPath(ref).name, []).append(ref)
    used: set[str] = set()
    labels: dict[str, str | None] = {}
    ambiguous: list[str] = []
    root_posix = root.as_posix().rstrip("/")
    for rel in rel_paths:
        if rel in table.entries:
            ref = rel
        else:
            absolute = f"{root_posix}/{rel}"
            cands = [c for c in by_name.get(PurePosixPath(rel).name, ())
                     if c == absolute or ("/" + rel).endswith("/" + c) or ("/" + c).endswith("/" + rel)]
            if len(cands) > 1:
                ambiguous.append(rel)
            ref = cands[0] if len(cands) == 1 else None
        if ref is None:
            labels[rel] = None
        else:
            labels[rel] = table.entries[ref]
            used.add(ref)
    unmatched = sorted(set(table.entries) - used)
    unlabelled = [rel for rel, lab in labels.items() if lab is None]
    return LabelMatch(labels, unmatched, unlabelled, ambiguous, list(table.malformed))
