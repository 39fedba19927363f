"""Regression gates on real runs: an injected regression (the stub made slower per token) is caught, two runs of the
same configuration pass, a client that fell behind makes the comparison invalid, different workloads are invalid,
malformed rule files are one-line errors; baselines save/list/show and `run --gate` in one step."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from splitbench.app.baselines import gate, save
from splitbench.app.options import RunOptions
from splitbench.app.runner import run
from splitbench.errors import InputError
from splitbench.metrics.gate_rules import load_rules

CLI = [sys.executable, "-m", "splitbench.cli"]
REPO = Path(__file__).resolve().parents[1]
STUB_RULES = REPO / "gates" / "stub.toml"
TRACE = "synth:arrivals=poisson,rate=40,count=300,seed=5"
SLOW_TPOT_MS = 7.5   # the injected regression: 5 -> 7.5 ms per token, TBT +50% (tolerance 10%)


@pytest.fixture(scope="module")
def rules(tmp_path_factory) -> Path:
    """gates/stub.toml with the send-lag precondition at 1 s instead of 10 ms: these tests are about the rules, and a
    busy host may lag a few ms; a client that really fell behind (below) lags by seconds."""
    text = STUB_RULES.read_text()
    assert "max_lag_p99_ms = 10 " in text
    path = tmp_path_factory.mktemp("rules") / "stub.toml"
    path.write_text(text.replace("max_lag_p99_ms = 10 ", "max_lag_p99_ms = 1000 "))
    return path


def stub_run(tmp: Path, run_id: str, tpot_ms: float = 5.0, trace: str = TRACE, **kw) -> Path:
    opts = RunOptions(trace=trace, backend="stub", backend_options={"ttft_s": 0.02, "tpot_s": tpot_ms / 1e3},
                      results_dir=str(tmp), run_id=run_id, **kw)
    return run(opts).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    return {"a": stub_run(tmp, "a"), "b": stub_run(tmp, "b"), "slow": stub_run(tmp, "slow", tpot_ms=SLOW_TPOT_MS),
            "tmp": tmp}


def test_two_runs_of_the_same_configuration_pass(runs, rules):
    res = gate([str(runs["a"])], [str(runs["b"])], rules)
    assert res["verdict"] == "pass" and res["exit_code"] == 0, res["rules"]
    assert all(p["ok"] for p in res["preconditions"])
    assert all("paired" in r["method"] for r in res["rules"])


def test_injected_regression_is_caught_with_junit_and_markdown(runs, rules, tmp_path):
    out = subprocess.run(CLI + ["gate", "--baseline", str(runs["a"]), "--candidate", str(runs["slow"]), "--rules",
                                str(rules), "--junit", str(tmp_path / "g.xml"), "--markdown",
                                str(tmp_path / "g.md"), "--json", str(tmp_path / "g.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    res = json.loads((tmp_path / "g.json").read_text())
    by = {r["metric"]: r for r in res["rules"]}
    # 5 -> 7.5 ms per token: TBT p50 +50% (tolerance 10%), its whole interval beyond the tolerance; the measured
    # change moves with the host's timer jitter (+0.45..+0.65 seen), so only its side of the tolerance is asserted
    assert by["tbt_p50"]["decision"] == "regression"
    assert 0.25 < by["tbt_p50"]["diff"] < 1.0 and by["tbt_p50"]["ci_low"] > 0.10
    assert by["e2e_p50"]["decision"] == "regression"
    assert by["ttft_p50"]["decision"] != "regression"     # TTFT did not change
    suite = ET.parse(tmp_path / "g.xml").getroot()
    assert suite.get("failures") == "2" and len(suite.findall("testcase")) == len(res["rules"])
    md = (tmp_path / "g.md").read_text()
    assert "REGRESSION" in md and "| tbt_p50 |" in md


def test_client_that_fell_behind_is_invalid(runs, rules):
    # one request in flight at a time while 40 req/s arrive (each takes ~175 ms): sends fall seconds behind
    behind = stub_run(runs["tmp"], "behind", max_inflight=1, trace=TRACE.replace("count=300", "count=40"))
    res = gate([str(runs["a"])], [str(behind)], rules)
    assert res["verdict"] == "invalid" and res["exit_code"] == 2
    bad = [p for p in res["preconditions"] if not p["ok"]]
    assert any(p["check"] == "send lag p99 (ms)" and p["run"] == "candidate:behind" for p in bad)


def test_different_workloads_are_invalid(runs, rules):
    other = stub_run(runs["tmp"], "other", trace="synth:arrivals=poisson,rate=40,count=300,seed=6")
    res = gate([str(runs["a"])], [str(other)], rules)
    assert res["verdict"] == "invalid"
    assert [p["check"] for p in res["preconditions"] if not p["ok"]] == ["same workload (sha256)"]


def test_several_runs_per_side_resample_runs(runs, rules):
    res = gate([str(runs["a"]), str(runs["b"])], [str(runs["slow"]), str(runs["slow"])], rules)
    assert all("over runs" in r["method"] for r in res["rules"])
    assert {r["metric"]: r["decision"] for r in res["rules"]}["tbt_p50"] == "regression"


@pytest.mark.parametrize("text, where", [
    ("[[rule]]\nmetric = \"ttft_p99\"\n", ":2: "),                            # no tolerance
    ("[[rule]]\nmetric = \"ttft_p77\"\ntolerance = \"5%\"\n", ":2: "),        # unknown metric
    ("[gate]\nconfidence = 1.5\n[[rule]]\nmetric = \"e2e_p50\"\ntolerance = \"5%\"\n", ":2: "),
    ("[[rule]]\nmetric = \"e2e_p50\"\ntolerance = \"fast\"\n", ":3: "),
    ("[[rule]]\nmetric = \"output_tokens_per_s\"\ntolerance = \"5ms\"\n", ":3: "),  # time tolerance on a rate
    ("[[rule]]\nmetric = \"e2e_p50\"\ntolerance = \"5%\"\nbeter = \"lower\"\n", ":4: "),
    ("[preconditions]\nmax_lag = 3\n[[rule]]\nmetric = \"e2e_p50\"\ntolerance = \"5%\"\n", ":2: "),
    ("[[rule]]\nmetric = \"goodput_rps\"\ntolerance = \"5%\"\n", ":2: "),      # goodput without gate.slo
    ("[gate]\nconfidence = 0.9\n", None),                                      # no rules
    ("[[rule]\nmetric = 1\n", ":1: "),                                         # invalid TOML
])
def test_malformed_rule_files_are_one_line_errors(tmp_path, text, where):
    p = tmp_path / "gates.toml"
    p.write_text(text)
    with pytest.raises(InputError) as e:
        load_rules(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    if where:
        assert where in msg, msg
    out = subprocess.run(CLI + ["gate", "--baseline", "x", "--candidate", "y", "--rules", str(p)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1


def test_baseline_store_and_one_step_run_and_gate(runs, rules, tmp_path):
    store = tmp_path / "baselines"
    save("stub-main", runs["a"], store)
    with pytest.raises(InputError, match="exists"):
        save("stub-main", runs["a"], store)
    out = subprocess.run(CLI + ["baseline", "list", "--baseline-dir", str(store)], capture_output=True, text=True,
                         timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and "stub-main" in out.stdout
    # run and gate in one step: the slower stub against the saved baseline -> exit 1
    out = subprocess.run(CLI + ["run", "--backend", "stub", "--stub-tpot-ms", str(SLOW_TPOT_MS), "--trace", TRACE,
                                "--results", str(tmp_path / "r"), "--gate", str(rules), "--baseline", "stub-main",
                                "--baseline-dir", str(store)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr
    assert "REGRESSION" in out.stdout
    bad = subprocess.run(CLI + ["run", "--backend", "stub", "--trace", TRACE, "--gate", str(rules),
                                "--baseline", "nope", "--baseline-dir", str(store), "--results", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "nope" in bad.stderr and not (tmp_path / "x").exists()
