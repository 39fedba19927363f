"""Synthetic arrivals with a workload's own request lengths: Poisson or gamma (CV) arrivals at a given rate for a given
time, each request's (input, output) pair drawn from the base workload (seeded): the capacity search's probes."""
from __future__ import annotations

import numpy as np

from splitbench.errors import InputError
from splitbench.workload.types import Workload

ARRIVALS = ("poisson", "gamma")


def resampled(base: Workload, *, rate_rps: float, duration_s: float, arrivals: str = "poisson", cv: float = 1.0,
              seed: int = 0) -> Workload:
    """`duration_s` of `arrivals` at `rate_rps` (gamma: inter-arrival CV `cv`), lengths sampled jointly from `base`.
    Prompts are unique (no prefix hashes: a sampled row would repeat its prefix)."""
    if arrivals not in ARRIVALS:
        raise InputError(f"--arrivals must be rate-scale, poisson or gamma, got {arrivals!r}")
    if not (rate_rps > 0 and duration_s > 0) or (arrivals == "gamma" and not cv > 0):
        raise InputError(f"synthetic arrivals need rate > 0, duration > 0 and cv > 0 (got {rate_rps}, {duration_s}, "
                         f"{cv})")
    if len(base) == 0:
        raise InputError(f"{base.name}: no requests to take lengths from")
    rng = np.random.default_rng([seed, 7])
    n_max = int(rate_rps * duration_s * 1.5) + 64
    if arrivals == "poisson":
        gaps = rng.exponential(1.0 / rate_rps, n_max)
    else:
        shape = 1.0 / cv ** 2
        gaps = rng.gamma(shape, 1.0 / (rate_rps * shape), n_max)
    t = np.concatenate([[0.0], np.cumsum(gaps)])
    t = t[t < duration_s]
    rows = rng.integers(0, len(base), len(t))
    n = len(t)
    return Workload(name=f"{base.name}-{arrivals}", arrival_s=t.astype(np.float64),
                    input_tokens=base.input_tokens[rows].astype(np.int64),
                    output_tokens=base.output_tokens[rows].astype(np.int64), trace_index=np.arange(n, dtype=np.int64),
                    source={**{k: v for k, v in base.source.items() if k in ("name", "path", "sha256")},
                            "lengths_of": base.name, "synth": {"arrivals": arrivals, "rate_rps": rate_rps, "cv": cv,
                                                               "duration_s": duration_s, "seed": seed}},
                    transforms={"resampled": {"arrivals": arrivals, "rate_rps": rate_rps, "cv": cv,
                                              "duration_s": duration_s, "seed": seed}})
