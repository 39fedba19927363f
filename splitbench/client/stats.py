"""A replay's counters (ReplayStats), apart from the replayer so processes without its event loop (Locust's, under
gevent) can read and merge them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReplayStats:
    planned: int = 0
    sent: int = 0
    finished: int = 0
    failed: int = 0
    inflight_peak: int = 0
    inflight_cap_waits: int = 0   # times --max-inflight delayed a send
    stopped_early: bool = False
    t0_unix_s: float = 0.0        # wall time of run-clock zero
    duration_s: float = 0.0
    start_late_s: float = 0.0     # how far past run-clock zero the replayer was ready to send (a shared start missed)
    turns_not_sent: int = 0       # multi-turn: later turns of sessions whose earlier turn failed (not_sent records)
    stand_in_outputs: int = 0     # multi-turn: answers without token ids, threaded with seeded stand-in ids
