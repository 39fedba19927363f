"""A Rank: one pool group's instance positions with the count its policies compare, kept by the Ledger, so that a
least-loaded choice and its ties cost one compiled pass over the members instead of a policy's scan of the views.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Set as AbstractSet


class Rank:
    """The positions of one pool group with a key each (the count its policies compare): `least()` gives the
    smallest key's positions in position order, so a tie-break over them sees the candidates in the same order as
    a scan of the instance list would; `total` is the sum of the keys. Keys live in a list indexed by position, so
    set() is O(1) and least() one pass over the members in compiled code: for the tens to hundreds of instances of
    a cluster that is cheaper than keeping them sorted (a sorted list's bisect and insert per set() cost about
    4,000 instructions, measured with callgrind on the 19k-request replay)."""

    __slots__ = ("_has", "_keys", "_members", "total")
    _keys: list[int]
    _has: list[bool]
    _members: list[int]
    total: int

    def __init__(self) -> None:
        self._keys = []               # by position (any value where _has is False)
        self._has = []
        self._members = []            # positions holding a key, ascending
        self.total = 0                # sum of the keys

    def set(self, pos: int, key: int) -> None:
        keys, has = self._keys, self._has
        if pos >= len(keys):
            keys.extend([0] * (pos + 1 - len(keys)))
            has.extend([False] * (pos + 1 - len(has)))
        if has[pos]:
            self.total += key - keys[pos]
        else:
            has[pos] = True
            insort(self._members, pos)
            self.total += key
        keys[pos] = key

    def discard(self, pos: int) -> None:
        if pos < len(self._has) and self._has[pos]:
            self._has[pos] = False
            del self._members[bisect_left(self._members, pos)]
            self.total -= self._keys[pos]

    def key(self, pos: int) -> int | None:
        return self._keys[pos] if pos < len(self._has) and self._has[pos] else None

    def __contains__(self, pos: int) -> bool:
        return pos < len(self._has) and self._has[pos]

    def __len__(self) -> int:
        return len(self._members)

    def least(self, skip: AbstractSet[int] | None = None) -> list[int]:
        """Positions holding the smallest key, leaving out `skip`, in position order; [] when none is left."""
        out: list[int] = []
        keys = self._keys
        best = 0
        for pos in self._members:
            if skip and pos in skip:
                continue
            k = keys[pos]
            if not out or k < best:
                best = k
                out = [pos]
            elif k == best:
                out.append(pos)
        return out
