"""The `neighbourhoods` command: one subcommand per pipeline stage.

Thin by design: each verb parses its arguments and calls one library function from the module
of the same name, so `neighbourhoods ingest` is `neighbourhoods.ingest.ingest(...)`.
Errors the user can fix are printed as one line (`error: ...`), never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import NeighbourhoodsError
from .workspace import parse_res


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


# --- ingest ---------------------------------------------------------------------------------
def _add_ingest(sub) -> None:
    p = sub.add_parser("ingest", help="catalog a folder of photos and prepare training arrays")
    p.add_argument("photos", help="folder of photos (searched recursively)")
    p.add_argument("--workspace", "-w", required=True, help="workspace folder (created if missing)")
    p.add_argument("--labels", help="labels: a CSV table or a StyleGAN-style dataset.json; "
                   "without it, the first sub-folder under PHOTOS names each photo's label")
    p.add_argument("--file-column", default="file", help="CSV column with the photo's file name/relative path")
    p.add_argument("--label-column", default="city", help="CSV column with the label")
    p.add_argument("--res", action="append", type=parse_res, metavar="HxW",
                   help="prepared resolution, repeatable (default 64x64); 4:3 e.g. 96x128")
    p.add_argument("--fit", choices=["crop", "pad"], default="crop", help="centre-crop or pad to the target aspect")
    p.add_argument("--min-side", type=int, default=32, help="reject photos whose shorter side is smaller")
    p.add_argument("--max-pixels", type=int, default=100_000_000, help="reject larger images (decompression bombs)")
    p.add_argument("--holdout", type=float, default=0.10, help="fraction of each label held out from training")
    p.add_argument("--holdout-min", type=int, default=20, help="only labels with at least this many photos get a holdout")
    p.add_argument("--near-duplicate-distance", type=int, default=4, help="perceptual-hash distance below which photos are flagged near-duplicates")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPU count)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run_ingest)


def _run_ingest(args) -> None:
    from .ingest import ingest

    summary = ingest(args.photos, args.workspace, labels=args.labels, file_column=args.file_column,
                     label_column=args.label_column, res=args.res or [(64, 64)], fit=args.fit,
                     min_side=args.min_side, max_pixels=args.max_pixels, holdout=args.holdout,
                     holdout_min=args.holdout_min, near_duplicate_distance=args.near_duplicate_distance,
                     workers=args.workers, progress=not args.json)
    if args.json:
        _print_json(summary.to_json())
    else:
        print(summary.describe())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neighbourhoods",
        description="Listing photos in, a city-conditioned generator of never-existing house photos out.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_ingest(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except NeighbourhoodsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
