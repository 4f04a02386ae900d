"""The `neighbourhoods` command: one subcommand per pipeline stage.

Thin by design: each verb parses its arguments and calls one library function from the module
of the same name, so `neighbourhoods ingest` is `neighbourhoods.ingest.ingest(...)`.
Errors the user can fix are printed as one line (`error: ...`), never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import ThumbSize, parse_res


def _arg(parse):
    """An argparse type from a parser that raises NeighbourhoodsError: a bad value is then
    argparse's one-line usage error (exit 2), not a traceback."""
    def convert(text: str):
        try:
            return parse(text)
        except NeighbourhoodsError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def _add_snapshot(p) -> None:
    p.add_argument("--snapshot", default="best", metavar="best|last|IMAGES",
                   help="a run's weights: best (the snapshot its training curve's KID picked, where it keeps one; "
                        "default), last (its latest checkpoint) or the images_seen of a kept checkpoint")


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
    p.add_argument("--label-column", action="append", metavar="COLUMN",
                   help="CSV column with the label (default city); repeat to join columns: "
                   "--label-column city --label-column state -> 'Scottsdale, AZ'")
    p.add_argument("--key-column", metavar="COLUMN", help="the table has one row per listing, keyed by this column "
                   "(e.g. house_id); photos are named by the key, see --key-pattern")
    p.add_argument("--key-pattern", metavar="PATTERN", help="how a photo's file name gives its listing key: a glob "
                   "with {key} (default '{key}_*', e.g. '{key}_*.jpg') or a regular expression with one group")
    p.add_argument("--res", action="append", type=_arg(parse_res), metavar="HxW",
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
    from neighbourhoods.ingest import ingest

    summary = ingest(args.photos, args.workspace, labels=args.labels, file_column=args.file_column,
                     label_column=args.label_column or "city", key_column=args.key_column,
                     key_pattern=args.key_pattern, res=args.res or [(64, 64)], fit=args.fit,
                     min_side=args.min_side, max_pixels=args.max_pixels, holdout=args.holdout,
                     holdout_min=args.holdout_min, near_duplicate_distance=args.near_duplicate_distance,
                     workers=args.workers, progress=not args.json)
    if summary is None:
        return   # a torchrun process other than rank 0: its share is in the catalog, rank 0 reports
    if args.json:
        _print_json(summary.to_json())
    else:
        print(summary.describe())


# --- cluster / select -----------------------------------------------------------------------
def _add_cluster(sub) -> None:
    p = sub.add_parser("cluster", help="group kept photos by image features; contact sheets and a suggestion per cluster")
    p.add_argument("--workspace", "-w", required=True, help="workspace folder (from `ingest`)")
    p.add_argument("-k", type=int, default=4, help="number of clusters (default 4)")
    p.add_argument("--res", type=int, default=224, help="embedding resolution, multiple of 32 "
                   "(default 224; 128 takes about half the CPU time and found the same exteriors on the houses data)")
    p.add_argument("--extractor", default="efficientnet_lite0", help="feature network (default efficientnet_lite0)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--batch-size", type=int, default=64, help="photos per embedding batch")
    p.add_argument("--workers", type=int, default=0, help="JPEG-decoding processes beside the main one (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N; under torchrun each process embeds its "
                   "share of the photos on cuda:LOCAL_RANK (or the CPU) and rank 0 clusters")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="bf16 arithmetic where native (auto: CUDA, or a CPU with AMX/AVX512-BF16), or fp32 (off)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run_cluster)


def _run_cluster(args) -> None:
    from neighbourhoods.cluster import ClusterConfig, cluster

    config = ClusterConfig(k=args.k, res=args.res, extractor=args.extractor, seed=args.seed,
                           batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp)
    summary = cluster(args.workspace, config, progress=not args.json)
    if summary is None:
        return   # a torchrun process other than rank 0: its share is stored, rank 0 reports
    if args.json:
        _print_json(summary.to_json())
    else:
        print(summary.describe())


def _add_select(sub) -> None:
    p = sub.add_parser("select", help="choose the clusters that train (by number, or --auto exteriors)")
    p.add_argument("--workspace", "-w", required=True, help="workspace folder (from `cluster`)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--clusters", help="comma-separated cluster numbers, e.g. 0,2")
    how.add_argument("--auto", choices=["exteriors", "interiors", "documents", "other"],
                     help="the clusters `cluster` suggested as this kind")
    p.add_argument("--list", action="store_true", help="print the selected photos' paths, one a line")
    p.set_defaults(func=_run_select)


def _run_select(args) -> None:
    from neighbourhoods.select import select, selected_paths

    if args.clusters is None and args.auto is None and not args.list:
        raise NeighbourhoodsError("give --clusters (e.g. 0,2), --auto exteriors, or --list")
    if args.clusters is not None or args.auto is not None:
        try:
            clusters = [int(c) for c in args.clusters.split(",") if c.strip()] if args.clusters is not None else None
        except ValueError:
            raise NeighbourhoodsError(f"--clusters takes comma-separated numbers, e.g. 0,2; not {args.clusters!r}") from None
        summary = select(args.workspace, clusters=clusters, auto=args.auto)
        print(summary.describe(), file=sys.stderr if args.list else sys.stdout)
    if args.list:
        try:
            sys.stdout.write("".join(path + "\n" for path in selected_paths(args.workspace)))
            sys.stdout.flush()
        except BrokenPipeError:  # `select --list | head`: the reader has all it wants
            sys.stdout = open(os.devnull, "w")


# --- demo -----------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on toy town (no arguments) or on your photos")
    p.add_argument("--workspace", "-w", default="neighbourhoods-demo", help="workspace folder (default ./neighbourhoods-demo)")
    p.add_argument("--data", help="folder of photos to use instead of the built-in toy town")
    p.add_argument("--labels", help="labels for --data: CSV table or dataset.json (default: sub-folder names)")
    p.add_argument("--file-column", default="file", help="CSV column with the photo's file name/relative path")
    p.add_argument("--label-column", default="city", help="CSV column with the label")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPU count)")
    p.add_argument("--minutes", type=float, default=4.0, help="training time on this machine (default 4)")
    p.add_argument("--eval-samples", type=int, default=300, help="samples scored by evaluate (default 300)")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> None:
    from neighbourhoods.demo import demo

    if args.labels and not args.data:
        raise NeighbourhoodsError("--labels needs --data (the built-in toy town has its own labels)")
    if args.minutes <= 0 or args.eval_samples < 4:
        raise NeighbourhoodsError("--minutes must be positive and --eval-samples at least 4")
    result = demo(args.workspace, data=args.data, labels=args.labels, file_column=args.file_column,
                  label_column=args.label_column, workers=args.workers, minutes=args.minutes,
                  eval_samples=args.eval_samples)
    print()
    print(result.describe())


# --- generate -------------------------------------------------------------------------------
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="write thumbnails of never-existing houses per city")
    p.add_argument("--workspace", "-w", help="workspace folder (not needed for an .onnx replica)")
    p.add_argument("--run", required=True, help="run name under WS/runs, a run folder, an exported .pt2, "
                   "or an .onnx replica (`export --format onnx`: no torch loaded)")
    p.add_argument("--city", action="append", default=[], help="city (repeatable), as the run names it")
    p.add_argument("--all-cities", action="store_true", help="a folder per conditioning class of the run")
    p.add_argument("--every-city", action="store_true",
                   help="a folder per city of the run's data, including small cities drawn from (any city)")
    p.add_argument("--fallback", choices=["any"], help="draw a --city the data never had from (any city)")
    p.add_argument("-n", type=int, default=16, help="thumbnails per city (seeds SEED .. SEED+n-1)")
    p.add_argument("--seed", type=int, default=0, help="first seed; the same (city, seed) gives the same image")
    p.add_argument("--size", default="256x192", help="thumbnail size WxH (width x height), at most 1024 a side")
    p.add_argument("--format", default="jpg", help="jpg, png or webp")
    p.add_argument("--upscale", default=None, help="bicubic, lanczos, lanczos-sharp or espcn (default: the measured best)")
    p.add_argument("--no-novelty-guard", action="store_true", help="keep samples even if they nearly copy a training photo")
    p.add_argument("--guard-device", default="cpu", help="where the novelty guard's network runs (cpu, cuda); "
                   "its first call indexes every training photo, hours on a CPU at 100k+ photos")
    p.add_argument("--realism-quantile", type=float, default=None,
                   help="the realism gate: replace samples less realistic than this quantile of the held-out "
                   "photos' own realism (default 0.2; 0: gate off; an .onnx replica keeps the one it was exported with)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    _add_snapshot(p)
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> None:
    from neighbourhoods.generate import GenerateConfig, describe, generate

    cfg = GenerateConfig(n=args.n, seed=args.seed, size=ThumbSize.parse(args.size), fmt=args.format,
                         upscale=args.upscale, novelty=not args.no_novelty_guard, cities=args.city,
                         all_cities=args.all_cities, every_city=args.every_city, fallback=args.fallback,
                         guard_device=args.guard_device, snapshot=args.snapshot,
                         realism_quantile=args.realism_quantile)
    manifest = generate(args.workspace, args.run, args.out, cfg, progress=not args.json)
    if args.json:
        _print_json(manifest)
    else:
        print(describe(manifest, args.out))


# --- publish --------------------------------------------------------------------------------
def _add_publish(sub) -> None:
    p = sub.add_parser("publish", help="a static set of N thumbnails per city that passed every gate, with a "
                                       "manifest and a page (a website or CDN serves them with no model server)")
    p.add_argument("--workspace", "-w", help="workspace folder (not needed for an .onnx replica)")
    p.add_argument("--run", required=True, help="run name under WS/runs, a run folder, an exported .pt2 or an .onnx replica")
    p.add_argument("-n", type=int, default=100, help="thumbnails per city (a second run with a larger n adds to the set)")
    p.add_argument("--size", default="256x192", help="thumbnail size WxH, at most 1024 a side")
    p.add_argument("--format", default="jpg", help="jpg, png or webp")
    p.add_argument("--upscale", default=None, help="bicubic, lanczos, lanczos-sharp or espcn (default: the measured best)")
    p.add_argument("--realism-quantile", type=float, default=None,
                   help="the realism gate (default 0.2 of the held-out photos' realism; 0: off)")
    p.add_argument("--out", required=True, help="output folder (kept and extended by later runs)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    _add_snapshot(p)
    p.set_defaults(func=_run_publish)


def _run_publish(args) -> None:
    from neighbourhoods.publish import PublishConfig, describe, publish

    cfg = PublishConfig(n=args.n, size=ThumbSize.parse(args.size), fmt=args.format, upscale=args.upscale,
                        realism_quantile=args.realism_quantile, snapshot=args.snapshot)
    manifest = publish(args.workspace, args.run, args.out, cfg, progress=not args.json)
    if args.json:
        _print_json(manifest)
    else:
        print(describe(manifest, args.out))


# --- serve ----------------------------------------------------------------------------------
def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve thumbnails over HTTP (gallery at /)")
    p.add_argument("--workspace", "-w", help="workspace folder (not needed for an .onnx replica)")
    p.add_argument("--run", required=True, help="run name under WS/runs, a run folder, an exported .pt2, "
                   "or an .onnx replica (`export --format onnx`: no torch loaded)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--upscale", default=None, help="bicubic, lanczos, lanczos-sharp or espcn (default: the measured best)")
    p.add_argument("--no-novelty-guard", action="store_true", help="serve samples even if they nearly copy a training photo")
    p.add_argument("--guard-device", default="cpu", help="where the novelty guard's network runs (cpu, cuda); "
                   "its first call indexes every training photo, hours on a CPU at 100k+ photos")
    p.add_argument("--realism-quantile", type=float, default=None,
                   help="the realism gate: replace samples less realistic than this quantile of the held-out "
                   "photos' own realism (default 0.2; 0: gate off; an .onnx replica keeps the one it was exported with)")
    p.add_argument("--max-batch", type=int, default=16, help="most samples per generator call")
    p.add_argument("--generator-workers", type=int, default=None,
                   help="generator calls at once, one thread each (default: 2 for a run, 1 for an ONNX replica)")
    p.add_argument("--max-wait-ms", type=float, default=4.0, help="how long a request waits to be batched")
    p.add_argument("--cache-mb", type=float, default=256.0, help="LRU cache of rendered thumbnails, MiB")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the generator (encoding runs beside it)")
    p.add_argument("--max-side", type=int, default=1024, help="largest thumbnail side served, px")
    p.add_argument("--max-seed", type=int, default=None, help="largest seed served (default 2^63-1); bounds what "
                   "one city can cost, beside signed URLs (NEIGHBOURHOODS_URL_KEY, see `neighbourhoods sign`)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a whole request head (slow clients are closed)")
    p.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection stays open")
    p.add_argument("--max-connections", type=int, default=256, help="open connections beyond this get a 503 at once")
    _add_snapshot(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> None:
    from neighbourhoods.core.urls import MAX_SEED, key_from_env
    from neighbourhoods.serve import ServeConfig, serve

    cfg = ServeConfig(max_batch=args.max_batch, generator_workers=args.generator_workers,
                      max_wait_ms=args.max_wait_ms, cache_mb=args.cache_mb,
                      torch_threads=args.threads, max_side=args.max_side, url_key=key_from_env(),
                      max_seed=min(args.max_seed, MAX_SEED) if args.max_seed is not None else MAX_SEED,
                      header_timeout_s=args.header_timeout, keep_alive_s=args.keep_alive,
                      max_connections=args.max_connections)
    serve(args.workspace, args.run, host=args.host, port=args.port, config=cfg, upscale=args.upscale,
          novelty=not args.no_novelty_guard, guard_device=args.guard_device, snapshot=args.snapshot,
          realism_quantile=args.realism_quantile)


def _add_sign(sub) -> None:
    p = sub.add_parser("sign", help="the canonical, signed URL of a thumbnail (key: NEIGHBOURHOODS_URL_KEY)")
    p.add_argument("--city", required=True, help="the city as the run spells it (GET /cities)")
    p.add_argument("--seed", type=int, required=True, help="a non-negative integer")
    p.add_argument("--size", default="256x192", help="WxH (default 256x192)")
    p.add_argument("--format", default="jpg", choices=["jpg", "png", "webp"])
    p.add_argument("--fallback", choices=["any"], help="draw a city the data never had from (any city)")
    p.add_argument("--base", default="", help="prepended to the path, e.g. https://img.example.com")
    p.set_defaults(func=_run_sign)


def _run_sign(args) -> None:
    from neighbourhoods.sign import sign

    print(sign(args.city, args.seed, size=args.size, format=args.format, fallback=args.fallback, base=args.base))


# --- export ---------------------------------------------------------------------------------
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export the EMA generator (torch.export .pt2) for serving without the training code")
    p.add_argument("--workspace", "-w", required=True, help="workspace folder")
    p.add_argument("--run", required=True, help="run name under WS/runs or a run folder")
    p.add_argument("--out", required=True, help="output file (.pt2, or .onnx for --format onnx); metadata beside it")
    p.add_argument("--format", choices=["pt2", "onnx"], default=None,
                   help="pt2: torch.export (default); onnx: a replica for onnxruntime, no torch, with the guard "
                   "and the upscaler (default: from --out's suffix)")
    p.add_argument("--bench", action="store_true", help="also measure CPU latency per thumbnail at batch 1 and 64")
    p.add_argument("--realism-quantile", type=float, default=None,
                   help="onnx: the replica's realism gate (default 0.2 of the held-out photos' realism; 0: none)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_snapshot(p)
    p.set_defaults(func=_run_export)


def _run_export(args) -> None:
    from neighbourhoods.export import export

    result = export(args.workspace, args.run, args.out, bench=args.bench, fmt=args.format, snapshot=args.snapshot,
                    realism_quantile=args.realism_quantile)
    if args.json:
        _print_json(result)
    else:
        print(f"exported to {result['path']} ({result['bytes'] / 2**20:.1f} MiB); "
              f"max |exported - original| = {result['max_abs_diff']} / 255"
              + (f"; guard similarity within {result['guard_max_similarity_diff']:.1e}"
                 if "guard_max_similarity_diff" in result else "")
              + (f"; upscale within {result['upscale_max_abs_diff']} / 255" if "upscale_max_abs_diff" in result else ""))
        for b in result.get("latency", []):
            print(f"  {b['threads']} thread(s), batch {b['batch']:>3}: {b['ms_per_image']:.2f} ms per image "
                  f"({b['ms_per_batch']:.1f} ms per batch) + {b['postprocess_ms_per_image']:.1f} ms {b['upscale']} upscale+encode "
                  f"(load average {b['load_average_1min']:.1f})")


# --- upscale --------------------------------------------------------------------------------
def _add_upscale(sub) -> None:
    p = sub.add_parser("upscale", help="train the super-resolution upscaler on real photos")
    p.add_argument("--workspace", "-w", required=True, help="workspace folder (weights go to WS/upscale/)")
    p.add_argument("--train", required=True, metavar="PHOTOS", help="folder of real photos (originals, not thumbnails)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run_upscale)


def _run_upscale(args) -> None:
    from neighbourhoods.upscale import SRConfig, train_sr

    meta = train_sr(args.workspace, args.train, SRConfig(steps=args.steps), progress=not args.json)
    if args.json:
        _print_json(meta)
    else:
        print(f"trained the x2 upscaler on {meta['n_photos']} photos (L1 {meta['final_l1']:.4f}); "
              f"weights in {args.workspace}/upscale/")


# --- train ----------------------------------------------------------------------------------
TRAIN_HELP = "train a city-conditioned generator on the prepared photos"


def _add_train(sub, full: bool = True) -> None:
    if not full:   # train's flags come from TrainConfig, which imports torch: not for other verbs (replicas)
        sub.add_parser("train", help=TRAIN_HELP)
        return
    from neighbourhoods.train.config import add_arguments  # every flag, help and default from TrainConfig

    p = sub.add_parser("train", help=TRAIN_HELP)
    p.add_argument("--workspace", "-w", required=True, help="workspace folder (after ingest)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved options and exit without training")
    add_arguments(p)
    p.add_argument("--no-upscaler", action="store_true",
                   help="skip training the workspace's x2 upscaler after the run (done once per workspace, on its "
                        "training photos, when it has none: the upscaler generate and serve use by default)")
    p.set_defaults(func=_run_train)


def _run_train(args) -> None:
    from neighbourhoods.train import dry_run, train
    from neighbourhoods.train.config import from_arguments

    config = from_arguments(args)
    if args.dry_run:
        print(dry_run(args.workspace, config))
        return
    run_dir = train(args.workspace, config)
    if os.environ.get("RANK", "0") == "0":   # one line, not one per torchrun process
        if not args.no_upscaler:
            from neighbourhoods.upscale import ensure_sr
            meta = ensure_sr(args.workspace, progress=config.progress)
            if meta and config.progress:
                print(f"trained the workspace's x2 upscaler on {meta['n_photos']} photos (L1 {meta['final_l1']:.4f})",
                      file=sys.stderr)
        print(run_dir)


# --- evaluate / report -----------------------------------------------------------------------
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="FID, KID, precision/recall and novelty of a run against held-out photos")
    p.add_argument("--workspace", "-w", required=True, help="workspace folder")
    p.add_argument("--run", required=True, help="run name under WS/runs, or a run folder")
    p.add_argument("--n", type=int, default=2000, help="generated samples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="a city's k samples use seeds seed .. seed + k - 1 (its first k listings)")
    p.add_argument("--min-city-holdout", type=int, default=25, help="per-city KID for cities with at least this many held-out photos")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--size", type=_arg(ThumbSize.parse), default=None, metavar="WxH",
                   help="score the thumbnails as generate/serve make them at this size (e.g. 128x96, 256x192), "
                        "against the held-out photos cropped to that size (default: the samples themselves)")
    p.add_argument("--upscale", default=None, help="the served path's upscaler (default: what generate and serve use)")
    p.add_argument("--against", choices=["holdout", "train"], default="holdout",
                   help="the real photos: holdout (default), or train (the fixed draw of training photos the "
                        "training curve uses: reproduces its KID with --n 300)")
    p.add_argument("--no-gate", action="store_true",
                   help="score only the samples as drawn, not also the set as served through the guard "
                        "(novelty guard and realism gate, as generate and serve apply them)")
    p.add_argument("--realism-quantile", type=float, default=None,
                   help="the realism gate the served set is scored with (default 0.2; 0: the novelty guard alone)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_snapshot(p)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> None:
    from neighbourhoods.evaluate import EvaluateConfig, describe, evaluate

    config = EvaluateConfig(n=args.n, seed=args.seed, min_city_holdout=args.min_city_holdout, device=args.device,
                            size=args.size, upscale=args.upscale, against=args.against,
                            gated=not args.no_gate and args.against == "holdout")
    if args.realism_quantile is not None:
        config.realism_quantile = args.realism_quantile
    result = evaluate(args.workspace, args.run, config, progress=not args.json, snapshot=args.snapshot)
    if args.json:
        _print_json(result)
    else:
        print(describe(result))


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page: data, curves, samples, metrics, novelty")
    p.add_argument("--workspace", "-w", required=True, help="workspace folder")
    p.add_argument("--run", required=True, help="run name under WS/runs, or a run folder")
    p.add_argument("--out", help="HTML file to write (default WS/runs/RUN/report.html)")
    p.add_argument("--seeds", type=int, default=8, help="samples per city in the city grid")
    _add_snapshot(p)
    p.set_defaults(func=_run_report)


def _run_report(args) -> None:
    from neighbourhoods.report import write_report

    print(write_report(args.workspace, args.run, out=args.out, seeds=args.seeds, snapshot=args.snapshot))


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line, like every other error (argparse prints the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI; `command` given, only that verb needs its full flags (the others list their help)."""
    parser = _Parser(
        prog="neighbourhoods",
        description="Listing photos in, a city-conditioned generator of never-existing house photos out.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_ingest(sub)
    _add_cluster(sub); _add_select(sub)
    _add_train(sub, full=command in (None, "train"))
    _add_evaluate(sub); _add_report(sub)
    _add_demo(sub)
    _add_generate(sub); _add_publish(sub); _add_serve(sub); _add_sign(sub); _add_export(sub); _add_upscale(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except NeighbourhoodsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:   # faults from below that have a fix the user can apply: one line too
        message = _known_fault(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


def _known_fault(e: Exception) -> str | None:
    """A full disk or a damaged catalog wherever it surfaced (a library's own error type included)."""
    import sqlite3

    from neighbourhoods.core.catalog import damaged_error, is_damaged
    from neighbourhoods.core.errors import disk_full_error, is_disk_full

    if is_disk_full(e):
        return str(disk_full_error(getattr(e, "filename", None)))
    if isinstance(e, sqlite3.DatabaseError) and is_damaged(e):
        return str(damaged_error("of this workspace", e))
    return None


if __name__ == "__main__":
    sys.exit(main())
