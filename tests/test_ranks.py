"""The Ledger's Rank (positions filed by key) against a plain scan of the same keys, and the policies' tie-break
against random.Random.choice: same answers, same random stream."""
from __future__ import annotations

import random

from splitbench.prefix_policy import break_tie
from splitbench.ranks import Rank


def _scan(keys: dict[int, int], skip=frozenset()) -> list[int]:
    left = {p: k for p, k in keys.items() if p not in skip}
    return sorted(p for p, k in left.items() if k == min(left.values())) if left else []


def test_rank_answers_as_a_scan_of_its_keys_through_random_updates():
    rng = random.Random(7)
    rank, keys = Rank(), {}
    for step in range(20_000):
        pos = rng.randrange(40)
        op = rng.random()
        if op < 0.1:
            rank.discard(pos)
            keys.pop(pos, None)
        else:   # keys from a small range (many ties) and now and then a wide one (a lone smallest key)
            key = rng.randrange(5) if op < 0.7 else rng.randrange(100_000)
            rank.set(pos, key)
            keys[pos] = key
        if step < 3000 or step % 7 == 0:   # after every update, then now and then (the kept answer ages)
            assert rank.least() == _scan(keys)
            skip = frozenset(rng.sample(range(40), 3))
            assert rank.least(skip) == _scan(keys, skip)
            assert rank.total == sum(keys.values()) and len(rank) == len(keys)
            assert all(rank.key(p) == keys.get(p) for p in range(45)) and all((p in rank) == (p in keys)
                                                                              for p in range(45))


def test_least_gives_a_copy_and_empty_ranks_give_nothing():
    rank = Rank()
    assert rank.least() == [] and rank.least({1}) == []
    rank.set(3, 0), rank.set(1, 0), rank.set(2, 5)
    ties = rank.least()
    ties.append(99)
    assert rank.least() == [1, 3] and rank.least({1}) == [3] and rank.least({1, 3}) == [2]
    rank.discard(1), rank.discard(3)
    assert rank.least() == [2] and rank.total == 5


def test_break_tie_draws_what_random_choice_draws():
    for seed in range(5):
        ours, theirs = random.Random(seed), random.Random(seed)
        for n in list(range(1, 130)) * 3 + [1000, 4097]:
            ties = list(range(100, 100 + n))
            assert break_tie(ties, ours) == (ties[0] if n == 1 else theirs.choice(ties))   # one candidate: no draw
        assert ours.getstate() == theirs.getstate()


def test_break_tie_leaves_other_generators_to_their_own_choice():
    class Counting(random.Random):
        calls = 0

        def choice(self, seq):
            Counting.calls += 1
            return seq[-1]

    assert break_tie([1, 2, 3], Counting(0)) == 3 and Counting.calls == 1
    assert break_tie(["only"], Counting(0)) == "only" and Counting.calls == 1
