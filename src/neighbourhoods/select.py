"""`neighbourhoods select`: choose which clusters' photos train.

Reads what `cluster` wrote (WS/clusters/clusters.json) and marks the kept photos of the
chosen clusters `selected` in the catalog; `train` reads only those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from neighbourhoods.core import catalog
from neighbourhoods.core.catalog import SUGGESTIONS
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.locks import writing_workspace
from neighbourhoods.core.workspace import Workspace, open_workspace


@dataclass
class SelectSummary:
    clusters: list[int]          # clusters selected
    selected: int                # kept photos now selected
    kept: int                    # kept photos in all

    def describe(self) -> str:
        return (f"selected clusters {','.join(map(str, self.clusters))}: "
                f"{self.selected} of {self.kept} kept photos will train ({self.kept - self.selected} left out)")


def load_clusters(ws: Workspace) -> dict:
    path = ws.clusters_dir / "clusters.json"
    if not path.is_file():
        raise NeighbourhoodsError(f"{ws.root} has no clusters yet: run `neighbourhoods cluster --workspace {ws.root}` first")
    return json.loads(path.read_text())


def select(workspace, clusters: list[int] | None = None, auto: str | None = None) -> SelectSummary:
    """Mark kept photos in `clusters` (or in the clusters suggested as `auto`) selected, all others not."""
    with writing_workspace(open_workspace(workspace).root, "select"):
        return _select_locked(workspace, clusters, auto)


def _select_locked(workspace, clusters: list[int] | None = None, auto: str | None = None) -> SelectSummary:
    """select() under the workspace lock."""
    ws = open_workspace(workspace)
    info = load_clusters(ws)
    known = {c["cluster"]: c for c in info["clusters"]}
    if (clusters is None) == (auto is None):
        raise NeighbourhoodsError("give either --clusters (e.g. 0,2) or --auto exteriors")
    if auto is not None:
        if auto not in SUGGESTIONS:
            raise NeighbourhoodsError(f"--auto takes one of {', '.join(SUGGESTIONS)}, not {auto!r}")
        clusters = [c for c, v in known.items() if v["suggestion"] == auto]
        if not clusters:
            table = "; ".join(f"{c}: {v['suggestion']}" for c, v in sorted(known.items()))
            raise NeighbourhoodsError(f"no cluster is suggested as {auto} ({table}); "
                                      f"look at {ws.clusters_dir / 'index.html'} and pass --clusters")
    clusters = sorted(set(clusters))
    unknown = [c for c in clusters if c not in known]
    if unknown:
        raise NeighbourhoodsError(f"no cluster {','.join(map(str, unknown))}: the workspace has clusters "
                                  f"0..{len(known) - 1}")
    con = catalog.connect(ws.catalog_path)
    try:
        unclustered = con.execute("SELECT COUNT(*) FROM photos WHERE status = 'kept' AND cluster IS NULL").fetchone()[0]
        if unclustered:
            raise NeighbourhoodsError(f"{unclustered} kept photos were ingested after the last `cluster` run; "
                                      "run `neighbourhoods cluster` again (earlier embeddings are reused)")
        marks = ",".join("?" * len(clusters))
        with con:
            con.execute(f"UPDATE photos SET selected = CASE WHEN status = 'kept' AND cluster IN ({marks}) "
                        "THEN 1 ELSE 0 END", clusters)
            con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('selected_clusters', ?)",
                        (json.dumps(clusters),))
        selected = con.execute("SELECT COUNT(*) FROM photos WHERE selected = 1").fetchone()[0]
        kept = con.execute("SELECT COUNT(*) FROM photos WHERE status = 'kept'").fetchone()[0]
    finally:
        con.close()
    return SelectSummary(clusters=clusters, selected=int(selected), kept=int(kept))


def selected_paths(workspace) -> list[str]:
    """Paths of the kept photos that are selected to train, in catalog order."""
    ws = open_workspace(workspace)
    con = catalog.connect_readonly(ws.catalog_path)
    try:
        rows = con.execute("SELECT path FROM photos WHERE status = 'kept' AND selected = 1 ORDER BY id").fetchall()
    finally:
        con.close()
    return [catalog.fs_path(r["path"]) for r in rows]
