"""splitbench's locustfile (Locust and gevent live only here): open-loop trace replay run from Locust's web UI or
headless, TTFT/TBT/E2E stats rows, the LLM tab, and master/worker sharding. Started by `splitbench locust`; the
requests themselves are sent by one replayer child process per worker (locust_bridge), never by gevent code.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import gevent
import orjson
from gevent import subprocess as gsub
from locust import User, constant, events, task
from locust.runners import STATE_MISSING, STATE_RUNNING, STATE_SPAWNING, LocalRunner, MasterRunner, WorkerRunner

from splitbench.client.locust_rows import (
    HEADERS_ENV,
    LLM_COLUMNS,
    LiveLLM,
    llm_samples,
    workload_from_json,
    workload_to_json,
)
from splitbench.client.shards import shard_positions
from splitbench.client.stats import ReplayStats
from splitbench.procs import die_with_parent
from splitbench.schema import records as R
from splitbench.schema.files import atomic_write_json
from splitbench.schema.runmeta import read_run_meta, write_run_meta

log = logging.getLogger("splitbench.locust")
MSG_SHARD, MSG_STOP = "splitbench_shard", "splitbench_stop"          # master -> worker
MSG_RECORDS, MSG_DONE = "splitbench_records", "splitbench_done"      # worker -> master
LLM = "LLM"                       # the method column of the TTFT / TBT / E2E rows
SEND_EVERY_S = 0.5                # records travel to the master in batches this often
ABSENT_DEAD_S = 5.0               # a worker gone from the master's list this long without finishing is dead
LOCUST_NICE = 5                   # Locust processes yield the CPU to the replayer children (which keep nice 0)
_niced = False


def _lower_priority() -> None:
    """Once per process, after its replayer child exists: on a busy machine the schedule matters, stats can wait."""
    global _niced
    if not _niced:
        _niced = True
        try:
            os.nice(LOCUST_NICE)
        except OSError:
            pass


class TraceReplay(User):
    """Idle placeholder: the trace's timestamps decide when requests are sent, so user count and spawn rate
    change nothing (splitbench presets one user per worker)."""
    wait_time = constant(60)

    @task
    def idle(self):
        pass


# ----------------------------------------------------------------------------- worker side (and standalone)

class Agent:
    """Runs the replayer child for each shard it is given and turns its records into Locust stats."""

    def __init__(self, env):
        self.env = env
        self.procs: dict[int, gsub.Popen] = {}
        self.jobs: list[gevent.Greenlet] = []
        self.grace_s = 10.0

    def on_shard(self, environment, msg, **_kw) -> None:
        self.grace_s = msg.data["replay"].get("grace_s", 10.0)
        self.jobs.append(gevent.spawn(self._run, dict(msg.data)))

    def on_quitting(self, **_kw) -> None:
        """This Locust process is exiting (Ctrl-C, SIGTERM, master's quit): stop the shards gracefully and let their
        last records and MSG_DONE reach the master before the process goes."""
        self.on_stop()
        gevent.joinall(self.jobs, timeout=self.grace_s + 3.0)

    def on_stop(self, environment=None, msg=None, **_kw) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)   # graceful: no new sends, in-flight requests get grace_s

    def _log(self, s: dict, http_name: str) -> None:
        stats = self.env.stats
        if s["sent"]:
            self.env.events.request.fire(request_type="POST", name=http_name, response_time=s["http_ms"] or 0,
                                         response_length=0, response=None, context={},
                                         exception=None if s["ok"] else RuntimeError(s["error"]))
        # direct entries: the Aggregated row (stats.total) counts HTTP requests only
        if s["ttft_ms"] is not None:
            stats.get("TTFT", LLM).log(s["ttft_ms"], 0)
        if s["e2e_ms"] is not None:
            stats.get("E2E", LLM).log(s["e2e_ms"], s["output_tokens"])
        if s["tbt_ms"]:
            tbt = stats.get("TBT", LLM)
            for g in s["tbt_ms"]:
                tbt.log(g, 0)

    def _run(self, spec: dict) -> None:
        k, runner = spec["shard"], self.env.runner
        headers = spec.pop("headers", {})
        shard_dir = Path(spec["shard_dir"])
        try:
            shard_dir.mkdir(parents=True, exist_ok=True)
        except OSError:   # a remote worker where the master's path cannot be created
            shard_dir = Path(tempfile.mkdtemp(prefix=f"splitbench-shard{k}-"))
        spec["shard_dir"] = str(shard_dir)
        path = shard_dir / "shard.json"
        atomic_write_json(path, spec)
        env = {**os.environ, HEADERS_ENV: json.dumps(headers)}
        pending: list[dict] = []
        done, error, rc = None, None, None

        def send(final: bool = False):
            while True:
                if pending:
                    batch, pending[:] = list(pending), []
                    runner.send_message(MSG_RECORDS, {"shard": k, "records": batch})
                if final:
                    return
                gevent.sleep(SEND_EVERY_S)

        sender = gevent.spawn(send)
        try:
            proc = gsub.Popen([sys.executable, "-m", "splitbench.client.locust_bridge", str(path)],
                              stdout=gsub.PIPE, stdin=gsub.DEVNULL, env=env, preexec_fn=die_with_parent)
            self.procs[k] = proc
            _lower_priority()
            for line in proc.stdout:   # one JSON object per finished request, then {"done": replay stats}
                d = orjson.loads(line)
                if "done" in d:
                    done = d["done"]
                    continue
                self._log(llm_samples(R.RequestRecord(**d)), spec["http_name"])
                pending.append(d)
            rc = proc.wait()
            if rc != 0:
                error = f"replayer exited with {rc} (its stderr is in the Locust log)"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            log.exception("shard %s failed", k)
        finally:
            sender.kill()
            try:
                send(final=True)
                if isinstance(runner, WorkerRunner):
                    runner._send_stats()   # the stats of the last records reach the master before MSG_DONE
                runner.send_message(MSG_DONE, {"shard": k, "stats": done, "returncode": rc, "error": error,
                                               "shard_dir": str(shard_dir)})
            except Exception as e:  # noqa: BLE001 - master gone: its dead-worker check reports the shard
                log.warning("could not report shard %s to the master: %s", k, e)


# ----------------------------------------------------------------------------- master side (and standalone)

class Coordinator:
    """Shards the trace over the workers with one shared start, collects records into the run directory,
    notices dead workers and assembles run.json + summary.json when every shard has finished."""

    def __init__(self, env, session: dict):
        self.env, self.s = env, session
        self.run_dir = Path(session["run_dir"])
        self.workload = workload_from_json(session["workload"])
        self.live = LiveLLM(planned=len(self.workload))
        self.shards: dict[int, dict] = {}
        self.seen: set[int] = set()
        self.duplicates = 0
        self.started = self.finalized = False
        self.writer: R.RecordWriter | None = None
        self.start_at = None

    @property
    def distributed(self) -> bool:
        return isinstance(self.env.runner, MasterRunner)

    def on_test_start(self, **_kw) -> None:
        if self.started:
            log.warning("this session's trace replay already ran (one run per `splitbench locust`): nothing sent")
            return
        self.started = True
        gevent.spawn(self._begin)

    def _begin(self) -> None:
        runner = self.env.runner
        workers = (sorted(c.id for c in runner.clients.all if c.state != STATE_MISSING) if self.distributed
                   else ["local"])
        if not workers:
            log.error("no worker is connected: nothing to replay on")
            return
        self.writer = R.RecordWriter(self.run_dir, self.s["run_id"])
        self.start_at = time.time() + self.s["start_lead_s"]
        headers = json.loads(os.environ.get(HEADERS_ENV) or "{}")
        n = len(workers)
        for k, wid in enumerate(workers):
            pos = shard_positions(len(self.workload), k, n)
            self.shards[k] = {"shard": k, "worker": wid, "planned": int(pos.size), "received": 0, "status": "running",
                              "returncode": None, "error": None, "stats": None, "absent_since": None}
            spec = {"shard": k, "shards": n, "run_id": self.s["run_id"], "start_at_unix_s": self.start_at,
                    "shard_dir": str(self.run_dir / "shards" / f"shard-{k}"), "http_name": self.s["http_name"],
                    "replay": self.s["replay"], "prompts": self.s["prompts"], "headers": headers,
                    "workload": workload_to_json(self.workload, pos)}
            runner.send_message(MSG_SHARD, spec, client_id=wid if self.distributed else None)
        log.info("replaying %d requests on %d worker(s), shared start at %.3f", len(self.workload), n, self.start_at)
        if self.distributed:
            _lower_priority()   # standalone: the agent lowers it once its child runs (children inherit nice)
        self._monitor()

    def on_records(self, environment, msg, **_kw) -> None:
        if self.finalized or self.writer is None:
            log.warning("late records from shard %s ignored (run already assembled)", msg.data.get("shard"))
            return
        sh = self.shards[msg.data["shard"]]
        for d in msg.data["records"]:
            if d["trace_index"] in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(d["trace_index"])
            rec = R.RequestRecord(**d)
            self.writer.add(rec)
            self.live.add(llm_samples(rec))
            sh["received"] += 1

    def on_done(self, environment, msg, **_kw) -> None:
        sh = self.shards[msg.data["shard"]]
        sh.update(status="done" if msg.data["returncode"] == 0 else "failed", stats=msg.data["stats"],
                  returncode=msg.data["returncode"], error=msg.data["error"], shard_dir=msg.data["shard_dir"])

    def on_test_stopping(self, **_kw) -> None:
        for sh in self.shards.values():
            if sh["status"] == "running":
                self.env.runner.send_message(MSG_STOP, {}, client_id=sh["worker"] if self.distributed else None)

    def _check_dead(self) -> None:
        if not self.distributed:
            return
        now = time.time()
        for sh in self.shards.values():
            if sh["status"] != "running":
                continue
            c = self.env.runner.clients.get(sh["worker"])
            if c is not None and c.state != STATE_MISSING:
                sh["absent_since"] = None
                continue
            sh["absent_since"] = sh["absent_since"] or now
            if c is not None or now - sh["absent_since"] > ABSENT_DEAD_S:
                sh.update(status="dead", dead_noticed_unix_s=now)
                log.warning("worker %s (shard %d) died with %d of its %d requests unreported (a journal it left on "
                            "this machine is merged at the end; the rest are absent from the records)", sh["worker"],
                            sh["shard"], sh["planned"] - sh["received"], sh["planned"])

    def _monitor(self) -> None:
        while True:
            gevent.sleep(0.5)
            if self.finalized:   # assembled at quitting (Ctrl-C / SIGTERM)
                return
            self.writer.flush()
            self._check_dead()
            if all(sh["status"] != "running" for sh in self.shards.values()):
                break
        runner = self.env.runner
        try:
            self.finalize()
        finally:
            if self.s["headless"]:
                gevent.sleep(1.5)   # Locust's CSV writer (1 s period) catches up before quitting
                runner.quit()
            elif runner.state in (STATE_RUNNING, STATE_SPAWNING):
                runner.stop()

    def on_quitting(self, **_kw) -> None:
        """Ctrl-C / SIGTERM: stop the shards, give their in-flight requests grace_s to finish, then assemble."""
        if not self.started or self.finalized or self.writer is None:
            return
        self.on_test_stopping()
        deadline = time.time() + self.s["replay"].get("grace_s", 10.0) + 3.0
        while any(sh["status"] == "running" for sh in self.shards.values()) and time.time() < deadline:
            gevent.sleep(0.2)
        if not self.finalized:
            self.finalize(quitting=True)

    def _recover_from_shard_dirs(self) -> None:
        """Records that never reached the master but sit in a shard's own journal on this machine (a worker that
        died or quit first) join the run: each trace request still has at most one record."""
        for k, sh in self.shards.items():
            d = Path(sh.get("shard_dir") or self.run_dir / "shards" / f"shard-{k}")
            if not ((d / R.RECORDS_FILE).exists() or (d / R.JOURNAL_FILE).exists()):
                continue
            for rec in R.read_records(d):
                if rec.trace_index not in self.seen:
                    self.seen.add(rec.trace_index)
                    self.writer.add(rec)
                    sh["recovered"] = sh.get("recovered", 0) + 1

    def finalize(self, quitting: bool = False) -> None:
        """Write records.parquet, run.json (status, t0, replay_stats, locust section) and summary.json."""
        self.finalized = True
        self._recover_from_shard_dirs()
        self.writer.close()
        meta = read_run_meta(self.run_dir)
        shards = [{k: v for k, v in sh.items() if k != "absent_since"} for sh in self.shards.values()]
        stats = [sh["stats"] or {} for sh in shards]
        total = {f.name: sum(s.get(f.name) or 0 for s in stats) for f in fields(ReplayStats)
                 if f.name not in ("stopped_early", "t0_unix_s", "duration_s", "inflight_peak", "start_late_s")}
        total.update(planned=len(self.workload), stopped_early=any(s.get("stopped_early") for s in stats),
                     inflight_peak=max((s.get("inflight_peak") or 0 for s in stats), default=0),
                     duration_s=max((s.get("duration_s") or 0.0 for s in stats), default=0.0),
                     start_late_s=max((s.get("start_late_s") or 0.0 for s in stats), default=0.0),
                     t0_unix_s=self.start_at)
        interrupted = (quitting or total["stopped_early"] or any(s.get("interrupted") for s in stats)
                       or any(sh["status"] != "done" for sh in shards))
        dead = [{"worker": sh["worker"], "shard": sh["shard"],
                 "missing_requests": sh["planned"] - sh["received"] - sh.get("recovered", 0),
                 "noticed_unix_s": sh.get("dead_noticed_unix_s")} for sh in shards if sh["status"] == "dead"]
        loc = {**meta.get("locust", {}), "workers": len(shards), "shards": shards, "dead_workers": dead,
               "duplicate_records": self.duplicates, "start_at_unix_s": self.start_at,
               "locust_version": _locust_version()}
        meta.update(status="interrupted" if interrupted else "complete", t0_unix_s=self.start_at,
                    replay_stats=total, locust=loc)
        write_run_meta(self.run_dir, meta)
        # router phases + summary.json in a plain process: splitbench's precise event loop cannot import under gevent
        out = gsub.run([sys.executable, "-m", "splitbench.app.locust_launch", str(self.run_dir)],
                       stdout=gsub.PIPE, check=False)
        res = json.loads(out.stdout.decode().strip().splitlines()[-1]) if out.returncode in (0, 1) else {}
        missed = res.get("slos_all_met") is False
        self.env.process_exit_code = 3 if dead or out.returncode not in (0, 1) else (1 if missed else 0)
        lag = res.get("lag_p99_s")
        log.info("run assembled in %s: %d records, schedule lag p99 %s ms%s", self.run_dir, len(self.seen),
                 f"{lag * 1e3:.2f}" if lag is not None else "-", ", SLO missed" if missed else "")


def _locust_version() -> str:
    from locust import __version__
    return __version__


# ----------------------------------------------------------------------------- web UI: the LLM tab

def extend_web_ui(web_ui, coord: Coordinator) -> None:
    from flask import Response, request
    web_ui.template_args.update(
        extended_tabs=[{"title": "LLM", "key": "llm"}],
        extended_tables=[{"key": "llm", "structure": [{"key": k, "title": t} for k, t in LLM_COLUMNS]}],
        extended_csv_files=[{"href": "./splitbench/llm/csv", "title": "Download LLM statistics CSV"}])

    @web_ui.app.after_request
    def add_llm_stats(response):
        if request.path.endswith("/stats/requests") and response.is_json:
            data = response.get_json()
            data["extended_stats"] = [{"key": "llm", "data": coord.live.rows()}]
            response.set_data(json.dumps(data))
        return response

    @web_ui.app.route("/splitbench/llm/csv")
    def llm_csv():
        rows = [",".join(t for _, t in LLM_COLUMNS)]
        rows += [",".join(f'"{r[k]}"' for k, _ in LLM_COLUMNS) for r in coord.live.rows(max_age_s=0.0)]
        return Response("\n".join(rows) + "\n", mimetype="text/csv",
                        headers={"Content-Disposition": "attachment;filename=splitbench_llm.csv"})


@events.init.add_listener
def on_init(environment, runner, web_ui=None, **_kw) -> None:
    if isinstance(runner, (WorkerRunner, LocalRunner)):
        agent = Agent(environment)
        runner.register_message(MSG_SHARD, agent.on_shard)
        runner.register_message(MSG_STOP, agent.on_stop)
        environment.events.quitting.add_listener(agent.on_quitting)
    if isinstance(runner, WorkerRunner):
        return
    path = os.environ.get("SPLITBENCH_LOCUST_SESSION")
    if not path:
        raise RuntimeError("start this locustfile with `splitbench locust` (no $SPLITBENCH_LOCUST_SESSION)")
    coord = Coordinator(environment, json.loads(Path(path).read_text()))
    runner.register_message(MSG_RECORDS, coord.on_records)
    runner.register_message(MSG_DONE, coord.on_done)
    environment.events.test_start.add_listener(coord.on_test_start)
    environment.events.test_stopping.add_listener(coord.on_test_stopping)
    environment.events.quitting.add_listener(coord.on_quitting)
    if web_ui is not None:
        extend_web_ui(web_ui, coord)
