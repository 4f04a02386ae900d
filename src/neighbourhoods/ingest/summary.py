"""What an ingest run did, as numbers (`to_json`) and as the lines the CLI prints (`describe`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from neighbourhoods.core import catalog


@dataclass
class IngestSummary:
    workspace: str
    files: int = 0                    # input files, one catalog row each
    kept: int = 0
    duplicates: int = 0               # byte-identical copies of a kept photo
    near_duplicates: int = 0          # kept photos flagged as perceptually near-identical to another
    rejected: dict[str, int] = field(default_factory=dict)   # reason -> count
    labels: dict[str, int] = field(default_factory=dict)     # label -> kept photos
    unlabelled: int = 0               # kept photos with no label
    holdout: int = 0                  # kept photos in the holdout split
    new: int = 0                      # files first seen in this run
    changed: int = 0                  # files whose size or mtime changed since the last run
    removed: int = 0                  # catalog rows whose file is gone
    decoded: int = 0                  # files decoded in this run
    label_source: str = "folders"
    unmatched_labels: list[str] = field(default_factory=list)   # label entries naming no photo
    unlabelled_files: list[str] = field(default_factory=list)   # photos no entry names (all files)
    ambiguous_labels: list[str] = field(default_factory=list)
    malformed_label_rows: list[str] = field(default_factory=list)
    no_key_files: list[str] = field(default_factory=list)       # listings table: photos whose name gives no key
    label_key: str | None = None      # listings table: its key column (entries are listings, not files)
    key_pattern: str | None = None
    unreadable_paths: list[str] = field(default_factory=list)   # folders we may not list, dangling links
    prepared: list[str] = field(default_factory=list)           # resolutions written, 'HxW'
    photo_size: str | None = None     # median kept photo, 'WxH' (as image tools write it)
    supported_res: str | None = None  # the largest training resolution of that aspect it covers, 'HxW'
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"files": self.files, "kept": self.kept, "duplicates": self.duplicates,
                "near_duplicates": self.near_duplicates, "rejected": dict(sorted(self.rejected.items())),
                "labels": dict(sorted(self.labels.items())), "unlabelled": self.unlabelled,
                "holdout": self.holdout, "new": self.new, "changed": self.changed, "removed": self.removed,
                "decoded": self.decoded, "label_source": self.label_source,
                "unmatched_labels": len(self.unmatched_labels), "unlabelled_files": len(self.unlabelled_files),
                "ambiguous_labels": len(self.ambiguous_labels),
                "malformed_label_rows": len(self.malformed_label_rows), "no_key_files": len(self.no_key_files),
                "label_key": self.label_key, "key_pattern": self.key_pattern,
                "unreadable_paths": len(self.unreadable_paths),
                "prepared": self.prepared, "photo_size": self.photo_size, "supported_res": self.supported_res,
                "workspace": self.workspace, "seconds": round(self.seconds, 2)}

    def describe(self) -> str:
        def examples(items: list[str], n: int = 5) -> str:
            more = f", ... ({len(items) - n} more)" if len(items) > n else ""
            return ", ".join(catalog.shown(i) for i in items[:n]) + more   # odd file names print as \xNN

        rejected = sum(self.rejected.values())
        lines = [f"{self.files} files in {self.workspace} ({self.new} new, {self.changed} changed, "
                 f"{self.removed} removed; {self.decoded} decoded in {self.seconds:.1f} s)",
                 f"  kept        {self.kept} ({self.holdout} held out for evaluation, "
                 f"{self.near_duplicates} flagged near-duplicate)",
                 f"  duplicates  {self.duplicates} (byte-identical to a kept photo)",
                 f"  rejected    {rejected}" + (": " + ", ".join(f"{r} {n}" for r, n in sorted(self.rejected.items()))
                                                if rejected else "")]
        top = sorted(self.labels.items(), key=lambda kv: (-kv[1], kv[0]))
        source = self.label_source + (f" keyed by {self.label_key}" if self.label_key else "")
        lines.append(f"  labels      {len(self.labels)} from {source}"
                     + (": " + ", ".join(f"{k} {v}" for k, v in top[:8]) + (", ..." if len(top) > 8 else "") if top else ""))
        if self.unlabelled:
            lines.append(f"  unlabelled  {self.unlabelled} kept photos have no label")
        if self.unlabelled_files and self.label_source != "folders":
            lines.append(f"  no label entry for {len(self.unlabelled_files)} files: {examples(self.unlabelled_files)}")
        if self.no_key_files:
            lines.append(f"  {len(self.no_key_files)} file names give no {self.label_key} by --key-pattern "
                         f"{self.key_pattern!r}: {examples(self.no_key_files)}")
        if self.unmatched_labels and self.label_key:
            lines.append(f"  {len(self.unmatched_labels)} listings have no photo ({self.label_key} "
                         f"{examples(self.unmatched_labels)})")
        elif self.unmatched_labels:
            lines.append(f"  {len(self.unmatched_labels)} label entries name no photo: {examples(self.unmatched_labels)}")
        if self.ambiguous_labels:
            lines.append(f"  {len(self.ambiguous_labels)} photos match several label entries (left unlabelled): "
                         f"{examples(self.ambiguous_labels)}")
        if self.malformed_label_rows:
            lines.append(f"  {len(self.malformed_label_rows)} malformed label rows: {examples(self.malformed_label_rows, 3)}")
        if self.unreadable_paths:
            lines.append(f"  {len(self.unreadable_paths)} paths could not be listed or read (not in the catalog): "
                         f"{examples(self.unreadable_paths, 3)}")
        lines.append(f"  prepared    {', '.join(self.prepared)} (uint8 arrays in prepared/)")
        if self.supported_res:
            lines.append(f"  photo size  {self.photo_size} (median, W x H): train at --res {self.supported_res} for "
                         f"the website (its own aspect, nothing enlarged); 64x64 for quick runs")
        return "\n".join(lines)
