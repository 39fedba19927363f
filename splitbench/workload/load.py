"""One workload option set (WorkloadSpec) and its one loader: catalogue name, trace file or `synth:` spec -> Workload.

The top of the workload layer: it dispatches synth specs (synth.py) and files (catalog.py, traces.py), then transforms.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from splitbench.errors import InputError
from splitbench.workload.catalog import catalog, ensure_local, file_source, resolve_trace
from splitbench.workload.hashtrace import is_hash_jsonl
from splitbench.workload.splitwisesim import is_splitwisesim_csv, read_splitwisesim_trace
from splitbench.workload.synth import parse_spec, synthesize
from splitbench.workload.traces import column_mapping, read_trace
from splitbench.workload.transforms import apply_transforms, check_transform_args, workload_digest
from splitbench.workload.types import Workload

DEFAULT_TRACE = "azure-conv-2023"
SYNTH_PREFIX = "synth:"
FLAGS = {"start_s": "--start", "duration_s": "--duration", "rate_scale": "--rate-scale",
         "max_requests": "--max-requests", "max_context_tokens": "--max-context-tokens",
         "block_tokens": "--block-tokens", "prefix_block_tokens": "--prefix-block-tokens"}   # as InputErrors name them
OPTIONAL = ("duration_s", "max_requests", "max_context_tokens", "block_tokens", "prefix_block_tokens")
WHOLE = ("max_requests", "max_context_tokens", "block_tokens", "prefix_block_tokens")


@dataclass(frozen=True)
class WorkloadSpec:
    """Which requests to replay: the same options wherever a workload is read (run, locust, simulate, traces show),
    with the library's defaults. Transforms apply in this order: window, rate scale, max requests, prefix block
    size, clip."""
    trace: str = DEFAULT_TRACE              # catalogue name, CSV/Parquet path, or synth:k=v,... spec
    trace_dir: str | None = None            # searched first for catalogue names (then the usual search path)
    columns: dict[str, str] | None = None   # role -> column of other files (traces.parse_columns reads --columns)
    start_s: float = 0.0                    # window start, s after the trace's first row
    duration_s: float | None = None         # window length in s; None = to the end
    rate_scale: float = 1.0                 # multiply the arrival rate (every gap / rate_scale)
    max_requests: int | None = None         # keep the first N requests of the window
    max_context_tokens: int | None = None   # clip input+output to this context (a live run: the server's limit)
    fetch: bool = True                      # download a catalogue trace that is not local (sha256-verified)
    block_tokens: int | None = None         # tokens per hash block of a hash-id JSONL trace [catalogue's; 512]
    prefix_block_tokens: int | None = None  # rescale hash blocks to this many tokens (same blocks, shorter prompts)

    @property
    def is_synth(self) -> bool:
        return self.trace.startswith(SYNTH_PREFIX)

    def validate(self) -> None:
        """Every option checked, one-line InputError naming the option; nothing is read or downloaded here."""
        if not isinstance(self.trace, str) or not self.trace.strip():
            raise InputError(f"--trace must name a catalogue trace, a file or a synth: spec, got {self.trace!r}")
        for name, flag in FLAGS.items():
            v = getattr(self, name)
            whole = name in WHOLE
            if v is None and name in OPTIONAL:
                continue
            if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)):
                raise InputError(f"{flag} must be a {'whole number' if whole else 'number'}, got {v!r}")
        check_transform_args(start_s=self.start_s, duration_s=self.duration_s, rate_scale=self.rate_scale,
                             max_requests=self.max_requests, max_context_tokens=self.max_context_tokens,
                             prefix_block_tokens=self.prefix_block_tokens)
        if self.block_tokens is not None and self.block_tokens < 1:
            raise InputError(f"--block-tokens must be >= 1, got {self.block_tokens}")
        if self.columns is not None:
            if not isinstance(self.columns, dict):
                raise InputError(f"columns must be a role -> column mapping, got {self.columns!r}")
            if self.is_synth:
                raise InputError("--columns maps the columns of a trace file; it does not apply to a synth: spec")
            column_mapping(self.columns)
        if self.trace_dir is not None and not Path(self.trace_dir).is_dir():
            raise InputError(f"--trace-dir {self.trace_dir} is not a directory")
        if self.is_synth:
            parse_spec(self.trace)
            if self.block_tokens is not None:
                raise InputError("--block-tokens is for hash-id JSONL traces; a synth: spec takes block=N")

    def describe(self) -> dict:
        """JSON-able options (run.json)."""
        return asdict(self)


def _synth(spec: WorkloadSpec, on_status: Callable[[str], None]) -> Workload:
    kw = parse_spec(spec.trace)
    if spec.fetch and kw["lengths"] not in ("fixed", "uniform"):   # lengths sampled from a catalogue trace
        ensure_local(kw["lengths"], spec.trace_dir, on_status)
    return synthesize(**kw, trace_dir=spec.trace_dir)


def _file(spec: WorkloadSpec, on_status: Callable[[str], None]) -> Workload:
    if spec.fetch:
        ensure_local(spec.trace, spec.trace_dir, on_status)
    path, cat_name = resolve_trace(spec.trace, spec.trace_dir)
    columns = spec.columns
    entry = catalog()[cat_name] if cat_name else {}
    if columns is None:
        columns = entry.get("columns")
    if columns is None and not is_hash_jsonl(path) and is_splitwisesim_csv(path):   # SplitwiseSim's own trace format, read natively
        w = read_splitwisesim_trace(path, name=cat_name or path.stem)
        w.source.update(file_source(path, cat_name))
        return w
    w = read_trace(path, columns=columns, start_s=spec.start_s, duration_s=spec.duration_s,
                   max_requests=spec.max_requests, name=cat_name or path.stem,
                   block_tokens=spec.block_tokens or entry.get("block_tokens"),
                   timestamp_unit=entry.get("timestamp_unit", "ms"))
    w.source.update(file_source(path, cat_name))
    return w


def load(spec: WorkloadSpec, on_status: Callable[[str], None] = lambda s: None) -> Workload:
    """The validated, transformed Workload of `spec` (arrival_s from 0, source with workload_sha256).

    Validates every option first, downloads a missing catalogue trace when spec.fetch, then reads only what the
    window needs. Raises InputError (one line: file, line, column or option) before anything could be sent.
    """
    spec.validate()
    w = _synth(spec, on_status) if spec.is_synth else _file(spec, on_status)
    w = apply_transforms(w, start_s=spec.start_s, duration_s=spec.duration_s, rate_scale=spec.rate_scale,
                         max_requests=spec.max_requests, max_context_tokens=spec.max_context_tokens,
                         prefix_block_tokens=spec.prefix_block_tokens)
    w.source["workload_sha256"] = workload_digest(w)
    return w
