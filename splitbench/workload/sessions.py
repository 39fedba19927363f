"""Multi-turn sessions of a Workload, pure: each turn's previous turn and new user tokens (the threading rule) and
the think time between a turn's answer and the next turn (`--think-time`); no clock, the RNG seeded per request.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from splitbench.errors import InputError
from splitbench.workload.types import Workload

THINK_KINDS = ("trace", "gap", "fixed", "exp")
THINK_HELP = ("trace (the turn goes at its trace time, or when the previous answer is back if later), gap (the "
              "trace's gap between the two turns' arrivals, counted from the previous answer), fixed:S, or "
              "exp:mean=S (exponential, seeded by --seed)")
_THINK_KEY = 0x7468696E6B   # rng stream of think times ("think"); seeds of prompts use other keys


@dataclass(frozen=True)
class ThinkTime:
    """When a session's next turn is due: max(its trace time, previous answer's end + delay_s(...))."""
    kind: str = "trace"
    value_s: float = 0.0
    seed: int = 0

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> "ThinkTime":
        """'trace' | 'gap' | 'fixed:S' | 'exp:mean=S' (or 'exp:S'); else a one-line InputError."""
        text = (spec or "").strip().lower()
        kind, _, arg = text.partition(":")
        if kind in ("trace", "gap") and not arg:
            return cls(kind, 0.0, seed)
        if kind in ("fixed", "exp") and arg:
            number = arg.removeprefix("mean=") if kind == "exp" else arg
            try:
                value = float(number.removesuffix("s"))
            except ValueError:
                value = math.nan
            if math.isfinite(value) and value >= 0:
                return cls(kind, value, seed)
        raise InputError(f"--think-time must be {THINK_HELP}; got {spec!r}")

    def delay_s(self, trace_index: int, gap_s: float) -> float:
        """Think time after the previous turn's answer; gap_s: the trace's gap between the two turns' arrivals."""
        if self.kind == "gap":
            return max(0.0, gap_s)
        if self.kind == "fixed":
            return self.value_s
        if self.kind == "exp":
            return float(np.random.default_rng([self.seed, _THINK_KEY, int(trace_index)]).exponential(self.value_s))
        return 0.0

    def describe(self) -> str:
        if self.kind in ("trace", "gap"):
            return self.kind
        return f"fixed:{self.value_s:g}" if self.kind == "fixed" else f"exp:mean={self.value_s:g}"


@dataclass
class TurnPlan:
    """prev[i]: position (in the workload) of request i's previous turn, -1 for a session's first turn in the
    workload and for requests outside sessions; next[i] the inverse (-1: last turn). new_tokens[i]: user tokens
    added after the previous turn's prompt and answer (0 where prev is -1)."""
    prev: np.ndarray
    next: np.ndarray
    new_tokens: np.ndarray
    sessions: int
    adjusted_turns: int   # turns whose trace lengths gave fewer than 1 new token (sent with 1)

    def describe(self) -> dict:
        return {"sessions": self.sessions, "later_turns": int((self.prev >= 0).sum()),
                "turns_with_new_tokens_raised_to_1": self.adjusted_turns}


def plan_turns(w: Workload) -> TurnPlan:
    """The session structure of w. Within a session turns go by `turn` (then arrival); turn k+1's new user tokens
    are input[k+1] - input[k] - output[k] of the trace, at least 1 (a trace whose turn k+1 is shorter than turn k's
    prompt plus answer still threads the whole conversation, so that turn's prompt is longer than the trace's)."""
    n = len(w)
    sid = w.session_id
    if sid is None or n == 0 or not (np.asarray(sid) >= 0).any():
        raise InputError(f"{w.name}: --multi-turn needs a trace with sessions (session ids per request); this "
                         "one has none")
    sid = np.asarray(sid, dtype=np.int64)
    turn = np.asarray(w.turn, dtype=np.int64) if w.turn is not None else np.zeros(n, dtype=np.int64)
    if sid.shape != (n,) or turn.shape != (n,):
        raise InputError(f"{w.name}: session_id/turn have {sid.shape[0]}/{turn.shape[0]} values for {n} requests")
    pos = np.arange(n, dtype=np.int64)
    member = pos[sid >= 0]
    order = member[np.lexsort((member, turn[member], sid[member]))]   # by session, then turn, then arrival
    same = sid[order[1:]] == sid[order[:-1]]
    prev, nxt = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    prev[order[1:][same]] = order[:-1][same]
    nxt[order[:-1][same]] = order[1:][same]
    later = prev >= 0
    raw = np.zeros(n, dtype=np.int64)
    raw[later] = w.input_tokens[later] - w.input_tokens[prev[later]] - w.output_tokens[prev[later]]
    new = np.where(later, np.maximum(raw, 1), 0)
    return TurnPlan(prev, nxt, new, int(np.unique(sid[member]).size), int((later & (raw < 1)).sum()))
