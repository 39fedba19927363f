"""A run directory read once: `open_run(dir)` -> Run with .meta (run.json), .records (a pandas DataFrame, one row
per request), .summary (summary.json) and .record_list() (the RequestRecords the metrics take); each file is read
on first use and cached."""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import pandas as pd
import pyarrow as pa

from splitbench.errors import InputError
from splitbench.schema.records import OK, RequestRecord, read_table, table_to_records
from splitbench.schema.runmeta import RunMeta, read_run_meta
from splitbench.schema.summary import Summary, read_summary

# Derived columns Run.records adds to the Parquet ones (seconds; NaN where undefined), as metrics.latency defines
# them: ttft_s and e2e_s for ok requests only, lag_s for every sent request.
DERIVED_COLUMNS = ("ttft_s", "e2e_s", "lag_s")


def records_frame(table: pa.Table) -> pd.DataFrame:
    """One row per request: the records columns (list columns as numpy arrays, phases_s as a dict) plus
    DERIVED_COLUMNS: ttft_s = first_token_s - actual_send_s, e2e_s = (last_token_s, else end_s) - actual_send_s,
    lag_s = actual_send_s - intended_send_s."""
    df = table.to_pandas(maps_as_pydicts="strict")
    ok = df["status"] == OK
    df["ttft_s"] = (df["first_token_s"] - df["actual_send_s"]).where(ok)
    df["e2e_s"] = (df["last_token_s"].fillna(df["end_s"]) - df["actual_send_s"]).where(ok)
    df["lag_s"] = df["actual_send_s"] - df["intended_send_s"]
    return df


class Run:
    """One results/<run-id> directory. Every attribute reads its file once, on first use; errors are one-line
    InputErrors naming the file (a missing summary.json: `splitbench report DIR` writes it)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        if not self.dir.is_dir():
            raise InputError("not a run directory", file=str(self.dir))

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    @cached_property
    def meta(self) -> RunMeta:
        return read_run_meta(self.dir)

    @property
    def run_id(self) -> str:
        return self.meta["run_id"]

    @cached_property
    def table(self) -> pa.Table:
        """The records as an Arrow table (schema version 2; a version 1 file is migrated)."""
        return read_table(self.dir)

    @cached_property
    def records(self) -> pd.DataFrame:
        return records_frame(self.table)

    @cached_property
    def _record_list(self) -> list[RequestRecord]:
        return table_to_records(self.table)

    def record_list(self) -> list[RequestRecord]:
        """The records as RequestRecords (what metrics.summarize and friends take); the same list every call."""
        return self._record_list

    @cached_property
    def summary(self) -> Summary:
        return read_summary(self.dir)


def open_run(run_dir: str | os.PathLike) -> Run:
    """The run in `run_dir`; its run.json is read (and validated) now, so a wrong directory fails here."""
    run = Run(run_dir)
    run.meta  # read and validate run.json now
    return run
