"""`neighbourhoods evaluate`: how real do a run's samples look, and are they new?

A thin verb over the project's one scoring protocol, `neighbourhoods.scoring` (its module doc
says which cities, seeds, sizes, feature spaces and figures): FID, KID, precision/recall,
per-city KID and within-city diversity against the held-out split, the real-vs-real floor,
and novelty (nearest training photo, memorisation rate) in each feature space. bench/quality.py
and the training curve's KID score through the same function, so `evaluate` with the same
`--n`, `--seed` and `--size` reproduces their figures.

Results go to WS/runs/<run>/eval/<images_seen:010d>/metrics.json (metrics-WxH.json with
`--size`, beside it), with novelty.npz (the most memorised-looking samples and their nearest
photos) for the report.
"""

from __future__ import annotations

from pathlib import Path

from neighbourhoods.core.resolution import res_name
from neighbourhoods.core.workspace import Workspace
from neighbourhoods.models.runs import eval_dir, latest_evaluation  # noqa: F401 (the API)
from neighbourhoods.scoring import (  # noqa: F401 (the API)
    ScoringConfig,
    allocate,
    class_of_label,
    real_photos_at,
    score_run,
    served_thumbnails,
)

EvaluateConfig = ScoringConfig   # evaluate's options are the protocol's


def evaluate(workspace: Workspace | str, run: str | Path, config: ScoringConfig | None = None,
             progress: bool = True, snapshot: str = "best") -> dict:
    """Score the run's best (or `snapshot` "last": latest) generator (scoring.score_run); writes
    and returns the metrics."""
    return score_run(workspace, run, config or ScoringConfig(), progress=progress, snapshot=snapshot)


def _kid(k: dict) -> str:
    return f"{k['mean'] * 1000:.2f} ± {k['std'] * 1000:.2f}"


def _quality_line(q: dict) -> str:
    parts = [f"FID {q['fid']:.2f}" if q.get("fid") is not None else None, f"KID {_kid(q['kid'])} (x1e-3)",
             f"precision {q['precision']:.3f}   recall {q['recall']:.3f}" if q.get("precision") is not None else None]
    return "   ".join(p for p in parts if p)


def describe(result: dict) -> str:
    q, n = result["quality"], result.get("novelty")
    against = "training photos (a fixed draw)" if result.get("config", {}).get("against") == "train" else "held-out photos"
    snapshot = f" ({result['snapshot']} snapshot)" if result.get("snapshot") else ""
    lines = [f"run {result['run']} at {result['images_seen'] / 1000:.1f} kimg{snapshot}, "
             f"{res_name(tuple(result['res']))}: {result['n_generated']} samples vs {result['n_holdout']} {against}, "
             "scored as "
             f"{result.get('scored_at', 'samples')}",
             "  " + _quality_line(q)]
    floor = result.get("real_vs_real_floor")
    if floor:
        lines.append(f"  real-vs-real floor ({floor['n']} training photos): {_quality_line(floor)}")
    if q.get("within_city_diversity") is not None:
        lines.append(f"  within-city diversity {q['within_city_diversity']:.2f} (1.0 = as varied as the city's "
                     f"real photos; mean over {len(result['per_city'])} cities)")
    if q.get("near_duplicates") is not None:
        lines.append(f"  within-city near-duplicates {q['near_duplicates'] * 100:.1f}% of same-city sample pairs "
                     "(the real photos' own: 1%)")
    gated = result.get("gated")
    if gated:
        gate = f"realism gate at quantile {gated['realism_quantile']:g}" if gated["realism_quantile"] else "no realism gate"
        lines.append(f"  as served (novelty guard, {gate}): {_quality_line(gated)}")
        lines.append(f"    accepted at the first seed {gated['accepted_share'] * 100:.1f}% ({gated['replaced']} replaced"
                     + (f", {gated['below_gate']} served below the gate: no attempt passed" if gated["below_gate"] else "")
                     + (f", {gated['not_distinct']} one house with an earlier listing: no attempt was distinct"
                        if gated.get("not_distinct") else "")
                     + ")" + (f"; within-city diversity {gated['within_city_diversity']:.2f}, near-duplicates "
                              f"{gated['near_duplicates'] * 100:.1f}%" if gated.get("near_duplicates") is not None else ""))
        if gated.get("memorised_any_space") is not None:
            lines.append(f"    memorised as served: {gated['memorised_any_space'] * 100:.1f}% in any space ("
                         + ", ".join(f"{k} {v * 100:.1f}%" for k, v in gated["memorised"].items()) + ")")
        if result.get("sheet"):
            lines.append(f"    held-out photos, drawn, served and rejected samples of the largest cities: sheet -> "
                         f"{result['sheet']}")
    for city in result["per_city"]:
        diversity = f", diversity {city['diversity']:.2f}" if "diversity" in city else ""
        diversity += f", near-duplicates {city['near_duplicates'] * 100:.1f}%" if "near_duplicates" in city else ""
        if "gated" in city:
            g = city["gated"]
            diversity += (f"; served: KID {_kid(g['kid'])}, {g['accepted_share'] * 100:.0f}% accepted, near-duplicates "
                          f"{g['near_duplicates'] * 100:.1f}%")
        lines.append(f"  {city['city']}: KID {_kid(city['kid'])} "
                     f"({city['generated']} samples, {city['holdout']} held out{diversity})")
    for name, s in (n or {}).items():
        if isinstance(s, dict):
            lines.append(f"  memorised ({name}): {s['memorisation_rate'] * 100:.1f}% above threshold "
                         f"{s['threshold']:.4f} (median nearest similarity {s['nearest_similarity_median']:.4f})")
    tail = f"({result['timings']['total_s']:.0f} s)"
    if result.get("path"):
        tail += f"   -> {result['path']}"
    lines.append(f"  memorised in any space: {n['either_space_rate'] * 100:.1f}%   {tail}" if n else f"  {tail}")
    return "\n".join(lines)
