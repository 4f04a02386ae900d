"""`neighbourhoods report`: one self-contained HTML page about a run, to read or send around.

Everything is inside the file: images are PNG data URIs, plots are inline SVG drawn here (no
plotting dependency, and text stays sharp and searchable). Sections:

1. metrics: what `evaluate` (neighbourhoods.scoring.score_run) wrote for the run's latest
   checkpoint scored (FID, KID, precision/recall, per-city KID, the real-vs-real floor,
   memorisation rates; the thumbnails' figures at each served size beside them), or the command
   that produces them;
2. data: what ingest kept and rejected, the train/held-out split per city, clusters if any;
3. training curves: losses and the cheap training KID from metrics.jsonl;
4. progress: the fixed-seed sample grids over training (same seeds, getting better);
5. cities: fresh samples of every city from the latest generator (cities down, seeds across);
6. novelty: the samples most similar to a training photo beside their nearest photos, most
   similar first, and where generated and held-out photos fall against the threshold.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from neighbourhoods.core import catalog
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.resolution import res_name
from neighbourhoods.core.workspace import Workspace, atomic_write_text, open_workspace
from neighbourhoods.models import runs
from neighbourhoods.models.runs import eval_dir
from neighbourhoods.scoring import NOVELTY_FILE, evaluations

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


# --- small builders -----------------------------------------------------------------------------
def esc(value) -> str:
    return html.escape(str(value), quote=True)


def png_data_uri(image: np.ndarray | Image.Image) -> str:
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def jpeg_data_uri(path: str | Path) -> str:
    """A JPEG file as it is (the served sheets are JPEG already)."""
    return "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def img_tag(image, alt: str, width: int | None = None, cls: str = "") -> str:
    w = f' width="{int(width)}"' if width else ""
    c = f' class="{cls}"' if cls else ""
    return f'<img src="{png_data_uri(image)}" alt="{esc(alt)}"{w}{c}>'


def image_row(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """Images side by side on white, one uint8 array."""
    n, h, w, _ = images.shape
    out = np.full((h, n * w + (n - 1) * pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        out[:, i * (w + pad): i * (w + pad) + w] = image
    return out


def table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    step = 10 ** np.floor(np.log10(raw))
    for mult in (1, 2, 5, 10):
        if raw <= mult * step:
            step *= mult
            break
    start = np.ceil(lo / step) * step
    return [0.0 if abs(v) < step * 1e-6 else float(v) for v in np.arange(start, hi + step * 1e-9, step)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def svg_chart(series: list[dict], x_label: str, y_label: str, width: int = 640, height: int = 260,
              vlines: list[tuple[float, str]] = (), kind: str = "line") -> str:
    """Inline SVG. series: {"label", "x", "y", optional "err" (band), "color"}; kind "line" or "step"."""
    series = [s for s in series if len(s["x"])]
    if not series:
        return '<p class="note">no data</p>'
    left, right, top, bottom = 60, 16, 12, 42
    xs = np.concatenate([np.asarray(s["x"], float) for s in series])
    lows = [np.asarray(s["y"], float) - np.asarray(s.get("err", 0.0), float) for s in series]
    highs = [np.asarray(s["y"], float) + np.asarray(s.get("err", 0.0), float) for s in series]
    ys = np.concatenate(lows + highs)
    ys = ys[np.isfinite(ys)]
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = (float(ys.min()), float(ys.max())) if len(ys) else (0.0, 1.0)
    for v, _ in vlines:
        x0, x1 = min(x0, v), max(x1, v)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom
    sx = lambda v: left + (v - x0) / (x1 - x0) * pw          # noqa: E731
    sy = lambda v: top + (1 - (v - y0) / (y1 - y0)) * ph     # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(y_label)} against {esc(x_label)}">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    for t in _ticks(x0, x1):
        parts.append(f'<line x1="{sx(t):.1f}" y1="{top + ph}" x2="{sx(t):.1f}" y2="{top + ph + 4}" stroke="#666"/>'
                     f'<text x="{sx(t):.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{_fmt(t)}</text>')
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" font-size="11" text-anchor="end">{_fmt(t)}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" font-size="12" text-anchor="middle">{esc(x_label)}</text>'
                 f'<text x="14" y="{top + ph / 2}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + ph / 2})">{esc(y_label)}</text>')
    for i, s in enumerate(series):
        color = s.get("color", PALETTE[i % len(PALETTE)])
        x, y = np.asarray(s["x"], float), np.asarray(s["y"], float)
        if "err" in s:
            e = np.asarray(s["err"], float)
            band = [f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(x, y + e)] + \
                   [f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(x[::-1], (y - e)[::-1])]
            parts.append(f'<polygon points="{" ".join(band)}" fill="{color}" fill-opacity="0.15" stroke="none"/>')
        if kind == "step":
            pts = []
            for a, b, c in zip(x[:-1], x[1:], y[:-1]):
                pts += [f"{sx(a):.1f},{sy(c):.1f}", f"{sx(b):.1f},{sy(c):.1f}"]
        else:
            pts = [f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(x, y) if np.isfinite(b)]
        parts.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        if kind == "line" and len(x) <= 40:
            parts += [f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="2.2" fill="{color}"/>'
                      for a, b in zip(x, y) if np.isfinite(b)]
        parts.append(f'<rect x="{left + 10}" y="{top + 8 + 16 * i}" width="12" height="3" fill="{color}"/>'
                     f'<text x="{left + 28}" y="{top + 13 + 16 * i}" font-size="11">{esc(s["label"])}</text>')
    for v, label in vlines:
        # label on the side of the line with more room, so it never runs off the plot
        anchor, dx = ("end", -4) if sx(v) > left + pw * 0.6 else ("start", 4)
        parts.append(f'<line x1="{sx(v):.1f}" y1="{top}" x2="{sx(v):.1f}" y2="{top + ph}" stroke="#000" '
                     f'stroke-dasharray="4 3"/><text x="{sx(v) + dx:.1f}" y="{top + 14}" font-size="11" '
                     f'text-anchor="{anchor}">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(groups: list[tuple[str, np.ndarray]], x_label: str, threshold: float | None = None,
                  bins: int = 40) -> str:
    """Normalised histograms (fraction per bin) of several groups on shared bins, as step lines."""
    values = np.concatenate([np.asarray(v, float) for _, v in groups if len(v)] or [np.zeros(1)])
    lo, hi = float(values.min()), float(values.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-3, bins + 1)
    series = []
    for label, v in groups:
        if not len(v):
            continue
        counts, _ = np.histogram(np.asarray(v, float), bins=edges)
        frac = counts / counts.sum()
        series.append({"label": f"{label} (n={len(v)})", "x": edges, "y": np.append(frac, frac[-1])})
    vlines = [(threshold, f"threshold {threshold:.3f}")] if threshold is not None else []
    return svg_chart(series, x_label, "fraction of images", vlines=vlines, kind="step")


# --- sections ---------------------------------------------------------------------------------------
def data_section(ws: Workspace, res: tuple[int, int]) -> str:
    if not ws.catalog_path.is_file():
        return "<p class='note'>no catalog in the workspace</p>"
    con = catalog.connect_readonly(ws.catalog_path)
    try:
        status = con.execute("SELECT status, COUNT(*) AS n FROM photos GROUP BY status ORDER BY n DESC").fetchall()
        reasons = con.execute("SELECT reason, COUNT(*) AS n FROM photos WHERE status = 'rejected' "
                              "GROUP BY reason ORDER BY n DESC LIMIT 10").fetchall()
        near = con.execute("SELECT COUNT(*) FROM photos WHERE near_duplicate_of IS NOT NULL").fetchone()[0]
        cities = con.execute(
            "SELECT COALESCE(label, '(no label)') AS city, "
            "SUM(split = 'train' AND selected = 1) AS train, SUM(split = 'holdout' AND selected = 1) AS holdout, "
            "SUM(selected = 0) AS deselected FROM photos WHERE status = 'kept' GROUP BY label "
            "ORDER BY train + holdout DESC").fetchall()
        clusters = con.execute("SELECT cluster, COUNT(*) AS n, SUM(selected) AS selected FROM photos "
                               "WHERE status = 'kept' AND cluster IS NOT NULL GROUP BY cluster ORDER BY cluster").fetchall()
    finally:
        con.close()
    total = sum(r["n"] for r in status)
    parts = [f"<p>{total} input files: " + ", ".join(f"{r['n']} {esc(r['status'])}" for r in status)
             + f"; {near} flagged as near-duplicates. Prepared at {esc(res_name(res))}.</p>"]
    if reasons:
        parts.append("<h3>Rejected, by reason</h3>" + table(["reason", "files"], [[esc(r["reason"]), r["n"]] for r in reasons]))
    shown = cities[:25]
    rows = [[esc(r["city"]), r["train"] or 0, r["holdout"] or 0, r["deselected"] or 0] for r in shown]
    more = f"<p class='note'>... and {len(cities) - len(shown)} more cities</p>" if len(cities) > len(shown) else ""
    parts.append("<h3>Photos per city (kept)</h3>" + table(["city", "train", "held out", "not selected"], rows) + more)
    if clusters:
        parts.append("<h3>Clusters</h3>" + table(["cluster", "photos", "selected for training"],
                                                [[r["cluster"], r["n"], r["selected"] or 0] for r in clusters]))
    return "\n".join(parts)


def read_metrics_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue   # a line torn by a kill mid-write: skip it, keep the rest
    return out


def curves_section(run_dir: Path) -> str:
    log = read_metrics_log(run_dir)
    if not log:
        return "<p class='note'>no metrics.jsonl yet</p>"
    kimg = np.array([r.get("images_seen", 0) / 1000 for r in log])
    series = [{"label": key, "x": kimg, "y": np.array([r.get(key, np.nan) for r in log], float)}
              for key in ("loss_d", "loss_g") if any(key in r for r in log)]
    parts = ["<h3>Losses</h3>" + svg_chart(series, "thousands of images shown (kimg)", "loss")]
    # the training curve: against training photos (kid_train, which picks the best snapshot), or, in
    # runs written before best snapshots, against the held-out photos (kid)
    key = "kid_train" if any(r.get("kid_train") is not None for r in log) else "kid"
    kid_rows = [r for r in log if r.get(key) is not None]
    if kid_rows:
        def value(r):
            k = r[key]
            return (k[0], k[1]) if isinstance(k, (list, tuple)) else (k, r.get(f"{key}_std", 0.0))
        vals = np.array([value(r) for r in kid_rows], float) * 1000
        best = runs.best_snapshot(run_dir)
        marks = [(best["images_seen"] / 1000, "best")] if best else []
        against = "a fixed draw of training photos" if key == "kid_train" else "held-out photos"
        parts.append(f"<h3>KID during training (x1e-3, {against}, a few hundred samples)</h3>" + svg_chart(
            [{"label": "KID", "x": [r["images_seen"] / 1000 for r in kid_rows], "y": vals[:, 0], "err": vals[:, 1]}],
            "thousands of images shown (kimg)", "KID x 1e-3", vlines=marks)
            + (f"<p class='note'>best snapshot (used by generate, serve, export, evaluate and this report unless "
               f"told --snapshot last): {best['images_seen']:,} images</p>" if best else ""))
    else:
        parts.append("<p class='note'>no KID in metrics.jsonl: train with kid_every > 0 to log it</p>")
    parts += served_curves(run_dir)
    return "\n".join(parts)


def served_curves(run_dir: Path) -> list[str]:
    """KID, precision and recall at each served size over the snapshots `evaluate` scored there
    (bench/curve.py scores every kept checkpoint): does more compute buy more photo?"""
    points: dict[str, list[tuple[int, dict]]] = {}
    for path in sorted((Path(run_dir) / "eval").glob("*/metrics-*.json")):
        try:
            points.setdefault(path.stem.split("-", 1)[1], []).append((int(path.parent.name),
                                                                     json.loads(path.read_text())["quality"]))
        except (ValueError, KeyError, json.JSONDecodeError):
            continue
    out = []
    for size, rows in points.items():
        if len(rows) < 2:
            continue
        x = [images / 1000 for images, _ in rows]
        kid = np.array([[q["kid"]["mean"], q["kid"]["std"]] for _, q in rows], float) * 1000
        out.append(f"<h3>Quality of the thumbnails served at {esc(size)} over training (held-out photos)</h3>"
                   + svg_chart([{"label": "KID", "x": x, "y": kid[:, 0], "err": kid[:, 1]}],
                               "thousands of images shown (kimg)", "KID x 1e-3")
                   + svg_chart([{"label": "recall", "x": x, "y": [q["recall"] or 0.0 for _, q in rows]},
                                {"label": "precision", "x": x, "y": [q["precision"] or 0.0 for _, q in rows]}],
                               "thousands of images shown (kimg)", "precision, recall"))
    return out


def progress_section(run_dir: Path, max_grids: int = 6) -> str:
    grids = sorted((Path(run_dir) / "samples").glob("progress-*.png"))
    if not grids:
        return "<p class='note'>no sample grids yet</p>"
    picks = sorted(set(np.linspace(0, len(grids) - 1, min(max_grids, len(grids))).round().astype(int).tolist()))
    cells = []
    for i in picks:
        path = grids[i]
        kimg = int(path.stem.split("-")[-1]) / 1000
        with Image.open(path) as img:
            width = min(2 * img.width, 520)
            cells.append(f"<figure>{img_tag(img.convert('RGB'), f'samples at {kimg:g} kimg', width=width, cls='grid')}"
                         f"<figcaption>{kimg:g} kimg</figcaption></figure>")
    return (f"<p>The same fixed seeds per city at {len(picks)} of {len(grids)} snapshots "
            "(one row per city).</p><div class='progress'>" + "".join(cells) + "</div>")


def cities_section(gen: runs.LoadedGenerator, seeds: int = 8, max_cities: int = 16, scale: int = 2) -> str:
    names = gen.class_names[:max_cities]
    rows = []
    for c, name in enumerate(names):
        images = runs.sample(gen, [c] * seeds, list(range(seeds)))
        strip = image_row(images)
        rows.append([f"<b>{esc(name)}</b>", img_tag(strip, f"samples of {name}", width=strip.shape[1] * scale)])
    more = (f"<p class='note'>{len(gen.class_names) - len(names)} more classes not shown</p>"
            if len(gen.class_names) > len(names) else "")
    return (f"<p>Seeds 0-{seeds - 1} of each class, from the latest generator "
            f"({gen.images_seen / 1000:g} kimg).</p>" + table(["city", "samples"], rows, cls="cities") + more)


def _prepared_lookup(ws: Workspace, res: tuple[int, int]):
    folder = ws.prepared_dir(res)
    images = np.load(folder / "images.npy", mmap_mode="r")
    ids = np.load(folder / "photo_ids.npy")
    row = {int(p): i for i, p in enumerate(ids)}
    return lambda pid: np.asarray(images[row[int(pid)]]) if int(pid) in row else None


def novelty_section(ws: Workspace, run_dir: Path, evaluation: dict | None, scale: int = 2) -> str:
    if evaluation is None:
        return "<p class='note'>not evaluated yet</p>"
    path = eval_dir(run_dir, evaluation["images_seen"]) / NOVELTY_FILE
    if not path.is_file():
        return "<p class='note'>novelty data missing: run evaluate again</p>"
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    lookup = _prepared_lookup(ws, tuple(evaluation["res"]))
    spaces = [s for s in ("inception", "efficientnet", "efficientnet-native") if f"{s}_similarity" in data]
    parts = []
    for s in spaces:
        thr = float(data[f"{s}_threshold"])
        parts.append(f"<h3>Nearest-training-photo similarity, {esc(s)} features</h3>" + svg_histogram(
            [("generated", data[f"{s}_all_similarity"]), ("held-out real", data[f"{s}_holdout_similarity"])],
            "cosine similarity to the nearest training photo", threshold=thr))
    rows = []
    names = [str(n) for n in data["class_names"]]
    for i in range(len(data["images"])):
        cells = [img_tag(data["images"][i], "generated", width=data["images"][i].shape[1] * scale)]
        for s in spaces:
            sim, pid, thr = float(data[f"{s}_similarity"][i]), int(data[f"{s}_photo_id"][i]), float(data[f"{s}_threshold"])
            real = lookup(pid)
            pic = img_tag(real, f"training photo {pid}", width=real.shape[1] * scale) if real is not None \
                else f"<span class='note'>photo {pid} not prepared</span>"
            flag = " <b class='flag'>above threshold</b>" if sim > thr else ""
            cells.append(f"{pic}<br><small>#{pid}, similarity {sim:.4f}{flag}</small>")
        rows.append([esc(names[int(data['classes'][i])])] + cells)
    parts.append("<h3>Generated images beside their nearest training photos, most similar first</h3>"
                 + table(["city", "generated"] + [f"nearest ({s})" for s in spaces], rows, cls="pairs"))
    return "\n".join(parts)


def _kid(k: dict | None) -> str:
    return f"{k['mean'] * 1000:.2f} ± {k['std'] * 1000:.2f}" if k else "-"


def _num(value, fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def quality_rows(q: dict, floor: dict | None) -> list[list[str]]:
    """FID, KID, precision, recall: the scored images' and the real-vs-real floor's."""
    floor = floor or {}
    return [["FID (lower is better)", _num(q.get("fid"), ".2f"), _num(floor.get("fid"), ".2f")],
            ["KID x1e-3 (mean ± std over subsets)", _kid(q["kid"]), _kid(floor.get("kid"))],
            ["precision (fidelity)", _num(q.get("precision"), ".3f"), _num(floor.get("precision"), ".3f")],
            ["recall (coverage)", _num(q.get("recall"), ".3f"), _num(floor.get("recall"), ".3f")]]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def served_section(served: list[dict]) -> str:
    """The figures of the thumbnails as served (evaluate --size), one column per size."""
    if not served:
        return ""
    rows = [["scored as"] + [esc(e.get("scored_at", "?")) for e in served]]
    for i, name in enumerate(["FID", "KID x1e-3", "precision", "recall"]):
        rows.append([name] + [quality_rows(e["quality"], None)[i][1] for e in served])
    rows.append(["real-vs-real floor: FID"] + [quality_rows(e["quality"], e.get("real_vs_real_floor"))[0][2]
                                                for e in served])
    rows.append(["within-city diversity"] + [_num(e["quality"].get("within_city_diversity"), ".2f") for e in served])
    rows.append(["within-city near-duplicates"] + [_pct(e["quality"].get("near_duplicates")) for e in served])
    if any(e.get("gated") for e in served):   # the same listings through the guard, as generate and serve give them
        gated = [e.get("gated") or {} for e in served]
        rows.append(["<b>through the gates</b> (novelty guard, realism gate, distinct listings)"]
                    + [esc(g.get("guard", "not scored")) for g in gated])
        for i, name in enumerate(["FID", "KID x1e-3", "precision", "recall"]):
            rows.append([f"&nbsp;&nbsp;{name}"] + [quality_rows(g, None)[i][1] if g else "-" for g in gated])
        rows.append(["&nbsp;&nbsp;within-city diversity"] + [_num(g.get("within_city_diversity"), ".2f") for g in gated])
        rows.append(["&nbsp;&nbsp;within-city near-duplicates"] + [_pct(g.get("near_duplicates")) for g in gated])
        rows.append(["&nbsp;&nbsp;served at the first seed"] + [_pct(g.get("accepted_share")) for g in gated])
        rows.append(["&nbsp;&nbsp;memorised in any space"] + [_pct(g.get("memorised_any_space")) for g in gated])
        rows.append(["&nbsp;&nbsp;served below the gate / one house with an earlier listing (no attempt passed)"]
                    + [f"{g['below_gate']} / {g.get('not_distinct', 0)}" if g else "-" for g in gated])
    per_city = ""
    for e in served:   # the realism gate per city: how much of each city it lets through at the first seed
        cities = [c for c in e.get("per_city", []) if "gated" in c]
        if cities:
            per_city += (f"<h3>Per city as served at {e['config']['size'][0]}x{e['config']['size'][1]}: as drawn and "
                         "through the gates</h3>" + table(
                             ["city", "KID drawn", "KID served", "near-dup. drawn", "near-dup. served",
                              "served at the first seed"],
                             [[esc(c["city"]), _kid(c["kid"]), _kid(c["gated"]["kid"]), _pct(c.get("near_duplicates")),
                               _pct(c["gated"].get("near_duplicates")), _pct(c["gated"].get("accepted_share"))]
                              for c in cities]))
    sheets = [e for e in served if e.get("sheet") and Path(e["sheet"]).is_file()]
    figures = "".join(f"<figure><img src='{jpeg_data_uri(e['sheet'])}' alt='the set as served' class='sheet'>"
                      f"<figcaption>{e['config']['size'][0]}x{e['config']['size'][1]}: per city, held-out photos, "
                      "samples as drawn, the same listings as served, and first attempts the guard rejected "
                      "(with why)</figcaption></figure>" for e in sheets)
    return ("<h3>As served: thumbnails against the held-out photos cropped to the same size</h3>"
            + table(["", *[f"{e['config']['size'][0]}x{e['config']['size'][1]}" for e in served]], rows)
            + per_city + figures)


def metrics_section(evaluation: dict | None, ws: Workspace, run_name: str, gen=None, seeds: int = 8,
                    served: list[dict] = ()) -> str:
    if evaluation is None:
        return (f"<p class='note'>No evaluation of this run yet. Run <code>neighbourhoods evaluate --workspace "
                f"{esc(ws.root)} --run {esc(run_name)}</code> and write the report again.</p>")
    q, nov, floor = evaluation["quality"], evaluation.get("novelty") or {}, evaluation.get("real_vs_real_floor")
    rows = quality_rows(q, floor)
    if q.get("within_city_diversity") is not None:
        rows.append(["within-city diversity (1.0 = as varied as the city's real photos)",
                     f"{q['within_city_diversity']:.2f}", "1.00 by construction"])
    if q.get("near_duplicates") is not None:
        rows.append(["within-city near-duplicates (same-city pairs more alike than the photos' 99th percentile)",
                     _pct(q["near_duplicates"]), "1% by construction"])
    for s, v in nov.items():
        if isinstance(v, dict):
            rows.append([f"memorised, {s} space (threshold {v['threshold']:.4f})",
                         f"{v['memorisation_rate'] * 100:.1f}%", "1% by construction"])
    if "either_space_rate" in nov:
        rows.append(["memorised in any space", f"{nov['either_space_rate'] * 100:.1f}%", "-"])
    head = (f"<p>{evaluation['n_generated']} samples of {esc(evaluation['run'])} at "
            f"{evaluation['images_seen'] / 1000:g} kimg against {evaluation['n_holdout']} held-out photos, scored as "
            f"{esc(evaluation.get('scored_at', res_name(tuple(evaluation['res']))))} "
            f"({esc(evaluation['evaluated_at'])}). The floor column compares "
            f"{floor['n'] if floor else 0} training photos with the same held-out photos: what a generator "
            "indistinguishable from the data would score at this size.</p>")
    out = head + table(["metric", "generated", "real-vs-real floor"], rows, cls="metrics") + served_section(served)
    if evaluation["per_city"]:
        rows = []
        for c in evaluation["per_city"]:
            row = [esc(c["city"]), _kid(c["kid"]), f"{c['diversity']:.2f}" if "diversity" in c else "-",
                   _pct(c.get("near_duplicates")), c["generated"], c["holdout"]]
            if gen is not None and c["city"] in gen.class_names:   # the seeds behind the diversity figure
                strip = image_row(runs.sample(gen, [gen.class_names.index(c["city"])] * seeds, list(range(seeds))))
                row.append(img_tag(strip, f"seeds of {c['city']}", width=strip.shape[1] * 2))
            rows.append(row)
        out += "<h3>Per city: KID x1e-3 and within-city diversity</h3>" + table(
            ["city", "KID", "diversity", "near-duplicates", "samples", "held-out photos"]
            + (["seeds"] if gen is not None else []), rows)
    return out


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:middle}
th{background:#f4f4f4} .note{color:#777} .flag{color:#c00} figure{display:inline-block;margin:4px 8px;vertical-align:top}
figcaption{text-align:center;font-size:13px;color:#555} img.grid{max-width:520px;height:auto} img.sheet{max-width:100%;height:auto}
.progress{overflow-x:auto;white-space:nowrap} code{background:#f4f4f4;padding:1px 4px}
"""


def build_report(ws: Workspace, run: str, seeds: int = 8, max_cities: int = 16, snapshot: str = "best") -> str:
    """The report's HTML, as a string: of the run's `snapshot` (best, where it keeps one, or last)."""
    run_dir = runs.resolve_run(ws, run)
    gen = runs.load_generator(run_dir, snapshot=snapshot)
    found = evaluations(run_dir, gen.images_seen)   # the samples' figures first, then each served size's
    evaluation = found[0] if found else None
    config = gen.config
    title = f"neighbourhoods report: {run_dir.name}"
    sections = [
        ("Metrics", metrics_section(evaluation, ws, run_dir.name, gen=gen, seeds=seeds, served=found[1:])),
        ("Data", data_section(ws, tuple(gen.res))),
        ("Training curves", curves_section(run_dir)),
        ("Progress (fixed seeds over training)", progress_section(run_dir)),
        ("Cities", cities_section(gen, seeds=seeds, max_cities=max_cities)),
        ("Novelty", novelty_section(ws, run_dir, evaluation)),
    ]
    body = "".join(f"<section><h2>{esc(name)}</h2>{content}</section>" for name, content in sections)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class='note'>model {esc(config.get('model', '?'))}, "
            f"{esc(res_name(tuple(gen.res)))}, {len(gen.class_names)} classes, {gen.snapshot} snapshot at "
            f"{gen.images_seen / 1000:g} kimg; "
            f"written {esc(time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))}</p>{body}</body></html>")


def write_report(workspace: Workspace | str, run: str, out: str | Path | None = None, seeds: int = 8,
                 max_cities: int = 16, snapshot: str = "best") -> Path:
    """Write the report (default WS/runs/<run>/report.html) atomically; returns its path."""
    ws = workspace if isinstance(workspace, Workspace) else open_workspace(workspace)
    if seeds < 1 or max_cities < 1:
        raise NeighbourhoodsError("seeds and max_cities must be at least 1")
    run_dir = runs.resolve_run(ws, run)
    path = Path(out) if out is not None else run_dir / "report.html"
    atomic_write_text(path, build_report(ws, run, seeds=seeds, max_cities=max_cities, snapshot=snapshot))
    return path
