"""City names as users type them -> the conditioning class a generator knows them by.

One matcher for every entry point (a run's LoadedGenerator, the thumbnails' Source, hence
`generate --city` and `serve ?city=`): the exact name, else the one name equal to it once
case, spacing and Unicode forms are folded (NFKC, casefold, whitespace collapsed), else
`UnknownCity` naming the close matches.
"""

from __future__ import annotations

import difflib
import unicodedata

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
        fallback = f"; {ANY_CITY!r} stands for cities not trained on" if any_city else ""
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
