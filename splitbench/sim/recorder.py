"""The simulator's records as columns: each request's results are written into typed arrays when it finishes (no
object per request outlives it), then one vectorized pass builds every chunk list from the machines' decode-run
logs (a chunk per run, as SimCluster's docstring says) into RecordColumns, block by block to bound the memory.
"""
from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Any

import numpy as np

from splitbench.schema.columns import RecordColumns
from splitbench.schema.records import ERROR, OK, SPLIT, STATUSES

BLOCK_RUNS = 1 << 21          # decode runs turned into chunks per block of the assembly
UNFINISHED = "simulation ended before the request finished"

if TYPE_CHECKING:
    from splitbench.sim.state import SimRequest


def _floats(n: int) -> array[float]:
    return array("d", np.full(n, np.nan).tobytes())


def _ints(n: int, v: int) -> array[int]:
    return array("q", np.full(n, v, np.int64).tobytes())


class Recorder:
    """Per-request arrays indexed by workload position. `decided` at dispatch, `finished` / `failed` at the end."""

    w: Any
    ids: list[str]
    pools: list[str]
    token_chunks: bool
    first: array[float]
    last: array[float]
    pdone: array[float]
    dsent: array[float]
    pm: array[int]
    tm: array[int]
    dpool: array[int]
    run_m: array[int]
    join_log: array[int]
    end_log: array[int]
    join_it: array[int]
    from_log: array[int]
    state: array[int]
    errors: dict[int, str]
    cached: array[int] | None
    pool_names: list[str]
    _pool_code: dict[str, int]

    def __init__(self, workload: Any, machine_ids: list[str], machine_pools: list[str], token_chunks: bool) -> None:
        n = len(workload)
        self.w, self.ids, self.pools, self.token_chunks = workload, machine_ids, machine_pools, token_chunks
        self.first, self.last, self.pdone, self.dsent = _floats(n), _floats(n), _floats(n), _floats(n)
        self.pm, self.tm, self.dpool = _ints(n, -1), _ints(n, -1), _ints(n, -1)   # decision (-1: none / co-located)
        self.run_m, self.join_log, self.end_log, self.join_it = _ints(n, -1), _ints(n, 0), _ints(n, 0), _ints(n, 0)
        self.from_log = array("b", bytes(n))   # first token = end of the first decode run after joining
        self.state = array("b", bytes(n))      # 0 unfinished, 1 ok, 2 error
        self.errors = {}
        self.cached = _ints(n, -1) if workload.prefix_hashes is not None else None   # prefix-cache hits, tokens
        self.pool_names = []
        self._pool_code = {}

    def decided(self, i: int, pm: int, tm: int, pool: str) -> None:
        code = self._pool_code.get(pool)
        if code is None:
            code = self._pool_code[pool] = len(self.pool_names)
            self.pool_names.append(pool)
        self.pm[i], self.tm[i], self.dpool[i] = pm, tm, code

    def failed(self, i: int, error: str) -> None:
        self.state[i] = 2
        self.errors[i] = error

    def finished(self, r: SimRequest, m_index: int) -> None:
        """r (a cluster SimRequest) made its last token; m_index: the machine its decode ran on (-1: none)."""
        i = r.i
        self.state[i] = 1
        if r.first is not None:
            self.first[i] = r.first
        else:
            self.from_log[i] = 1
        self.last[i] = r.last  # type: ignore[assignment]
        if r.pdone is not None:
            self.pdone[i] = r.pdone
        if r.decode_sent is not None:
            self.dsent[i] = r.decode_sent
        if m_index >= 0:
            self.run_m[i], self.join_log[i], self.end_log[i], self.join_it[i] = m_index, r.join_log, r.end_log, \
                r.join_it

    # ---------------------------------------------------------------- assembly

    def columns(self, log_t: list[Any], log_it: list[Any]) -> RecordColumns:
        """Every record, given each machine's decode-run end times and iteration counts (in machine order)."""
        w = self.w
        n = len(w)
        arr = w.arrival_s.astype(np.float64)
        state = np.frombuffer(self.state, np.int8)
        for i in np.flatnonzero(state == 0).tolist():
            self.failed(i, UNFINISHED)
        ok = state == 1
        run_m = np.frombuffer(self.run_m, np.int64)
        base = np.concatenate([[0], np.cumsum([len(x) for x in log_t])]).astype(np.int64)
        g_t = np.concatenate([np.frombuffer(x, np.float64) for x in log_t] + [np.zeros(0)])
        g_it = np.concatenate([np.frombuffer(x, np.int64) for x in log_it] + [np.zeros(0, np.int64)])
        has_m = ok & (run_m >= 0)
        gpos = np.where(has_m, base[np.maximum(run_m, 0)] + np.frombuffer(self.join_log, np.int64), 0)
        from_log = (np.frombuffer(self.from_log, np.int8) == 1) & has_m
        first = np.frombuffer(self.first, np.float64).copy()
        first[from_log] = g_t[gpos[from_log]]
        last = np.frombuffer(self.last, np.float64)
        runs = np.where(has_m, np.frombuffer(self.end_log, np.int64) - np.frombuffer(self.join_log, np.int64), 0)
        offs, toks, starts = self._chunks(ok, has_m, from_log, runs, gpos, arr, first, last, g_t, g_it)
        n_out = w.output_tokens.astype(np.int64)
        return RecordColumns(
            trace_index=w.trace_index.astype(np.int64), intended_send_s=arr,
            planned_input_tokens=w.input_tokens.astype(np.int64), planned_output_tokens=n_out,
            times={"actual_send_s": arr, "first_token_s": np.where(ok, first, np.nan),
                   "last_token_s": np.where(ok, last, np.nan), "end_s": np.where(ok, last, arr)},
            offsets_at=starts, chunk_offsets_s=offs, tokens_at=starts, chunk_tokens=toks,
            actual_input_tokens=np.where(ok, w.input_tokens, -1).astype(np.int64),
            actual_output_tokens=np.where(ok, n_out, -1), status=np.where(ok, STATUSES.index(OK),
                                                                           STATUSES.index(ERROR)).astype(np.int8),
            **self._placement(n), phases=self._phases(ok, arr, first, last), error=dict(sorted(self.errors.items())),
            counts={} if self.cached is None else {
                "cached_input_tokens": np.where(ok, np.frombuffer(self.cached, np.int64), -1)})

    def _chunks(self, ok, has_m, from_log, runs, gpos, arr, first, last, g_t, g_it):
        """Flat chunk offsets and tokens of every record, and where each record's chunks start."""
        n = len(arr)
        if not self.token_chunks:   # the first token, then one chunk of the other n - 1 at the last token
            n_out = self.w.output_tokens.astype(np.int64)
            count = np.where(ok, 1 + (n_out > 1), 0)
            starts = np.concatenate([[0], np.cumsum(count)])
            offs, toks = np.empty(int(starts[-1])), np.empty(int(starts[-1]), np.int32)
            lead = starts[:-1][ok]
            offs[lead], toks[lead] = (first - arr)[ok], 1
            more = ok & (n_out > 1)
            offs[starts[:-1][more] + 1], toks[starts[:-1][more] + 1] = (last - arr)[more], (n_out - 1)[more]
            return offs, toks, starts
        lead = ok & ~from_log            # a leading chunk: the first token, from the prefill
        count = lead.astype(np.int64) + runs
        starts = np.concatenate([[0], np.cumsum(count)])
        offs, toks = np.empty(int(starts[-1])), np.empty(int(starts[-1]), np.int32)
        at = starts[:-1][lead]
        offs[at], toks[at] = (first - arr)[lead], 1
        join_it = np.frombuffer(self.join_it, np.int64)
        sel = np.flatnonzero(runs > 0)
        cum = np.cumsum(runs[sel])
        lo = done = 0
        while lo < len(sel):   # blocks of about BLOCK_RUNS runs; a request's runs are contiguous in its log
            hi = max(int(np.searchsorted(cum, done + BLOCK_RUNS, side="right")), lo + 1)
            rows, k = sel[lo:hi], runs[sel[lo:hi]]
            first_at = np.cumsum(k) - k                     # block-local index of each request's first run
            step = np.arange(int(k.sum())) - np.repeat(first_at, k)
            src = np.repeat(gpos[rows], k) + step
            dst = np.repeat(starts[rows] + lead[rows], k) + step
            prev = g_it[src - 1]
            prev[first_at] = join_it[rows]
            offs[dst] = g_t[src] - np.repeat(arr[rows], k)
            toks[dst] = g_it[src] - prev
            lo, done = hi, int(cum[hi - 1])
        return offs, toks, starts

    def _placement(self, n: int) -> dict:
        """The six placement columns as codes into one name list (machine ids, then pool names, then "split")."""
        names = list(self.ids) + [p for p in dict.fromkeys(self.pools + self.pool_names) if p not in self.ids]
        names.append(SPLIT)
        code = {s: k for k, s in enumerate(names)}
        pm, tm = np.frombuffer(self.pm, np.int64), np.frombuffer(self.tm, np.int64)
        dpool = np.frombuffer(self.dpool, np.int64)
        pool_code = np.array([code[p] for p in self.pool_names] + [-1], np.int64)[dpool]   # dpool -1 -> last
        machine_pool = np.array([code[p] for p in self.pools] + [-1], np.int64)
        split = tm >= 0
        decided = pm >= 0
        none = np.full(n, -1, np.int64)
        place = {"instance": np.where(split, -1, pm), "pool": np.where(split, code[SPLIT], pool_code),
                 "prefill_instance": pm, "decode_instance": np.where(split, tm, pm), "prefill_pool": pool_code,
                 "decode_pool": np.where(split, machine_pool[tm], pool_code)}
        place = {k: np.where(decided, v, none).astype(np.int32) for k, v in place.items()}
        return {"placement": place, "names": tuple(names)}

    def _phases(self, ok, arr, first, last) -> dict:
        split = np.frombuffer(self.tm, np.int64) >= 0
        nan = np.full(len(arr), np.nan)
        sp, co = ok & split, ok & ~split
        return {"router_recv": arr, "prefill_sent": np.where(sp, arr, nan),
                "prefill_done": np.where(sp, np.frombuffer(self.pdone, np.float64), nan),
                "decode_sent": np.where(sp, np.frombuffer(self.dsent, np.float64), nan),
                "sent": np.where(co, arr, nan), "first_token": np.where(ok, first, nan),
                "done": np.where(ok, last, arr)}
