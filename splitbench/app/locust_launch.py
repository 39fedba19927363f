"""`splitbench locust` outside Locust: load the trace and start the backend like `splitbench run`, start Locust with
splitbench's locustfile in its own process, then check the run directory it assembled and pick the exit code.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from splitbench.app.options import RunOptions
from splitbench.app.reports import report
from splitbench.app.session import RunSession, merge_router_phases
from splitbench.client.locust_rows import HEADERS_ENV, workload_to_json
from splitbench.client.replayer import PATHS
from splitbench.client.shards import SHARDING
from splitbench.errors import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_OK, InputError
from splitbench.procs import die_with_parent
from splitbench.schema import records as R
from splitbench.schema.files import atomic_write_json
from splitbench.schema.runmeta import read_run_meta, write_run_meta

LOCUSTFILE = str(Path(__file__).with_name("locustfile.py"))
SESSION_ENV = "SPLITBENCH_LOCUST_SESSION"
SESSION_FILE = "locust_session.json"
CSV_PREFIX = "locust"            # Locust's CSVs: locust_stats.csv, locust_failures.csv, ... in the run directory
HTML_FILE = "locust.html"


@dataclass
class LocustOptions:
    headless: bool = False
    web_host: str = "127.0.0.1"
    web_port: int = 8089
    master: bool = False             # wait for --expect-workers remote workers
    expect_workers: int = 1
    worker: bool = False             # join a master; replays the shards it is given
    master_host: str = "127.0.0.1"
    master_port: int | None = None   # default: Locust's 5557 (--master/--worker), a free port (--processes)
    processes: int | None = None     # local worker processes (Locust --processes; implies a master)
    start_lead_s: float = 2.0        # shared start = the master's clock at test start + this
    expect_workers_max_wait_s: float = 120.0
    log_file: str | None = None      # Locust's stdout/stderr (default: this process's)
    extra_args: list[str] = field(default_factory=list)


@dataclass
class LocustResult:
    run_dir: Path | None
    summary: dict | None
    exit_code: int
    locust_returncode: int
    problems: list[str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_options(lo: LocustOptions) -> None:
    if lo.master and lo.worker:
        raise InputError("--master and --worker exclude each other")
    if lo.master and lo.processes:
        raise InputError("--processes already runs a master with N local workers: drop --master")
    if lo.processes is not None and lo.processes < 1:
        raise InputError(f"--processes must be >= 1, got {lo.processes}")
    if lo.expect_workers < 1:
        raise InputError(f"--expect-workers must be >= 1, got {lo.expect_workers}")
    if not lo.start_lead_s >= 0:
        raise InputError(f"--start-lead must be >= 0 s, got {lo.start_lead_s}")


def locust_command(lo: LocustOptions, *, host: str | None = None, run_dir: Path | None = None) -> list[str]:
    """The Locust command line for this mode (the user count is one idle user per worker: it changes nothing)."""
    cmd = [sys.executable, "-m", "locust", "-f", LOCUSTFILE]
    if lo.worker:
        cmd += ["--worker", "--master-host", lo.master_host, "--master-port", str(lo.master_port or 5557)]
        return cmd + (["--processes", str(lo.processes)] if lo.processes else []) + list(lo.extra_args)
    users = lo.processes or (lo.expect_workers if lo.master else 1)
    cmd += ["--host", host or "", "-u", str(users), "-r", str(users), "--stop-timeout", "0",
            "--csv", str(run_dir / CSV_PREFIX), "--html", str(run_dir / HTML_FILE)]
    if lo.headless:
        cmd += ["--headless", "--only-summary"]
    else:
        cmd += ["--web-host", lo.web_host, "--web-port", str(lo.web_port)]
    if lo.processes:
        port = lo.master_port or free_port()
        cmd += ["--processes", str(lo.processes), "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
                "--master-port", str(port), "--expect-workers-max-wait", str(int(lo.expect_workers_max_wait_s))]
    elif lo.master:
        cmd += ["--master", "--expect-workers", str(lo.expect_workers), "--master-bind-port",
                str(lo.master_port or 5557)]
    return cmd + list(lo.extra_args)


def _wait(proc: subprocess.Popen) -> int:
    """Wait for Locust. Locust has its own session, so a terminal's Ctrl-C (or a process-group kill) reaches only
    this process, which passes the first one on (Locust stops the shards, lets in-flight requests finish, writes,
    exits); a third one kills Locust's whole group."""
    count = 0

    def forward(sig, _frame):
        nonlocal count
        count += 1
        if proc.poll() is not None:
            return
        if count == 1:
            proc.send_signal(signal.SIGTERM if sig == signal.SIGTERM else signal.SIGINT)
        elif count >= 3:
            os.killpg(proc.pid, signal.SIGKILL)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _spawn(cmd: list[str], env: dict, log_file: str | None) -> subprocess.Popen:
    kw = {"env": env, "stdin": subprocess.DEVNULL, "start_new_session": True, "preexec_fn": die_with_parent}
    if log_file is None:
        return subprocess.Popen(cmd, **kw)
    with open(log_file, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)


def run_worker(lo: LocustOptions) -> LocustResult:
    """A Locust worker (or --processes N of them) that joins a master; it needs no trace and writes no run dir."""
    check_options(lo)
    rc = _wait(_spawn(locust_command(lo), dict(os.environ), lo.log_file))
    return LocustResult(None, None, rc, rc, [])


def _locust_meta(lo: LocustOptions) -> dict:
    mode = "master" if lo.master or lo.processes else "standalone"
    return {"locust": {"mode": mode, "processes": lo.processes, "headless": lo.headless, "sharding": SHARDING,
                       "expect_workers": lo.expect_workers if lo.master else lo.processes,
                       "start_lead_s": lo.start_lead_s, "csv_prefix": CSV_PREFIX, "html": HTML_FILE}}


def _session_file(session: RunSession, lo: LocustOptions) -> Path:
    """What Locust's master needs to shard and replay: the connected workload, replay and prompt settings."""
    o, c = session.opts, session.conn
    if c.workload.prefix_hashes is not None:
        raise InputError("locust does not build prefix-hash prompts (its workers would send unique prompts); "
                         "replay prefix-hash traces with `splitbench run`")
    replay = {k: v for k, v in asdict(c.cfg).items() if k not in ("headers", "start_at_unix_s")}
    spec = {"run_id": session.meta["run_id"], "run_dir": str(session.run_dir.resolve()),
            "start_lead_s": lo.start_lead_s, "headless": lo.headless, "http_name": PATHS[o.api], "replay": replay,
            "prompts": {"tokenizer": o.tokenizer, "vocab_size": o.vocab_size, "seed": o.seed,
                        "shared_prefix_tokens": o.shared_prefix_tokens, "model_root": c.model_info.get("root")},
            "workload": workload_to_json(c.workload)}
    path = (session.run_dir / SESSION_FILE).resolve()
    atomic_write_json(path, spec)
    return path


def run_locust(opts: RunOptions, lo: LocustOptions, on_status: Callable[[str], None] = lambda s: None
               ) -> LocustResult:
    """Master or standalone: one RunSession (same run.json keys as `run`) whose replay step is Locust, run until the
    replay ends (headless) or the web UI session is closed; then report on the run directory Locust's master
    assembled."""
    check_options(lo)
    if lo.worker:
        return run_worker(lo)
    with RunSession(opts, kind="locust", meta=_locust_meta(lo), on_status=on_status) as session:
        if len(session.workload) == 0:
            raise InputError("the trace window holds no request", file=opts.trace)
        c = session.start()
        env = {**os.environ, SESSION_ENV: str(_session_file(session, lo)), HEADERS_ENV: json.dumps(c.headers)}
        cmd = locust_command(lo, host=c.base_url, run_dir=session.run_dir.resolve())
        mode = session.meta["locust"]["mode"]
        on_status(f"locust ({mode}{', headless' if lo.headless else ''}): {len(c.workload)} requests against "
                  f"{c.base_url}" + ("" if lo.headless else f"; web UI at http://{lo.web_host}:{lo.web_port}"))
        rc = _wait(_spawn(cmd, env, lo.log_file))
    return _conclude(session.run_dir, rc, lo)


def _conclude(run_dir: Path, rc: int, lo: LocustOptions) -> LocustResult:
    """Check what the master wrote (finish it if Locust died first), recompute the summary, choose the exit code."""
    meta = read_run_meta(run_dir)
    problems: list[str] = []
    loc = meta.setdefault("locust", {})
    loc["returncode"] = rc
    if meta.get("status") not in ("complete", "interrupted"):   # the master never assembled the run
        R.finalize(run_dir)
        meta["status"] = "failed"
        problems.append(f"Locust exited ({rc}) before assembling the run: records are what reached the master")
    write_run_meta(run_dir, meta)
    for d in loc.get("dead_workers") or []:
        problems.append(f"worker {d['worker']} (shard {d['shard']}) died: {d['missing_requests']} of its requests "
                        "were never reported (absent from the records)")
    for s in loc.get("shards") or []:
        if s.get("returncode") not in (0, None) and s.get("status") != "dead":
            problems.append(f"shard {s['shard']} replayer exited with {s['returncode']}: {s.get('error') or ''}")
    summary = report(run_dir)
    if problems:
        code = EXIT_INCOMPLETE
    elif (summary.get("slos") or {}).get("all_met") is False:
        code = EXIT_FAILED
    elif meta.get("status") == "interrupted" and lo.headless:
        code = EXIT_INTERRUPTED
    else:
        code = EXIT_OK
    return LocustResult(run_dir, summary, code, rc, problems)


def assemble(run_dir: str | Path) -> dict:
    """The master's last step, run in a plain (gevent-free) process: router phases into the records, summary.json."""
    run_dir = Path(run_dir)
    merge_router_phases(run_dir, read_run_meta(run_dir))
    return report(run_dir)


def main(argv: list[str] | None = None) -> int:
    """`python -m splitbench.app.locust_launch RUN_DIR`: assemble; exit 1 when an SLO is missed, else 0."""
    argv = sys.argv[1:] if argv is None else argv
    summary = assemble(argv[0])
    lag = (summary.get("fidelity") or {}).get("lag_s") or {}
    print(json.dumps({"slos_all_met": (summary.get("slos") or {}).get("all_met"), "lag_p99_s": lag.get("p99"),
                      "records": (summary.get("counts") or {}).get("total")}))
    return EXIT_FAILED if (summary.get("slos") or {}).get("all_met") is False else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
