"""City names as users type them -> the conditioning class a generator knows them by.

One matcher for every entry point (a run's LoadedGenerator, the thumbnails' Source, hence
`generate --city` and `serve ?city=`): the exact name, else the one name equal to it once
case, spacing and Unicode forms are folded (NFKC, casefold, whitespace collapsed), else
`UnknownCity` naming the close matches. `CityMap` extends the names to every city of the
data: a city pooled into ANY_CITY at training is still served by its own name.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from neighbourhoods.core.errors import NeighbourhoodsError

ANY_CITY = "(any city)"   # the shared class of cities too small to train alone; serves unknown cities too


def fold(name: str) -> str:
    """The form names are compared in: NFKC, casefolded, runs of whitespace as one space, trimmed."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


class UnknownCity(NeighbourhoodsError):
    """`city` is none of the names; `matches` are the close ones (possibly none)."""

    def __init__(self, city: str, matches: list[str], any_city: bool = False):
        self.city, self.matches = city, matches
        hint = f"; close matches: {', '.join(matches)}" if matches else ""
        fallback = (f"; to draw a city the data never had from {ANY_CITY!r}, ask for the fallback "
                    "(fallback=any, --fallback any)") if any_city else ""
        super().__init__(f"unknown city {city[:200]!r}{hint}{fallback}")


def close_matches(city: str, names: list[str], n: int = 5) -> list[str]:
    """Up to `n` of `names` that look like `city` (compared folded), best first."""
    by_fold: dict[str, str] = {}
    for name in names:
        by_fold.setdefault(fold(name), name)
    hits = difflib.get_close_matches(fold(city)[:200], list(by_fold), n=n, cutoff=0.5)
    return [by_fold[h] for h in hits]


def match_city(city: str, names: list[str]) -> int:
    """Index of `city` in `names`: exact, else the one folded-equal name; else UnknownCity."""
    if city in names:
        return names.index(city)
    folded = [fold(n) for n in names]
    key = fold(city)
    if folded.count(key) == 1:
        return folded.index(key)
    raise UnknownCity(city, close_matches(city, names), any_city=ANY_CITY in names)


# --- every city of the data -> what a run draws it from ------------------------------------------
@dataclass(frozen=True)
class CityMatch:
    """A city as a request named it, resolved against a run."""
    city: str             # the city's own name, as the data spells it
    class_index: int      # the run's conditioning class it is drawn from
    draws_from: str       # that class's name: the city itself, or ANY_CITY for a pooled city
    fallback: bool        # True: the data never had this city and the caller asked for a fallback

    @property
    def own_class(self) -> bool:
        return self.draws_from == self.city

    def seed(self, seed: int) -> int:
        """The seed sampled for (this city, `seed`). A city with its own class samples `seed`;
        a city drawn from a shared class gets seeds of its own (a hash of its name and `seed`),
        so two small cities that share "(any city)" never show the same house for one seed."""
        if self.own_class:
            return int(seed)
        digest = hashlib.sha256(f"city-seed:{fold(self.city)}:{int(seed)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") & (2 ** 63 - 1)


@dataclass(frozen=True)
class CityMap:
    """Every city of the workspace's data -> the conditioning class a run draws it from.

    Cities with enough training photos are their own class; the rest (pooled at training) are
    drawn from ANY_CITY. `generate`, `serve` and `evaluate` all resolve names through this.
    """
    class_names: tuple[str, ...]       # the run's classes, index order
    draws_from: dict                   # city -> class name; every class name maps to itself

    @classmethod
    def build(cls, class_names, cities=()) -> CityMap:
        """From a run's classes and the data's city names (pooled ones go to ANY_CITY, if it exists)."""
        class_names = tuple(class_names)
        mapping = {name: name for name in class_names}
        for city in cities:
            if city not in mapping and ANY_CITY in class_names:
                mapping[city] = ANY_CITY
        return cls(class_names, mapping)

    @classmethod
    def from_json(cls, class_names, saved: dict | None, merged=()) -> CityMap:
        """From config.json's "city_map" (or, for runs written before it, their merged_cities)."""
        if saved:
            known = set(class_names)
            return cls(tuple(class_names), {c: k for c, k in saved.items() if k in known} |
                       {name: name for name in class_names})
        return cls.build(class_names, merged)

    def to_json(self) -> dict:
        return dict(self.draws_from)

    @functools.cached_property
    def cities(self) -> list[str]:
        """Every name the run serves: its classes first, then the pooled cities, sorted."""
        own = set(self.class_names)
        return list(self.class_names) + sorted(c for c in self.draws_from if c not in own)

    @functools.cached_property
    def _by_fold(self) -> dict[str, str]:
        """Each folded form that only one name has -> that name: match_city's second rule,
        precomputed, since serve resolves a name per request."""
        folded: dict[str, list[str]] = {}
        for name in self.cities:
            folded.setdefault(fold(name), []).append(name)
        return {f: names[0] for f, names in folded.items() if len(names) == 1}

    def resolve(self, city: str, fallback: str | None = None) -> CityMatch:
        """The match for `city` (exact, then folded); with fallback="any", a name the data never
        had is drawn from ANY_CITY (and says so); otherwise UnknownCity with close matches."""
        name = city if city in self.draws_from else self._by_fold.get(fold(city))
        try:
            if name is None:
                name = self.cities[match_city(city, self.cities)]   # raises UnknownCity with close matches
        except UnknownCity:
            if fallback not in (None, "any"):
                raise NeighbourhoodsError(f"unknown fallback {fallback!r}: use any") from None
            if fallback == "any" and ANY_CITY in self.class_names:
                return CityMatch(city=city, class_index=self.class_names.index(ANY_CITY), draws_from=ANY_CITY,
                                 fallback=True)
            raise
        target = self.draws_from[name]
        return CityMatch(city=name, class_index=self.class_names.index(target), draws_from=target, fallback=False)

    def class_lut(self, label_names) -> np.ndarray:
        """For each workspace label (and -1 = no label, at the end): the class it draws from, or -1."""
        any_city = self.class_names.index(ANY_CITY) if ANY_CITY in self.class_names else -1
        out = [self.class_names.index(self.draws_from[n]) if n in self.draws_from else any_city for n in label_names]
        out.append(any_city if any_city >= 0 else (0 if len(self.class_names) == 1 else -1))
        return np.array(out, dtype=np.int64)


def slug(name: str, taken: set[str]) -> str:
    """A file-system-safe folder name for a city, unique within `taken`."""
    base = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    base = re.sub(r"[^A-Za-z0-9]+", "-", base).strip("-").lower()[:60] or "city"
    out, k = base, 2
    while out in taken:
        out, k = f"{base}-{k}", k + 1
    taken.add(out)
    return out
