"""The Workload type: what every trace source, synthesizer and transform produces and the replayer consumes."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Workload:
    """Requests to replay, sorted by arrival. `arrival_s` is relative to the first request (starts at 0)."""
    name: str
    arrival_s: np.ndarray       # float64, non-decreasing, arrival_s[0] == 0 after any transform
    input_tokens: np.ndarray    # int64 >= 1
    output_tokens: np.ndarray   # int64 >= 1
    trace_index: np.ndarray     # int64: 0-based data-row index in the source trace
    source: dict = field(default_factory=dict)      # {"name", "path", "sha256", ...}
    transforms: dict = field(default_factory=dict)  # what was applied: window, rate_scale, clipped, ...
    # prefix-hash traces (Mooncake and the like): per request its prompt's block hash ids in order (int64 arrays;
    # block_tokens tokens each, the last block may be partial); None for traces without hashes
    prefix_hashes: list[np.ndarray] | None = None
    block_tokens: int = 0
    # multi-turn sessions: int64 per request, -1 = not part of a session; turn 0, 1, ... within a session
    session_id: np.ndarray | None = None
    turn: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def describe(self) -> dict:
        """JSON-able description stored in run.json (no per-request arrays)."""
        n = len(self)
        span = float(self.arrival_s[-1] - self.arrival_s[0]) if n > 1 else 0.0
        return {"name": self.name, "requests": n, "span_s": span,
                "mean_rate_rps": (n - 1) / span if span > 0 else None,
                "source": self.source, "transforms": self.transforms}
