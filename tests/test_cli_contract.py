"""The CLI's contract with its users: library defaults are the CLI's defaults, every workload option exists wherever a
workload is read, refused input is one line and exit 2 with nothing half-written, and --json output is JSON only."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import click
import typer.main

from splitbench.app.options import RunOptions
from splitbench.app.simrun import SimOptions
from splitbench.cli import app
from splitbench.cli.groups import WORKLOAD

CLI = [sys.executable, "-m", "splitbench.cli"]
SYNTH = "synth:arrivals=poisson,rate=20,count=12,lengths=fixed,input=16,output=4,seed=2"


def _command(name: str) -> click.Command:
    return typer.main.get_command(app).commands[name]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_cli_defaults_are_the_library_defaults():
    """`splitbench run` with no flags means RunOptions(); `simulate` means SimOptions() (same field names)."""
    for command, target in (("run", RunOptions), ("simulate", SimOptions)):
        params = {p.name: p for p in _command(command).params}
        checked = 0
        for f in dataclasses.fields(target):
            if f.name in params and f.default is not dataclasses.MISSING:
                assert params[f.name].default == f.default, (command, f.name)
                checked += 1
        assert checked >= 10, (command, checked)


def test_every_workload_option_exists_wherever_a_workload_is_read():
    flags = {o.name for o in WORKLOAD}
    for command in ("run", "locust", "simulate"):
        assert flags <= {p.name for p in _command(command).params}, command


def test_existing_run_id_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    for args in (["run", "--backend", "stub", "--trace", SYNTH],
                 ["simulate", "--cluster", "splitwise-aa:1,1", "--trace", SYNTH]):
        p = _cli(*args, "--results", str(tmp_path), "--run-id", "taken")
        assert p.returncode == 2, p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "exists already" in lines[0] and "taken" in lines[0], p.stderr
        assert sorted(x.name for x in (tmp_path / "taken").iterdir()) == ["keep.txt"]


def test_simulate_json_prints_only_json(tmp_path):
    p = _cli("simulate", "--cluster", "splitwise-aa:1,1", "--trace", SYNTH, "--results", str(tmp_path),
             "--run-id", "s", "--json")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)           # the whole of stdout is one JSON document
    assert summary["counts"]["total"] == 12
    assert str(tmp_path / "s") in p.stderr


def test_simulate_reads_other_files_with_columns(tmp_path):
    csv = tmp_path / "mine.csv"
    csv.write_text("when,prompt,gen\n" + "".join(f"{i * 0.25},{32 + i},{4 + i % 3}\n" for i in range(10)))
    p = _cli("simulate", "--cluster", "splitwise-aa:1,1", "--trace", str(csv), "--columns",
             "timestamp=when,input=prompt,output=gen", "--results", str(tmp_path), "--run-id", "c", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["counts"]["total"] == 10
    bad = _cli("simulate", "--cluster", "splitwise-aa:1,1", "--trace", str(csv), "--columns",
               "timestamp=when,input=nope,output=gen", "--results", str(tmp_path), "--run-id", "d")
    assert bad.returncode == 2 and "nope" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "d").exists()


def test_request_spread_needs_a_step_spread_with_request_quantiles_exit_2_and_no_run_left(tmp_path):
    p = _cli("simulate", "--cluster", "splitwise-aa:1,1", "--trace", SYNTH, "--results", str(tmp_path),
             "--run-id", "c", "--request-spread")
    assert p.returncode == 2 and p.stderr.strip() == ("error: --request-spread needs --step-spread (the spread file "
                                                      "holds the measured quantiles)")
    old = tmp_path / "old.spread.json"
    old.write_text(json.dumps({"quantiles": [0.5, 1.5]}))
    p = _cli("simulate", "--cluster", "splitwise-aa:1,1", "--trace", SYNTH, "--results", str(tmp_path),
             "--run-id", "c", "--request-spread", "--step-spread", str(old))
    assert p.returncode == 2 and "request_quantiles" in p.stderr and str(old) in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def test_cold_prefills_needs_a_step_spread_one_line_exit_2_and_no_run_left(tmp_path):
    p = _cli("simulate", "--cluster", "splitwise-aa:1,1", "--trace", SYNTH, "--results", str(tmp_path),
             "--run-id", "c", "--cold-prefills")
    assert p.returncode == 2 and p.stderr.strip() == ("error: --cold-prefills needs --step-spread (the spread file "
                                                      "holds the measured factor)")
    assert not (tmp_path / "c").exists()
