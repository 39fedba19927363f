"""A Rank: one pool group's instance positions with the count its policies compare, kept by the Ledger, so that a
least-loaded choice and its ties are a copy of the smallest key's positions instead of a policy's scan of the views.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Set as AbstractSet


class Rank:
    """The positions of one pool group with a key each (the count its policies compare): `least()` gives the
    smallest key's positions in position order, so a tie-break over them sees the candidates in the same order as
    a scan of the instance list would; `total` is the sum of the keys. The smallest key's positions are kept as
    set() moves keys, and found again by a pass over the members only when the last of them leaves: a pass per
    choice cost about 100 instructions per member (callgrind, 70 instances), keeping them a few hundred per set()."""

    __slots__ = ("_has", "_keys", "_least", "_least_key", "_members", "total")
    _keys: list[int]
    _has: list[bool]
    _members: list[int]
    _least: list[int] | None
    _least_key: int
    total: int

    def __init__(self) -> None:
        self._keys = []               # by position (any value where _has is False)
        self._has = []
        self._members = []            # positions holding a key, ascending
        self._least = None            # positions holding the smallest key, ascending; None: to be found again
        self._least_key = 0           # that key (while _least is not None)
        self.total = 0                # sum of the keys

    def set(self, pos: int, key: int) -> None:
        keys, has = self._keys, self._has
        if pos >= len(keys):
            keys.extend([0] * (pos + 1 - len(keys)))
            has.extend([False] * (pos + 1 - len(has)))
        least = self._least
        if has[pos]:
            old = keys[pos]
            if old == key:
                return
            self.total += key - old
            if least is not None and old == self._least_key:   # pos leaves the smallest key's positions
                if key < old or len(least) == 1:
                    self._least = [pos] if key < old else None
                    self._least_key = key
                    keys[pos] = key
                    return
                del least[bisect_left(least, pos)]
        else:
            has[pos] = True
            insort(self._members, pos)
            self.total += key
        keys[pos] = key
        if least is not None:
            if key < self._least_key:
                self._least, self._least_key = [pos], key
            elif key == self._least_key:
                insort(least, pos)

    def discard(self, pos: int) -> None:
        if pos < len(self._has) and self._has[pos]:
            self._has[pos] = False
            del self._members[bisect_left(self._members, pos)]
            self.total -= self._keys[pos]
            least = self._least
            if least is not None and self._keys[pos] == self._least_key:
                if len(least) == 1:
                    self._least = None
                else:
                    del least[bisect_left(least, pos)]

    def key(self, pos: int) -> int | None:
        return self._keys[pos] if pos < len(self._has) and self._has[pos] else None

    def __contains__(self, pos: int) -> bool:
        return pos < len(self._has) and self._has[pos]

    def __len__(self) -> int:
        return len(self._members)

    def least(self, skip: AbstractSet[int] | None = None) -> list[int]:
        """Positions holding the smallest key, leaving out `skip`, in position order; [] when none is left."""
        if skip:
            return self._scan(skip)
        if self._least is None:
            found = self._scan(None)
            if not found:
                return found
            self._least, self._least_key = found, self._keys[found[0]]
        return self._least[:]

    def _scan(self, skip: AbstractSet[int] | None) -> list[int]:
        """least() by one pass over the members."""
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
