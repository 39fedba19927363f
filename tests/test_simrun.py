"""Simulated runs end to end: `splitbench simulate` writes a run directory of the live schema that report and compare
read unchanged; cluster specs; the design search reproduces the direction of Splitwise's headline comparisons."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from splitbench.app.design import DesignSpec, configurations, search
from splitbench.app.simrun import SimOptions, parse_cluster, simulate_run
from splitbench.errors import InputError
from splitbench.hardware.catalog import load_catalog
from splitbench.schema import records as R

CLI = [sys.executable, "-m", "splitbench.cli"]
WINDOW = dict(trace="azure-conv-2023", duration_s=120.0)


def test_parse_cluster_forms_and_one_line_errors():
    pools = parse_cluster("prompt=dgx-h100:3,token=dgx-a100:5")
    assert [(p.pool, p.machine, p.count) for p in pools] == [("prompt", "dgx-h100", 3), ("token", "dgx-a100", 5)]
    assert [(p.pool, p.machine, p.count) for p in parse_cluster("splitwise-hhcap:2,4")] == \
        [("prompt", "dgx-h100", 2), ("token", "dgx-h100-pcap", 4)]
    assert [(p.pool, p.count) for p in parse_cluster("baseline-a100:7")] == [("baseline", 7)]
    for bad in ("splitwise-aa:3", "prompt=dgx-a100", "decode=dgx-a100:2", "token=dgx-a100:0", ""):
        with pytest.raises(InputError) as e:
            parse_cluster(bad)
        assert "\n" not in str(e.value)


def test_simulated_run_dir_has_the_live_schema_and_report_compare_work(tmp_path):
    a, sa = simulate_run(SimOptions(cluster="splitwise-ha:3,6", results_dir=str(tmp_path), run_id="sim-ha",
                                    slos="ttft_p99=2s", **WINDOW))
    b, sb = simulate_run(SimOptions(cluster="baseline-h100:6", results_dir=str(tmp_path), run_id="sim-base",
                                    **WINDOW))
    # same Arrow schema as a live run's records, one row per request of the window, every one ok
    assert pq.read_schema(a / R.RECORDS_FILE).equals(R.ARROW_SCHEMA, check_metadata=False)
    recs = R.read_records(a)
    meta = json.loads((a / "run.json").read_text())
    assert meta["simulated"] is True and len(recs) == meta["workload"]["requests"] > 100
    assert all(r.ok and r.pool == "split" and r.prefill_instance and r.decode_instance and r.phases_s.get("prefill_done")
               for r in recs)
    assert sa["run"]["simulated"] and sa["splitwise"] is not None   # reference = DGX-A100 simulated unloaded
    # cost per pool by hand: 3 DGX-H100 ($38/h) + 6 DGX-A100 ($17.6/h) over the window
    eff = sa["efficiency"]
    assert eff["pools"]["prompt"]["usd_per_hour"] == pytest.approx(3 * 38.0)
    assert eff["pools"]["token"]["usd_per_hour"] == pytest.approx(6 * 17.6)
    assert eff["pools"]["total"]["cost_usd"] == pytest.approx((3 * 38 + 6 * 17.6) * eff["window_s"] / 3600)
    # report recomputes the same summary from the records; compare reads both with a TTFT breakdown
    out = subprocess.run(CLI + ["report", str(a), "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["latency"] == json.loads(json.dumps(sa["latency"])) and rep["splitwise"]["passed"] == \
        sa["splitwise"]["passed"]
    html = tmp_path / "cmp.html"
    out = subprocess.run(CLI + ["compare", str(b), str(a), "--html", str(html)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "160"})
    assert out.returncode == 0, out.stderr
    assert "prompt cost of window" in out.stdout and "iso-cost output tok/s" in out.stdout
    text = html.read_text()
    assert 'id="plot-ttft-breakdown"' in text and text.count("<svg") >= 4


def test_simulation_is_deterministic_and_seeded(tmp_path):
    runs = [simulate_run(SimOptions(cluster="splitwise-aa:2,2", results_dir=str(tmp_path), run_id=f"s{k}",
                                    seed=seed, **WINDOW))[0] for k, seed in enumerate((1, 1))]
    t0, t1 = (pq.read_table(d / R.RECORDS_FILE).drop(["run_id"]) for d in runs)
    assert t0.equals(t1)


def test_runs_without_a_run_id_get_their_own_directories_within_one_second(tmp_path):
    """A simulation can take less than a second: back-to-back runs (a benchmark loop) must not collide on the time
    stamp of their default run id; a given run id that exists is still refused."""
    dirs = [simulate_run(SimOptions(cluster="baseline-h100:2", results_dir=str(tmp_path), **WINDOW))[0]
            for _ in range(3)]
    assert len({d.name for d in dirs}) == 3 and all((d / R.RECORDS_FILE).is_file() for d in dirs)
    assert all("-sim-" in d.name for d in dirs)
    with pytest.raises(InputError, match="exists already"):
        simulate_run(SimOptions(cluster="baseline-h100:2", results_dir=str(tmp_path), run_id=dirs[0].name, **WINDOW))


def test_simulate_cli_bad_input_is_one_line(tmp_path):
    out = subprocess.run(CLI + ["simulate", "--cluster", "prompt=dgx-z1:2,token=dgx-a100:2", "--results",
                                str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error:") and "dgx-z1" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_budget_configurations_use_the_budget():
    cat = load_catalog()
    spec = DesignSpec(budget="iso-cost", budget_machines=40, splits=5)   # $1,520/h = 40 DGX-H100
    cfgs = dict((d, pools) for d, pools in configurations(spec, cat) if d.startswith("baseline"))
    assert cfgs["baseline-a100"] == [("baseline", "dgx-a100", 86)]      # floor(1520 / 17.6)
    spec = DesignSpec(budget="iso-power", budget_machines=40)            # 408 kW
    cfgs = dict((d, pools) for d, pools in configurations(spec, cat) if d.startswith("baseline"))
    assert cfgs["baseline-a100"] == [("baseline", "dgx-a100", 62)]      # floor(408 / 6.5)


@pytest.mark.timeout(600)
def test_design_search_iso_power_splitwise_aa_beats_baseline_a100():
    """The paper's iso-power headline (Splitwise-AA ~2.15x Baseline-A100), at a small budget for test speed: with
    Splitwise's co-located model (prompt-first) by > 1.3x; with vLLM's chunked prefill the baseline gains and the
    split design still wins, by less (docs/sim-models.md)."""
    spec = DesignSpec(designs=["baseline-a100", "splitwise-aa"], budget="iso-power", budget_design="baseline-a100",
                      budget_machines=8, splits=4, duration_s=60.0, processes=1, batching="prompt-first")
    res = search(spec)
    best = res["best"]
    assert set(best) == {"baseline-a100", "splitwise-aa"}
    assert best["baseline-a100"]["machines"] == 8 and best["baseline-a100"]["max_rate_rps"] > 0
    ratio = res["ratios"]["rate_splitwise_aa_over_baseline_a100"]
    assert ratio is not None and ratio > 1.3, ratio
    chunked = search(DesignSpec(**{**spec.__dict__, "batching": "chunked", "designs": ["baseline-a100"]}))["best"]
    assert best["baseline-a100"]["max_rate_rps"] < chunked["baseline-a100"]["max_rate_rps"] < \
        best["splitwise-aa"]["max_rate_rps"]
    # every configuration stays within the power budget
    assert all(r["power_w"] <= 8 * 6500 + 1e-6 for r in res["evaluated"])
    v = best["splitwise-aa"]["verdict"]
    assert v["passed"] and len(v["checks"]) == 9
