"""Prefix-faithful prompts (reuse exact by construction, salt), expected cached tokens, session inference on a
hand-written trace, and synthetic system-prompt workloads."""
from __future__ import annotations

import numpy as np
import pytest

from splitbench.errors import InputError
from splitbench.workload.load import WorkloadSpec, load
from splitbench.workload.prefix import expected_cached_tokens, expected_hit_fraction, infer_sessions, session_stats
from splitbench.workload.prompts import TokenIdPrompts, prompt_source, salt_key
from splitbench.workload.types import Workload

SPECIAL = set(range(5))


def hashed(inputs, hashes, block_tokens=8) -> Workload:
    n = len(inputs)
    return Workload(name="t", arrival_s=np.arange(n, dtype=np.float64), input_tokens=np.array(inputs, np.int64),
                    output_tokens=np.ones(n, np.int64), trace_index=np.arange(n, dtype=np.int64) + 10,
                    prefix_hashes=[np.array(h, np.int64) for h in hashes], block_tokens=block_tokens)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.array(a[:n]) != np.array(b[:n]))
    return int(diff[0]) if diff.size else n


def prompts_for(w: Workload, salt=None) -> list[list[int]]:
    src = TokenIdPrompts(vocab_size=300, special_ids=SPECIAL, seed=3, prefix_salt=salt).use_prefix_hashes(w)
    return [src.token_ids(int(i), int(n)) for i, n in zip(w.trace_index, w.input_tokens)]


def test_shared_hashes_share_exactly_k_blocks():
    w = hashed([40, 37, 21, 50], [[1, 2, 3, 4, 5], [1, 2, 9, 10, 11], [7, 8, 3], [1, 2, 3]])
    p = prompts_for(w)
    assert [len(x) for x in p] == [40, 37, 21, 50]
    assert not set(np.concatenate(p).tolist()) & SPECIAL
    assert common_prefix(p[0], p[1]) == 2 * 8           # 2 shared hash ids -> exactly 16 equal tokens, then differ
    assert common_prefix(p[0], p[2]) == 0
    assert p[2][16:21] == p[0][16:21]                    # a hash id is one block wherever it stands
    assert common_prefix(p[0], p[3]) == 24 and len(set(p[3][24:]) - set(p[0])) > 0   # tail beyond hashes: own
    assert prompts_for(w) == p                           # deterministic


def test_salt_changes_every_block():
    w = hashed([40, 40], [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
    plain, salted, again = prompts_for(w), prompts_for(w, salt="run-2"), prompts_for(w, salt="run-2")
    assert plain[0] == plain[1] and salted[0] == salted[1] and salted == again
    for a, b in zip(np.array(plain[0]).reshape(5, 8), np.array(salted[0]).reshape(5, 8)):
        assert (a != b).any()
    assert salt_key("7") == 7 and salt_key(None) == 0 and salt_key("abc") == salt_key("abc") != salt_key("abd")


def test_prompt_source_rules():
    w = hashed([16], [[1, 2]])
    with pytest.raises(InputError, match="--api chat"):
        prompt_source({}, api="chat", workload=w)
    with pytest.raises(InputError, match="--shared-prefix"):
        prompt_source({}, shared_prefix_tokens=4, workload=w)
    src = prompt_source({}, workload=w, prefix_salt="x")
    assert src.describe()["prefix_blocks"]["block_tokens"] == 8
    assert src.token_ids(999, 12) != src.token_ids(10, 12)   # an index without hashes: a unique prompt


def token_level_expected(w: Workload, server_block: int) -> list[int]:
    """Reference: longest common prefix with any earlier prompt, built from the real token ids."""
    p = prompts_for(w)
    out = []
    for i, x in enumerate(p):
        best = max((common_prefix(x, p[j]) for j in range(i)), default=0)
        out.append(min(best, len(x) - 1) // server_block * server_block)
    return out


@pytest.mark.parametrize("server_block", [1, 4, 8, 16])
def test_expected_cached_tokens_match_token_prefixes(server_block):
    w = hashed([40, 37, 19, 24, 24, 60, 3],
               [[1, 2, 3, 4, 5], [1, 2, 9, 10, 11], [1, 2, 6], [1, 2, 6], [1, 2, 6], [1, 2, 6, 4, 5], [1]])
    got = expected_cached_tokens(w, server_block)
    assert got.tolist() == token_level_expected(w, server_block)
    assert expected_hit_fraction(w, server_block) == pytest.approx(got.sum() / w.input_tokens.sum())


def test_expected_needs_whole_prefix_not_position():
    w = hashed([16, 16], [[1, 2], [3, 2]])      # the same id after another prefix is another block chain
    assert expected_cached_tokens(w, 1).tolist() == [0, 0]


def test_session_inference_hand_written():
    # block 0 is a system prompt everyone shares; 8-token blocks; partial last blocks get new ids next turn
    w = hashed(
        [20, 12, 30, 41, 12, 30, 50],
        [[0, 1, 2],            # 0: session A turn 0 (full blocks 0,1; it created block 1)
         [0, 5],               # 1: system prompt + a short question: full blocks (0,) created nothing
         [0, 1, 3, 4],         # 2: A turn 1 (extends 0's full chain 0,1)
         [0, 1, 3, 6, 7, 8],   # 3: A turn 2 (extends 2's full chain 0,1,3)
         [0, 9],               # 4: shares only the system prompt with 1: not 1's continuation
         [0, 1, 3, 10],        # 5: extends 2's chain too, but 2 has its successor (3) and 0 has 2
         [0, 1, 3, 6, 7, 8, 11]])  # 6: A turn 3 (3's full chain 0,1,3,6,7)
    sid, turn = infer_sessions(w)
    assert sid.tolist() == [0, -1, 0, 0, -1, -1, 0]
    assert turn.tolist() == [0, 0, 1, 2, 0, 0, 3]
    w.session_id, w.turn = sid, turn
    st = session_stats(w)
    assert st["sessions"] == 1 and st["singletons"] == 3 and st["sessions_by_turns"] == {"4": 1}


def test_synth_system_prompts():
    spec = "synth:rate=10,count=300,lengths=uniform,input=64-256,output=4,system_prompts=3,system_share=0.5,block=16"
    w = load(WorkloadSpec(spec))
    assert w.block_tokens == 16 and len(w.prefix_hashes) == 300
    assert all(h.size == -(-n // 16) for h, n in zip(w.prefix_hashes, w.input_tokens))
    firsts = {int(h[0]) for h in w.prefix_hashes}
    assert len(firsts) == 3                                   # three system prompts
    p = prompts_for(w)
    pairs = [(i, i - 1 - k) for i in range(1, 40) for k in range(i)
             if w.prefix_hashes[i - 1 - k][0] == w.prefix_hashes[i][0]]
    assert len(pairs) > 20
    for i, j in pairs:   # same system prompt -> exactly the shared whole blocks in common
        shared = min(int(w.input_tokens[k] * 0.5) // 16 for k in (i, j))
        assert common_prefix(p[i], p[j]) == shared * 16
    frac = expected_hit_fraction(w, 16)
    assert 0.3 < frac < 0.5
    for bad in ("system_share=0.5", "system_prompts=0", "system_prompts=2,system_share=1.5"):
        with pytest.raises(InputError):
            WorkloadSpec(f"synth:rate=1,count=3,{bad}").validate()
