"""Which label (city) each photo has, from any of four sources, with every mismatch reported.

    - a CSV table with one row per photo: a file column (name or relative path) and a label column;
    - a CSV table with one row per listing, as real listing exports are: a key column (house_id)
      and photos named by that key (`<house_id>_<n>.jpg`): `key_column` plus a `key_pattern` that
      gets the key from a file name, either a glob with `{key}` ('{key}_*.jpg', the default
      '{key}_*') or a regular expression with one group ('^(\\d+)-');
    - a StyleGAN-style dataset.json: {"labels": [["sub/img.png", 3], ...]};
    - no labels file: the first sub-folder under the photos folder names the label.

A label may join several columns (`label_column=["city", "state"]` -> "Scottsdale, AZ").
Nothing is dropped silently: entries that name no photo (`unmatched`: for a listings table, the
listings with no photo), photos that no entry names (`unlabelled`), photos whose name yields no
key (`no_key`) and entries that cannot be read (`malformed`) are all returned for the summary.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from neighbourhoods.core.errors import NeighbourhoodsError

MAX_CELL = 4096            # characters: a longer file name or city is a broken export, reported per row
MISSING = {"", "nan", "null", "none", "n/a", "#n/a", "na"}   # what spreadsheets and pandas write for "no value"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass
class LabelTable:
    entries: dict[str, str] = field(default_factory=dict)   # normalised file reference (or listing key) -> label
    malformed: list[str] = field(default_factory=list)      # "line 7: empty label", ...
    source: str = "folders"                                 # csv / dataset.json / folders
    key_column: str | None = None                           # set: entries are keyed by listing
    key_pattern: str | None = None                          # how a file name gives its listing key


@dataclass
class LabelMatch:
    labels: dict[str, str | None]   # relative photo path -> label (None: no entry names it)
    unmatched: list[str]            # table entries that name no photo (listings with no photo)
    unlabelled: list[str]           # relative photo paths that no entry names
    ambiguous: list[str]            # photo paths that several entries could name
    malformed: list[str]            # unreadable rows of the labels file
    no_key: list[str] = field(default_factory=list)   # photo paths whose name yields no listing key


def _norm(ref: str) -> str:
    ref = ref.strip().replace("\\", "/")
    while ref.startswith("./"):
        ref = ref[2:]
    return ref


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    for encoding in ("utf-8-sig", "cp1252"):   # Excel on Windows still writes cp1252 (curly quotes, dashes)
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")  # every byte decodes


def _bad_text(value: str, what: str) -> str | None:
    """Why a file name or label cell cannot be used, or None."""
    if len(value) > MAX_CELL:
        return f"{what} of {len(value):,} characters"
    if _CONTROL.search(value):
        return f"{what} {value[:40]!r} holds a control character"
    return None


def key_matcher(pattern: str):
    """A function file name (or relative path, where the pattern has a '/') -> listing key or None.

    '{key}_*.jpg' is a glob ('*' any run of characters, '?' one; case-insensitive like most file
    systems' users expect), anything without '{key}' a regular expression with exactly one group.
    """
    if "{key}" in pattern:
        if pattern.count("{key}") != 1:
            raise NeighbourhoodsError(f"key pattern {pattern!r} must hold {{key}} once")
        parts = []
        for piece in re.split(r"(\{key\}|\*|\?)", pattern):
            parts.append({"{key}": "(.+?)", "*": ".*", "?": "."}.get(piece, re.escape(piece)))
        regex = re.compile("".join(parts) + r"\Z", re.IGNORECASE)
        search = regex.match
    else:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise NeighbourhoodsError(f"key pattern {pattern!r} is neither a glob with {{key}} nor a regular "
                                      f"expression ({e})") from None
        if regex.groups != 1:
            raise NeighbourhoodsError(f"key pattern {pattern!r} must have exactly one group, the key "
                                      f"(it has {regex.groups}); or use a glob such as '{{key}}_*.jpg'")
        search = regex.search
    on_path = "/" in pattern

    def key_of(rel: str) -> str | None:
        m = search(rel if on_path else PurePosixPath(rel).name)
        return m.group(1).strip() if m and m.group(1) and m.group(1).strip() else None

    return key_of


def _columns(header: list[str], wanted: list[str], path: Path, hint: str) -> list[int]:
    missing = [c for c in wanted if c not in header]
    if missing:
        raise NeighbourhoodsError(
            f"labels file {path} has no column {', '.join(repr(m) for m in missing)} "
            f"(columns: {', '.join(h[:40] for h in header[:30])}); pass {hint}")
    return [header.index(c) for c in wanted]


def read_csv_labels(path: Path, file_column: str, label_column: str | list[str],
                    key_column: str | None = None, key_pattern: str | None = None) -> LabelTable:
    label_columns = [label_column] if isinstance(label_column, str) else list(label_column)
    table = LabelTable(source="csv", key_column=key_column,
                       key_pattern=(key_pattern or "{key}_*") if key_column else None)
    if table.key_pattern:
        key_matcher(table.key_pattern)   # a bad pattern is an error before any row is read
    ref_column = key_column or file_column
    # a field may be as long as the file (a 5 MB cell reports as that row's problem, not a crash)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, min(path.stat().st_size + 1, 2**31 - 1)))
    try:
        reader = csv.reader(io.StringIO(_read_text(path), newline=""))   # quoted cells may hold newlines
        header = next(reader, None)
        if not header:
            raise NeighbourhoodsError(f"labels file {path} is empty")
        header = [h.strip() for h in header]
        hint = "--key-column/--label-column" if key_column else "--file-column/--label-column"
        ri, *lis = _columns(header, [ref_column, *label_columns], path, hint)
        what = key_column or file_column
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue  # blank lines are layout, not data
            if len(row) != len(header):
                table.malformed.append(f"line {line}: {len(row)} fields, header has {len(header)}")
                continue
            ref = row[ri].strip() if key_column else _norm(row[ri])
            if not ref:
                table.malformed.append(f"line {line}: empty {what}")
                continue
            problem = _bad_text(ref, what)
            if problem:
                table.malformed.append(f"line {line}: {problem}")
                continue
            cells = [row[i].strip() for i in lis]
            empty = [c for c, v in zip(label_columns, cells) if v.lower() in MISSING]
            if empty:
                table.malformed.append(f"line {line}: empty {', '.join(empty)} for {what} {ref[:60]}")
                continue
            label = ", ".join(cells)
            problem = _bad_text(label, "label")
            if problem:
                table.malformed.append(f"line {line}: {problem} for {what} {ref[:60]}")
                continue
            _add(table, ref, label, f"line {line}")
    except csv.Error as e:   # e.g. a NUL byte outside quotes: the rest of the file cannot be trusted
        raise NeighbourhoodsError(f"labels file {path} line {reader.line_num}: {e}; fix the file") from None
    finally:
        csv.field_size_limit(limit)
    return table


def read_dataset_json(path: Path) -> LabelTable:
    table = LabelTable(source="dataset.json")
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise NeighbourhoodsError(f"labels file {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise NeighbourhoodsError(f"labels file {path} is nested too deeply to be a dataset.json") from None
    entries = doc.get("labels") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise NeighbourhoodsError(f"{path} has no \"labels\" list (StyleGAN dataset.json: "
                                  "{\"labels\": [[\"file.png\", 0], ...]})")
    integers = any(isinstance(e, list) and len(e) == 2 and type(e[1]) is int for e in entries)
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            table.malformed.append(f"entry {i}: expected [file, label], got {json.dumps(entry)[:60]}")
            continue
        ref, label = _norm(entry[0]), entry[1]
        problem = _bad_text(ref, "file name") if ref else "empty file name"
        if problem:
            table.malformed.append(f"entry {i}: {problem}")
            continue
        if type(label) is int:
            label = str(label)
        elif isinstance(label, str) and label.strip().lower() not in MISSING:
            label = label.strip()
            if integers and label.lstrip("-").isdigit():
                # "7" beside integer labels would merge with 7 silently (or not): say which was meant
                table.malformed.append(f"entry {i}: label {label!r} for {ref} is a string where the other "
                                       "labels are integers")
                continue
            problem = _bad_text(label, "label")
            if problem:
                table.malformed.append(f"entry {i}: {problem} for {ref}")
                continue
        else:
            shown = "NaN" if isinstance(label, float) and math.isnan(label) else json.dumps(label)[:40]
            table.malformed.append(f"entry {i}: label {shown} for {ref} is not a class (an integer or a name)")
            continue
        _add(table, ref, label, f"entry {i}")
    return table


def _add(table: LabelTable, ref: str, label: str, where: str) -> None:
    old = table.entries.get(ref)
    if old is not None and old != label:
        table.malformed.append(f"{where}: {ref} labelled {label!r} but already {old!r}; keeping {old!r}")
        return
    table.entries[ref] = label


def read_labels(path: str | Path | None, file_column: str = "file", label_column: str | list[str] = "city",
                key_column: str | None = None, key_pattern: str | None = None) -> LabelTable | None:
    """The labels file as a table, or None for folder labels."""
    if path is None:
        if key_column or key_pattern:
            raise NeighbourhoodsError("--key-column and --key-pattern need a listings table (--labels FILE)")
        return None
    path = Path(path)
    if not path.is_file():
        raise NeighbourhoodsError(f"labels file {path} not found")
    if path.suffix.lower() == ".json":
        if key_column or key_pattern:
            raise NeighbourhoodsError(f"{path} is a dataset.json, which names files; --key-column needs a CSV table")
        return read_dataset_json(path)
    if key_pattern and not key_column:
        raise NeighbourhoodsError("--key-pattern needs --key-column (the table's listing id column)")
    return read_csv_labels(path, file_column, label_column, key_column, key_pattern)


def match_labels(table: LabelTable | None, rel_paths: list[str], root: Path) -> LabelMatch:
    """Give each photo (path relative to `root`, '/'-separated) its label.

    A file entry names a photo when it equals the photo's relative path, its absolute path, or
    when one is a path suffix of the other ('images/1.jpg' names '1.jpg' under socal/images and
    vice versa), so a table written for a parent or child folder still matches. A listing entry
    names every photo whose file name yields its key.
    """
    if table is None:
        labels = {rel: (rel.split("/")[0] if "/" in rel else None) for rel in rel_paths}
        return LabelMatch(labels, [], [rel for rel, lab in labels.items() if lab is None], [], [])
    if table.key_column:
        return _match_keys(table, rel_paths)
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


def _match_keys(table: LabelTable, rel_paths: list[str]) -> LabelMatch:
    key_of = key_matcher(table.key_pattern)
    labels: dict[str, str | None] = {}
    no_key: list[str] = []
    used: set[str] = set()
    for rel in rel_paths:
        key = key_of(rel)
        if key is None:
            no_key.append(rel)
        elif key in table.entries:
            used.add(key)
        labels[rel] = table.entries.get(key) if key is not None else None
    unmatched = sorted(set(table.entries) - used, key=lambda k: (len(k), k))   # 2 before 10 for numeric ids
    unlabelled = [rel for rel, lab in labels.items() if lab is None]
    return LabelMatch(labels, unmatched, unlabelled, [], list(table.malformed), no_key)
