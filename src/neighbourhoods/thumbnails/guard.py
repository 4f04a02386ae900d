"""The guard: a served sample is never a near-copy of a training photo, and passes for a photo.

A sample whose nearest training photo (metrics.novelty) is more similar than the memorisation
threshold is replaced by the sample of the next derived seed, so the replacement is as
deterministic as the original: a request's bytes depend only on (city, seed) and the weights.
The realism gate (realism.py), in the same feature space, replaces a sample less realistic
than its city's threshold the same way; where no attempt passes it, the most realistic novel
attempt is served (a near-copy never is).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from neighbourhoods.core.cities import CityMatch
from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.core.latents import MAX_SEED  # noqa: F401  (seeds: non-negative 63-bit integers)
from neighbourhoods.core.workspace import open_workspace
from neighbourhoods.thumbnails.distinct import BLOCK, Distinct, Ledger, Ledgers, calibrate_distinct, phash
from neighbourhoods.thumbnails.realism import QUANTILE, Realism
from neighbourhoods.thumbnails.source import Source


class NoNovelSample(NeighbourhoodsError):
    """Every derived seed gave a sample too close to a training photo (a memorising generator)."""


def check_seed(seed: int) -> int:
    if not (0 <= int(seed) <= MAX_SEED):
        raise NeighbourhoodsError(f"bad seed {seed}: expected an integer from 0 to {MAX_SEED}")
    return int(seed)


def derived_seed(seed: int, attempt: int) -> int:
    """The seed tried at `attempt` (0: the requested one) when the novelty guard rejects a sample."""
    if attempt == 0:
        return seed
    digest = hashlib.sha256(f"novelty-retry:{seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


@dataclass
class Guard:
    """Drops samples whose nearest training photo is more similar than `threshold`, and (with
    `realism`) samples less realistic than their class's threshold."""
    embed: Callable[[np.ndarray], np.ndarray]        # N x H x W x 3 uint8 -> N x D unit features (the guard's space)
    similarity: Callable[[np.ndarray], np.ndarray]   # features -> N nearest training photo's cosine similarity
    threshold: float                                 # memorisation threshold (similarity above it: a near-copy)
    max_attempts: int = 8                            # derived seeds tried before giving up
    label: str = ""
    realism: Realism | None = None                   # the realism gate (None: off)
    distinct: Distinct | None = None                 # listings of a city distinct from one another (None: off)

    def image_similarity(self, images: np.ndarray) -> np.ndarray:
        return self.similarity(self.embed(images))

    @property
    def tag(self) -> str:
        """What decides which samples pass: part of every ETag (another gate, other bytes)."""
        gate = "off" if self.realism is None else f"{self.realism.quantile!r}:{self.realism.thresholds.tobytes().hex()}"
        distinct = "off" if self.distinct is None else f"{BLOCK}:{self.distinct.thresholds.tobytes().hex()}"
        return f"guard:{self.threshold!r}:{self.max_attempts}:realism:{gate}:distinct:{distinct}"


def photo_classes(labels: np.ndarray, label_names: list[str], class_names: list[str], city_map) -> np.ndarray:
    """Each photo's generator class (the class its city is drawn from; -1: a photo of no city)."""
    draws = city_map.draws_from
    lookup = np.array([class_names.index(draws[n]) if n in draws else -1 for n in label_names] + [-1])
    return lookup[np.where(np.asarray(labels) >= 0, labels, len(label_names))]


def train_classes(ws, index, class_names: list[str], city_map) -> np.ndarray:
    """The generator class of each of the novelty index's training photos (its rows' order)."""
    from neighbourhoods.core.prepared import load_label_names, load_split

    return photo_classes(load_split(ws, index.res, "train").labels, load_label_names(ws), class_names, city_map)


def calibrate_realism(ws, index, classes: np.ndarray, class_names: list[str], city_map, quantile: float = QUANTILE,
                      progress: bool = True, device: str = "cpu") -> Realism | None:
    """The realism gate of the novelty index's space for a generator's classes (None at quantile 0);
    `classes`: train_classes."""
    from neighbourhoods.core.prepared import load_label_names
    from neighbourhoods.core.similarity import normalise
    from neighbourhoods.metrics.features import split_features
    from neighbourhoods.thumbnails.realism import calibrate

    if not quantile:
        return None
    if not 0 < quantile < 1:
        raise NeighbourhoodsError(f"--realism-quantile must be in (0, 1), or 0 for no gate (got {quantile})")
    holdout, _, holdout_labels = split_features(ws, index.res, "holdout", index.space, progress=progress, device=device)
    return calibrate(index.train_features, classes, normalise(holdout),
                     photo_classes(holdout_labels, load_label_names(ws), class_names, city_map), len(class_names),
                     quantile=quantile)


def load_guard(workspace, source: Source, max_attempts: int = 8, progress: bool = True,
               device: str = "cpu", realism_quantile: float = QUANTILE, distinct: bool = True) -> Guard:
    """The novelty guard of metrics.novelty for this workspace (training photos at the generator's res),
    with the realism gate calibrated at `realism_quantile` (0: off) and, with `distinct`, the
    rule that keeps a city's listings distinct (render_listings).

    The first call embeds every training and held-out photo (a progress bar; cached in
    WS/embeddings), later ones read the cache; `device` (cpu, cuda) runs that network.
    """
    from neighbourhoods.metrics import novelty  # torch: imported only where the eager guard is used

    ws = open_workspace(workspace)
    try:
        index = novelty.load_index(ws, source.res, progress=progress, device=device)
    except NeighbourhoodsError as e:
        raise NeighbourhoodsError(f"novelty guard: {e} (or turn the guard off with --no-novelty-guard)") from None
    classes = train_classes(ws, index, source.class_names, source.city_map)   # read once for both
    gate = calibrate_realism(ws, index, classes, source.class_names, source.city_map, realism_quantile, progress,
                             device)
    apart = calibrate_distinct(index.train_features, classes, len(source.class_names)) if distinct else None
    label = index.describe() + "".join(f"; {x.describe()}" for x in (gate, apart) if x is not None)
    return Guard(embed=index.features, similarity=lambda f: index.nearest_to_features(f)[0],
                 threshold=float(index.threshold), max_attempts=max_attempts, label=label, realism=gate,
                 distinct=apart)


@dataclass
class Sample:
    image: np.ndarray       # H x W x 3 uint8 at the generator's resolution
    seed: int               # the requested seed
    used_seed: int          # the seed actually sampled (differs when the guard replaced a sample)
    similarity: float | None = None   # max cosine similarity to a training photo (None: guard off)
    realism: float | None = None      # realism score (None: no realism gate)
    passed: bool = True               # False: no attempt passed the realism gate; the most realistic novel one
    distinct: bool = True             # False: every novel attempt was one house with an earlier listing's
    rejected: str = ""                # why the first attempt was not served (NEAR_COPY, ...; "": it was)


# Why a first attempt was replaced, as Sample.rejected says it (evaluate's sheet of rejected samples).
NEAR_COPY, BELOW_GATE, SAME_HOUSE = "near-copy", "below the realism gate", "one house with an earlier listing"


def rejection(similarity: float, realistic: bool, duplicate: bool, guard: Guard) -> str:
    """Why an attempt fails the guard ("" where it passes), the first reason of three that applies."""
    if similarity > guard.threshold:
        return NEAR_COPY
    return "" if realistic and not duplicate else (BELOW_GATE if not realistic else SAME_HOUSE)


def render_samples(source: Source, class_indices: list[int], seeds: list[int],
                   guard: Guard | None = None) -> list[Sample]:
    """Samples for (class, seed) pairs, replacing near-copies of training photos (and, with the
    realism gate, unrealistic samples) deterministically.

    Each pair is tried with derived_seed(seed, 0), (seed, 1), ... until its sample passes the
    guard; attempts run batched across pairs, so a request's bytes never depend on its neighbours.
    A pair whose every attempt is novel but none realistic enough gets its most realistic attempt.
    """
    n = len(class_indices)
    out: list[Sample | None] = [None] * n
    fallback: dict[int, Sample] = {}    # per pair: its most realistic novel attempt so far
    first: dict[int, str] = {}          # per pair: why its first attempt was rejected
    todo = list(range(n))
    attempts = 1 if guard is None else guard.max_attempts
    for attempt in range(attempts):
        if not todo:
            break
        used = [derived_seed(seeds[i], attempt) for i in todo]
        classes = [class_indices[i] for i in todo]
        images = source.sample(classes, used)
        if guard is None:
            for j, i in enumerate(todo):
                out[i] = Sample(images[j], seeds[i], used[j])
            todo = []
            break
        features = guard.embed(images)
        sims = np.asarray(guard.similarity(features), dtype=np.float64)
        if guard.realism is not None:
            scores, real = guard.realism.passes(features, classes)
        else:
            scores, real = [None] * len(todo), np.ones(len(todo), bool)
        still = []
        for j, i in enumerate(todo):
            realism = None if scores[j] is None else float(scores[j])
            if attempt == 0:
                first[i] = rejection(float(sims[j]), bool(real[j]), False, guard)
            sample = Sample(images[j], seeds[i], used[j], float(sims[j]), realism, rejected=first[i])
            if sims[j] > guard.threshold:
                still.append(i)
            elif real[j]:
                out[i] = sample
            else:
                if i not in fallback or realism > fallback[i].realism:
                    fallback[i] = Sample(sample.image, sample.seed, sample.used_seed, sample.similarity, realism,
                                         passed=False, rejected=first[i])
                still.append(i)
        todo = still
    for i in [i for i in todo if i in fallback]:
        out[i] = fallback[i]
    todo = [i for i in todo if i not in fallback]
    if todo:
        raise NoNovelSample(
            f"no novel sample for seed {seeds[todo[0]]} after {attempts} attempts: every one was closer "
            f"to a training photo than the memorisation threshold; the generator memorises, retrain it")
    return out  # type: ignore[return-value]


def render_listings(source: Source, match: CityMatch, seeds: list[int], guard: Guard | None,
                    ledgers: Ledgers) -> list[Sample]:
    """The samples of a city's listing seeds, each also distinct from the seeds before it in its
    block (distinct.py); without a guard or its `distinct`, render_samples. A seed's sample
    depends only on (city, seed) and the weights: its block is filled in seed order first."""
    if guard is None or guard.distinct is None:
        return render_samples(source, [match.class_index] * len(seeds), [match.seed(s) for s in seeds], guard)
    # each block is filled at once to the last seed asked of it, so a batch of listings is drawn
    # in batches (the samples are the same whatever the order of asking: seed order within a block)
    last: dict[int, int] = {}
    for seed in seeds:
        last[seed // BLOCK] = max(seed, last.get(seed // BLOCK, seed))
    out = []
    for seed in seeds:
        ledger = ledgers.get(match.city, seed)
        with ledger.lock:
            if ledger.next_seed <= seed:
                fill_ledger(source, match, ledger, last[seed // BLOCK], guard)
            sample = ledger.samples[seed - ledger.start]
        if isinstance(sample, NoNovelSample):
            raise sample
        out.append(sample)
    return out


def fill_ledger(source: Source, match: CityMatch, ledger: Ledger, upto: int, guard: Guard, chunk: int = 64) -> None:
    """Extend `ledger` to seed `upto` (nothing if it is there): first attempts drawn in batches,
    then judged in seed order."""
    cls = match.class_index
    while ledger.next_seed <= upto:
        seeds = list(range(ledger.next_seed, min(upto + 1, ledger.next_seed + chunk)))
        sampled = [match.seed(s) for s in seeds]
        first = _judge(source, cls, sampled, guard)
        for j, seed in enumerate(seeds):
            try:
                sample, feature, hash_ = _first_distinct(source, cls, seed, sampled[j], guard, ledger,
                                                         first=tuple(x[j] for x in first))
            except NoNovelSample as e:   # this seed has no sample; the seeds after it still do
                sample, feature, hash_ = e, None, None
            ledger.samples.append(sample)
            ledger.features.append(feature)
            ledger.hashes.append(hash_)


def _judge(source: Source, cls: int, used: list[int], guard: Guard):
    """(images, unit features, similarities, realism scores or Nones, realistic enough) of samples."""
    images = source.sample([cls] * len(used), used)
    features = guard.embed(images)
    sims = np.asarray(guard.similarity(features), dtype=np.float64)
    if guard.realism is not None:
        scores, real = guard.realism.passes(features, [cls] * len(used))
    else:
        scores, real = [None] * len(used), np.ones(len(used), bool)
    return images, features, sims, scores, real


def _first_distinct(source: Source, cls: int, seed: int, sampled: int, guard: Guard, ledger: Ledger,
                    first) -> tuple[Sample, np.ndarray, int]:
    """The first attempt that is novel, realistic and one house with no sample in `ledger`; where
    none of guard.max_attempts is, the best novel one (distinct first, then realistic, then least
    alike); NoNovelSample where every attempt is a near-copy."""
    best, best_key = None, None
    rest = None
    reason = ""     # why the first attempt was rejected
    for attempt in range(guard.max_attempts):
        used = derived_seed(sampled, attempt)
        if attempt == 0:
            image, feature, sim, score, real = first
        else:
            # the first attempt failed: draw all the others at once (batched; the first that passes, in
            # order, is served, as one at a time would give, since the ledger does not change meanwhile)
            if rest is None:
                rest = _judge(source, cls, [derived_seed(sampled, a) for a in range(1, guard.max_attempts)], guard)
            image, feature, sim, score, real = (x[attempt - 1] for x in rest)
        if sim > guard.threshold:
            reason = reason or NEAR_COPY    # (set at the first attempt only)
            continue
        hash_ = phash(image)
        dup, alike = guard.distinct.duplicate(feature, hash_, ledger, cls)
        if attempt == 0:
            reason = rejection(float(sim), bool(real), dup, guard)
        realism = None if score is None else float(score)
        sample = Sample(image, sampled, used, float(sim), realism, passed=bool(real), distinct=not dup,
                        rejected=reason)
        if real and not dup:
            return sample, feature, hash_
        key = (not dup, bool(real), -alike)
        if best_key is None or key > best_key:
            best, best_key = (sample, feature, hash_), key
    if best is None:
        raise NoNovelSample(
            f"no novel sample for seed {seed} after {guard.max_attempts} attempts: every one was closer "
            f"to a training photo than the memorisation threshold; the generator memorises, retrain it")
    return best
