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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from splitbench.schema import records as R
from splitbench.errors import InputError
from splitbench.client.locust_bridge import HEADERS_ENV, SHARDING, workload_to_json

LOCUSTFILE = str(Path(__file__).with_name("locustfile.py"))
SESSION_ENV = "SPLITBENCH_LOCUST_SESSION"
SESSION_FILE = "locust_session.json"
CSV_PREFIX = "locust"            # Locust's CSVs: locust_stats.csv, locust_failures.csv, ... in the run directory
HTML_FILE = "locust.html"
EXIT_OK, EXIT_SLO_MISSED, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 1, 3, 130


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


def _die_with_parent() -> None:   # in the Locust child, before exec: SIGTERM if this process dies
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _spawn(cmd: list[str], env: dict, log_file: str | None) -> subprocess.Popen:
    kw = {"env": env, "stdin": subprocess.DEVNULL, "start_new_session": True, "preexec_fn": _die_with_parent}
    if log_file is None:
        return subprocess.Popen(cmd, **kw)
    with open(log_file, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)


def run_worker(lo: LocustOptions) -> LocustResult:
    """A Locust worker (or --processes N of them) that joins a master; it needs no trace and writes no run dir."""
    check_options(lo)
    rc = _wait(_spawn(locust_command(lo), dict(os.environ), lo.log_file))
    return LocustResult(None, None, rc, rc, [])


def run_locust(opts, lo: LocustOptions, on_status: Callable[[str], None] = lambda s: None) -> LocustResult:
    """Master or standalone: prepare the run like runner.run() (same run.json keys), run Locust until the replay
    ends (headless) or the web UI session is closed, then report on the run directory Locust's master assembled."""
    from splitbench.app.accounting import backend_instances, hardware_for
    from splitbench.backends import get_backend
    from splitbench.client.replayer import PATHS, ReplayConfig
    from splitbench.app.runner import connect, load, new_run_id, report
    check_options(lo)
    if lo.worker:
        return run_worker(lo)
    workload = load(opts, on_status)
    if len(workload) == 0:
        raise InputError("the trace window holds no request", file=opts.trace)
    if opts.slos:
        from splitbench.metrics.slo import parse_slos
        parse_slos(opts.slos)
    if opts.reference:
        from splitbench.metrics.slo import load_reference
        load_reference(opts.reference)
    run_id = opts.run_id or new_run_id(f"locust-{opts.backend}", opts.trace)
    opts.run_id = run_id
    run_dir = Path(opts.results_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    backend = get_backend(opts.backend, **opts.backend_options)
    mode = "master" if lo.master or lo.processes else "standalone"
    meta = {"schema_version": R.SCHEMA_VERSION, "run_id": run_id, "status": "starting", "simulated": False,
            "created_unix_s": time.time(), "options": asdict(opts), "versions": R.package_versions(),
            "host": R.host_info(),
            "locust": {"mode": mode, "processes": lo.processes, "expect_workers": lo.expect_workers if lo.master
                       else lo.processes, "headless": lo.headless, "sharding": SHARDING,
                       "start_lead_s": lo.start_lead_s, "csv_prefix": CSV_PREFIX, "html": HTML_FILE}}
    R.atomic_write_json(run_dir / R.RUN_FILE, meta)
    try:
        on_status(f"starting backend {opts.backend}")
        backend.start(run_dir)
        base_url, headers, model_info, model, workload, prompts = connect(opts, backend, workload)
        meta["hardware"] = hardware_for(opts, backend_instances(backend.describe()))
        cfg = ReplayConfig(base_url=base_url, model=model, api=opts.api, http=opts.http,
                           max_inflight=opts.max_inflight, timeout_s=opts.timeout_s, grace_s=opts.grace_s)
        meta.update(status="running", workload=workload.describe(), backend=backend.describe(),
                    model={"id": model, **{k: model_info[k] for k in ("root", "max_model_len") if k in model_info}},
                    prompts=prompts.describe(), replay=cfg.describe())
        R.atomic_write_json(run_dir / R.RUN_FILE, meta)
        replay = {k: v for k, v in asdict(cfg).items() if k not in ("headers", "start_at_unix_s")}
        session = {"run_id": run_id, "run_dir": str(run_dir.resolve()), "start_lead_s": lo.start_lead_s,
                   "headless": lo.headless, "http_name": PATHS[opts.api], "replay": replay,
                   "prompts": {"tokenizer": opts.tokenizer, "vocab_size": opts.vocab_size, "seed": opts.seed,
                               "shared_prefix_tokens": opts.shared_prefix_tokens,
                               "model_root": model_info.get("root")},
                   "workload": workload_to_json(workload)}
        R.atomic_write_json(run_dir / SESSION_FILE, session)
        env = {**os.environ, SESSION_ENV: str((run_dir / SESSION_FILE).resolve()), HEADERS_ENV: json.dumps(headers)}
        cmd = locust_command(lo, host=base_url, run_dir=run_dir.resolve())
        on_status(f"locust ({mode}{', headless' if lo.headless else ''}): {len(workload)} requests against {base_url}"
                  + ("" if lo.headless else f"; web UI at http://{lo.web_host}:{lo.web_port}"))
        rc = _wait(_spawn(cmd, env, lo.log_file))
    except BaseException as e:
        meta.update(status="failed", error=f"{type(e).__name__}: {e}")
        R.atomic_write_json(run_dir / R.RUN_FILE, meta)
        raise
    finally:
        on_status("stopping backend")
        backend.stop()
    return _conclude(run_dir, rc, lo, report)


def _conclude(run_dir: Path, rc: int, lo: LocustOptions, report) -> LocustResult:
    """Check what the master wrote (finish it if Locust died first), recompute the summary, choose the exit code."""
    meta = R.read_run(run_dir)
    problems: list[str] = []
    loc = meta.setdefault("locust", {})
    loc["returncode"] = rc
    if meta.get("status") not in ("complete", "interrupted"):   # the master never assembled the run
        R.finalize(run_dir)
        meta["status"] = "failed"
        problems.append(f"Locust exited ({rc}) before assembling the run: records are what reached the master")
    R.atomic_write_json(run_dir / R.RUN_FILE, meta)
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
        code = EXIT_SLO_MISSED
    elif meta.get("status") == "interrupted" and lo.headless:
        code = EXIT_INTERRUPTED
    else:
        code = EXIT_OK
    return LocustResult(run_dir, summary, code, rc, problems)


def assemble(run_dir: str | Path) -> dict:
    """The master's last step, run in a plain (gevent-free) process: router phases into the records, summary.json."""
    from splitbench.app.runner import merge_router_phases, report
    run_dir = Path(run_dir)
    merge_router_phases(run_dir, R.read_run(run_dir))
    return report(run_dir)


def main(argv: list[str] | None = None) -> int:
    """`python -m splitbench.app.locust_launch RUN_DIR`: assemble; exit 1 when an SLO is missed, else 0."""
    argv = sys.argv[1:] if argv is None else argv
    summary = assemble(argv[0])
    lag = (summary.get("fidelity") or {}).get("lag_s") or {}
    print(json.dumps({"slos_all_met": (summary.get("slos") or {}).get("all_met"), "lag_p99_s": lag.get("p99"),
                      "records": (summary.get("counts") or {}).get("total")}))
    return EXIT_SLO_MISSED if (summary.get("slos") or {}).get("all_met") is False else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
