"""`neighbourhoods cluster`: find the exteriors among mixed listing photos (`select` then picks them).

A listing feed mixes front exteriors with rooms, floorplans and the odd flyer; a generator
trained on all of them makes mush. `cluster` embeds every kept photo with a pretrained network
(embed.py), groups the embeddings with k-means, and explains each group three ways: a contact
sheet (photos nearest the centre and a random sample), its most likely ImageNet classes, and a
suggested name from the network's own class probabilities (exteriors / interiors / documents /
other, see features.IMAGENET_GROUPS). `select` then marks which clusters train, by number or
with `auto="exteriors"`.

    WS/clusters/clusters.json      what `cluster` found: config, per-cluster counts, scores, suggestion
    WS/clusters/index.html         one page with every contact sheet, to name clusters at a glance
    WS/clusters/cluster-<c>.png    contact sheet of cluster c
    catalog: photos.cluster        cluster of each kept photo (NULL for the rest)
    catalog: photos.selected       1 for kept photos in the selected clusters, 0 otherwise
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from neighbourhoods.cluster.embed import EmbedSummary, check_res, embed_photos, get_extractor, load_embeddings
from neighbourhoods.core import catalog
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.locks import writing_workspace
from neighbourhoods.core.workspace import Workspace, atomic_path, atomic_write_json, atomic_write_text, open_workspace
from neighbourhoods.nets.devices import Dist, init_distributed, pick_device
from neighbourhoods.nets.efficientnet import IMAGENET_GROUPS
from neighbourhoods.nets.imagenet_classes import IMAGENET_CLASSES

_GROUP_SUGGESTION = {"exterior": "exteriors", "interior": "interiors", "document": "documents"}
# A cluster is named after the ImageNet group with the highest mean probability, but only when
# that group holds at least this much of it: below, the network does not recognise the photos
# as any of the three and the cluster is "other" (people, pets, maps, logos, ...).
MIN_GROUP_SCORE = 0.2


@dataclass
class ClusterConfig:
    k: int = 4                              # number of clusters (the original system used 4)
    res: int = 224                          # embedding resolution, square side, multiple of 32
    extractor: str = "efficientnet_lite0"   # feature network, a key of embed.EXTRACTORS
    seed: int = 0                           # k-means seed: same photos and seed, same clusters
    batch_size: int = 64                    # photos per embedding batch
    workers: int = 0                        # decoding processes beside the main one
    device: str = "cpu"                     # cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)
    amp: str = "auto"                       # bf16 where native (CUDA, AMX CPUs), "bf16" or "off" (fp32)
    sheet_nearest: int = 16                 # contact sheet: photos nearest the cluster centre
    sheet_random: int = 16                  # contact sheet: random sample of the rest
    sheet_columns: int = 8                  # contact sheet: thumbnails per row
    thumb_height: int = 96                  # contact sheet: thumbnail height in px (4:3 thumbnails)


@dataclass
class ClusterInfo:
    cluster: int                            # cluster number, 0 = largest
    photos: int                             # kept photos in it
    share: float                            # fraction of all kept photos
    scores: dict[str, float]                # ImageNet group -> mean summed probability
    suggestion: str                         # exteriors / interiors / documents / other
    top_classes: list[tuple[str, float]]    # most likely ImageNet classes, mean probability
    sheet: str                              # contact sheet file name in WS/clusters


@dataclass
class ClusterSummary:
    config: ClusterConfig
    photos: int                             # kept photos clustered
    clusters: list[ClusterInfo]
    embed: EmbedSummary
    page: str                               # path of the HTML page
    inertia: float                          # k-means objective on the L2-normalised embeddings

    def to_json(self) -> dict:
        return {"config": asdict(self.config), "photos": self.photos, "inertia": self.inertia,
                "clusters": [asdict(c) for c in self.clusters], "embed": asdict(self.embed),
                "page": self.page}

    def describe(self) -> str:
        e = self.embed
        lines = [f"{self.photos} kept photos in {len(self.clusters)} clusters "
                 f"({e.extractor} at {e.res}px: {e.embedded} embedded"
                 + (f" at {e.photos_per_s:.1f} photos/s" if e.embedded else "") + f", {e.reused} reused)",
                 "",
                 f"{'cluster':>7}  {'photos':>6}  {'share':>6}  {'suggestion':<10}  "
                 f"{'exterior':>8}  {'interior':>8}  {'document':>8}  top ImageNet classes"]
        for c in self.clusters:
            top = ", ".join(f"{name} {p:.0%}" for name, p in c.top_classes[:3])
            lines.append(f"{c.cluster:>7}  {c.photos:>6}  {c.share:>6.1%}  {c.suggestion:<10}  "
                         f"{c.scores['exterior']:>8.2f}  {c.scores['interior']:>8.2f}  "
                         f"{c.scores['document']:>8.2f}  {top}")
        ext = [str(c.cluster) for c in self.clusters if c.suggestion == "exteriors"]
        lines += ["", f"contact sheets: {self.page}",
                  "next: `neighbourhoods select --workspace WS --auto exteriors`"
                  + (f" (clusters {','.join(ext)})" if ext else " (no cluster looks like exteriors: "
                     "look at the sheets and use --clusters)")
                  + " or `--clusters 0,2`"]
        return "\n".join(lines)


def group_scores(probs: np.ndarray) -> dict[str, np.ndarray]:
    """N x 1000 ImageNet probabilities -> group name -> N summed probabilities."""
    return {group: probs[:, sorted(classes)].sum(axis=1) for group, classes in IMAGENET_GROUPS.items()}


def cluster_class_scores(vectors: np.ndarray, labels: np.ndarray, k: int, class_probs,
                         batch: int = 8192) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(k x 1000 mean ImageNet probabilities, group -> k mean group scores), in batches so
    217k photos never hold a 217k x 1000 probability matrix (0.9 GB) in memory."""
    prob_sums = np.zeros((k, 1000), np.float64)
    group_sums = {g: np.zeros(k, np.float64) for g in IMAGENET_GROUPS}
    for start in range(0, len(vectors), batch):
        probs = class_probs(vectors[start:start + batch])
        lab = labels[start:start + batch]
        np.add.at(prob_sums, lab, probs)
        for g, s in group_scores(probs).items():
            group_sums[g] += np.bincount(lab, weights=s, minlength=k)
    counts = np.maximum(np.bincount(labels, minlength=k), 1)
    return prob_sums / counts[:, None], {g: s / counts for g, s in group_sums.items()}


def suggest(scores: dict[str, float]) -> str:
    """A cluster's name from its mean group scores (see MIN_GROUP_SCORE)."""
    group = max(scores, key=scores.get)
    return _GROUP_SUGGESTION[group] if scores[group] >= MIN_GROUP_SCORE else "other"


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, so k-means groups by direction (cosine similarity), which is
    what pretrained embeddings encode; their length mostly tracks contrast and texture."""
    vectors = np.asarray(vectors, dtype=np.float32)   # the store's float16 would overflow the squares
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def kmeans(unit: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """MiniBatchKMeans on unit-length rows -> (labels, unit-length centres, inertia).

    Clusters are renumbered by size, largest first, so numbers read the same run to run.
    """
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=2048, max_iter=200)
    labels = km.fit_predict(unit)
    sizes = np.bincount(labels, minlength=k)
    order = np.lexsort((np.arange(k), -sizes))        # largest first; ties by old number
    renumber = np.empty(k, dtype=np.int64)
    renumber[order] = np.arange(k)
    centres = km.cluster_centers_[order]
    centres = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    return renumber[labels], centres, float(km.inertia_)


def _thumbnail(path: str, height: int) -> Image.Image:
    width = height * 4 // 3
    try:
        with Image.open(path) as im:
            im.draft("RGB", (width, height))
            return ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), (width, height), Image.BILINEAR)
    except OSError:
        return Image.new("RGB", (width, height), (200, 0, 0))  # unreadable now: a red tile, not a crash


def contact_sheet(paths_nearest: list[str], paths_random: list[str], title: str, columns: int,
                  thumb_height: int) -> Image.Image:
    """Rows of thumbnails: first those nearest the centre, then a random sample, each under a caption."""
    tw, th, pad, caption = thumb_height * 4 // 3, thumb_height, 4, 18
    sections = [(f"{title}: nearest the centre", paths_nearest), ("random sample", paths_random)]
    height = pad
    for _, paths in sections:
        if paths:
            height += caption + -(-len(paths) // columns) * (th + pad)
    sheet = Image.new("RGB", (pad + columns * (tw + pad), height + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = pad
    for text, paths in sections:
        if not paths:
            continue
        draw.text((pad, y + 3), text, fill=(0, 0, 0))
        y += caption
        for i, path in enumerate(paths):
            row, col = divmod(i, columns)
            sheet.paste(_thumbnail(path, th), (pad + col * (tw + pad), y + row * (th + pad)))
        y += -(-len(paths) // columns) * (th + pad)
    return sheet


def _kept_paths(ws: Workspace) -> dict[int, str]:
    con = catalog.connect(ws.catalog_path)
    try:
        return {int(r["id"]): catalog.fs_path(r["path"])
                for r in con.execute("SELECT id, path FROM photos WHERE status = 'kept'")}
    finally:
        con.close()


def _write_page(ws: Workspace, summary: ClusterSummary) -> Path:
    cfg = summary.config
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>neighbourhoods: clusters</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}h2{margin-top:2em}"
        "table{border-collapse:collapse}td,th{padding:2px 10px;text-align:right}"
        "td:nth-child(4),th:nth-child(4),td:last-child,th:last-child{text-align:left}"
        ".ext{background:#e6f4e6}img{max-width:100%;border:1px solid #ccc}</style></head><body>",
        f"<h1>{summary.photos} photos in {len(summary.clusters)} clusters</h1>",
        f"<p>{html.escape(cfg.extractor)} embeddings at {cfg.res}px, MiniBatchKMeans k={cfg.k}, seed {cfg.seed}. "
        "Scores are the network's mean ImageNet probability summed over exterior-like, interior-like and "
        "document-like classes. Choose the clusters to train on with "
        "<code>neighbourhoods select --workspace WS --clusters 0,2</code> or "
        "<code>--auto exteriors</code>.</p>",
        "<table><tr><th>cluster</th><th>photos</th><th>share</th><th>suggestion</th><th>exterior</th>"
        "<th>interior</th><th>document</th><th>top ImageNet classes</th></tr>"]
    for c in summary.clusters:
        top = ", ".join(f"{html.escape(n)} {p:.0%}" for n, p in c.top_classes[:5])
        cls = " class='ext'" if c.suggestion == "exteriors" else ""
        parts.append(f"<tr{cls}><td><a href='#c{c.cluster}'>{c.cluster}</a></td><td>{c.photos}</td>"
                     f"<td>{c.share:.1%}</td><td>{c.suggestion}</td><td>{c.scores['exterior']:.2f}</td>"
                     f"<td>{c.scores['interior']:.2f}</td><td>{c.scores['document']:.2f}</td><td>{top}</td></tr>")
    parts.append("</table>")
    for c in summary.clusters:
        parts.append(f"<h2 id='c{c.cluster}'>Cluster {c.cluster}: {c.photos} photos ({c.share:.1%}), "
                     f"suggested: {c.suggestion}</h2>"
                     f"<img src='{html.escape(c.sheet)}' alt='contact sheet of cluster {c.cluster}'>")
    parts.append("</body></html>\n")
    page = ws.clusters_dir / "index.html"
    atomic_write_text(page, "\n".join(parts))
    return page


def cluster(workspace, config: ClusterConfig | None = None, progress: bool = True,
            on_chunk=None) -> ClusterSummary | None:
    """Embed new kept photos, cluster all of them, write the catalog's `cluster` column and the sheets.

    Under torchrun (WORLD_SIZE > 1) every process embeds its share (embed.py) and rank 0, which
    holds the workspace lock for all of them, clusters and writes; the others return None.
    """
    config = config or ClusterConfig()
    ws = open_workspace(workspace)
    dd = init_distributed(config.device, timeout_s=7 * 24 * 3600)   # shards may take hours
    try:
        with dd.main_holds(lambda: writing_workspace(ws.root, "cluster")):
            return _cluster_locked(workspace, config, progress, on_chunk, dd)
    finally:
        dd.close()


def _cluster_locked(workspace, config: ClusterConfig, progress: bool, on_chunk, dd: Dist) -> ClusterSummary | None:
    """cluster() under the workspace lock."""
    ws = open_workspace(workspace)
    check_res(config.res)
    if config.k < 2:
        raise NeighbourhoodsError(f"k must be at least 2, not {config.k}")
    paths = _kept_paths(ws)
    if len(paths) < config.k:
        raise NeighbourhoodsError(f"{len(paths)} kept photos cannot make {config.k} clusters; "
                                  "ingest more photos or lower -k")
    extractor = get_extractor(config.extractor, device=pick_device(config.device, dd), amp=config.amp)
    embed_summary = embed_photos(ws, extractor, res=config.res, batch_size=config.batch_size,
                                 workers=config.workers, progress=progress and dd.main, on_chunk=on_chunk, dd=dd)
    dd.barrier()   # every share is stored
    if not dd.main:
        return None
    ids, vectors = load_embeddings(ws, extractor.name, config.res)
    unit = l2_normalise(vectors)
    labels, centres, inertia = kmeans(unit, config.k, config.seed)

    # clusters.json goes first and comes back last: a run killed in between leaves no stale
    # suggestions for `select --auto` to apply to the new cluster numbers
    (ws.clusters_dir / "clusters.json").unlink(missing_ok=True)
    con = catalog.connect(ws.catalog_path)
    try:
        with con:
            con.execute("UPDATE photos SET cluster = NULL")
            con.executemany("UPDATE photos SET cluster = ? WHERE id = ?",
                            zip(labels.tolist(), ids.tolist()))
    finally:
        con.close()

    if extractor.class_probs is not None:
        mean_probs, scores = cluster_class_scores(vectors, labels, config.k, extractor.class_probs)
    del vectors
    rng = np.random.default_rng(config.seed)
    infos = []
    for c in range(config.k):
        members = np.flatnonzero(labels == c)
        if extractor.class_probs is not None:
            mean_scores = {g: float(s[c]) for g, s in scores.items()}
            top = [(IMAGENET_CLASSES[i], float(mean_probs[c, i])) for i in np.argsort(-mean_probs[c])[:5]]
        else:  # an extractor without a classifier: clusters still work, suggestions do not
            mean_scores, top = {g: 0.0 for g in IMAGENET_GROUPS}, []
        nearest = members[np.argsort(-(unit[members] @ centres[c]), kind="stable")[:config.sheet_nearest]]
        rest = np.setdiff1d(members, nearest)
        sample = rng.choice(rest, size=min(config.sheet_random, len(rest)), replace=False) if len(rest) else rest
        sheet_name = f"cluster-{c}.png"
        sheet = contact_sheet([paths[int(ids[i])] for i in nearest], [paths[int(ids[i])] for i in sorted(sample)],
                              f"cluster {c} ({len(members)} photos)", config.sheet_columns, config.thumb_height)
        with atomic_path(ws.clusters_dir / sheet_name) as tmp:
            sheet.save(tmp, format="PNG")
        infos.append(ClusterInfo(cluster=c, photos=int(len(members)), share=len(members) / len(ids),
                                 scores=mean_scores,
                                 suggestion=suggest(mean_scores) if extractor.class_probs is not None else "other",
                                 top_classes=top, sheet=sheet_name))

    summary = ClusterSummary(config=config, photos=int(len(ids)), clusters=infos, embed=embed_summary,
                             page="", inertia=inertia)
    for stale in ws.clusters_dir.glob("cluster-*.png"):   # sheets of an earlier run with a larger k
        if stale.name not in {c.sheet for c in infos}:
            stale.unlink()
    summary.page = str(_write_page(ws, summary))
    atomic_write_json(ws.clusters_dir / "clusters.json", summary.to_json())
    return summary
