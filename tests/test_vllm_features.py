"""vLLM feature detection: command lines spelled for the host's vLLM (flag sets of 0.26.0 and 0.32.0, read from each
version's own `vllm serve` argparse into tests/vllm_versions/), the probe's cache, and /metrics series renamed across
versions read by their current names."""
from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

from splitbench.errors import InputError
from splitbench.servers import vllm_features as F
from splitbench.servers.launcher import TINY_CPU_ARGS
from splitbench.servers.scrape import parse_prometheus, select
from splitbench.servers.topology import connector_config, plan_cluster

HERE = Path(__file__).parent / "vllm_versions"
CONNECTORS = frozenset({"ExampleConnector", "NixlConnector", "LMCacheConnectorV1", "MultiConnector"})


def version(v: str, drop: tuple[str, ...] = (), connectors: frozenset = CONNECTORS) -> F.VllmFeatures:
    flags = {ln.strip() for ln in (HERE / f"flags-{v}.txt").read_text().splitlines() if ln.strip()}
    return F.VllmFeatures(version=v, flags=frozenset(flags - set(drop)), connectors=connectors, source="probe")


V026, V032 = version("0.26.0"), version("0.32.0")


def splitwiser(features, **kw):
    return plan_cluster("/m", prompt=1, token=1, connector="nixl", gpus="0", layout="splitwiser",
                        port_fn=iter(range(9000, 9100)).__next__, features=features, **kw)


def test_fixture_flag_sets_differ_where_vllm_changed():
    assert "--device-memory-utilization" in V032.flags and "--device-memory-utilization" not in V026.flags
    assert "--calculate-kv-scales" in V026.flags and "--calculate-kv-scales" not in V032.flags
    for f in ("--gpu-memory-utilization", "--kv-transfer-config", "--kv-cache-memory-bytes", "--load-format",
              "--served-model-name", "--tensor-parallel-size", "--disable-log-stats", "--uvicorn-log-level"):
        assert f in V026.flags and f in V032.flags, f


@pytest.mark.parametrize("features", [V026, V032], ids=["0.26", "0.32"])
def test_splitbench_defaults_pass_unchanged_on_both_versions(features):
    from splitbench.backends.cluster import GPU_DEFAULT_ARGS
    for args in (TINY_CPU_ARGS, GPU_DEFAULT_ARGS):
        assert F.adapt_args(list(args), features, strict=True) == (list(args), [])
    spec = splitwiser(features, base_args=["--enforce-eager", "--kv-cache-memory-bytes", "4294967296"])
    args = spec.instances[0].vllm_args()
    assert args[:3] == ["--enforce-eager", "--kv-cache-memory-bytes", "4294967296"]
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.45" and spec.arg_notes == []
    assert spec.describe()["vllm"]["version"] == features.version


def test_memory_split_flag_follows_a_vllm_that_renamed_it():
    newer = version("0.32.0", drop=("--gpu-memory-utilization",))   # only --device-memory-utilization left
    args = splitwiser(newer).instances[1].vllm_args()
    assert "--gpu-memory-utilization" not in args and args[args.index("--device-memory-utilization") + 1] == "0.45"
    neither = version("0.26.0", drop=("--gpu-memory-utilization",))
    with pytest.raises(InputError, match=r"vLLM 0\.26\.0 has no --gpu-memory-utilization"):
        splitwiser(neither).instances[0].vllm_args()


def test_user_flags_a_version_lacks_fail_before_start():
    with pytest.raises(InputError, match=r"vLLM 0\.26\.0 has no flag --max-num-queued-reqs"):
        splitwiser(V026, base_args=["--max-num-queued-reqs", "8"])
    assert splitwiser(V032, base_args=["--max-num-queued-reqs", "8"]).instances[0].base_args[:2] == \
        ["--max-num-queued-reqs", "8"]
    with pytest.raises(InputError, match=r"vLLM 0\.32\.0 has no flag --calculate-kv-scales"):
        splitwiser(V032, base_args=["--calculate-kv-scales"])
    # vLLM's parser forms: underscores, =value, dotted JSON keys, short flags with attached values, abbreviations
    ok = ["--max_model_len=4096", "--compilation-config.mode", "0", "-O0", "--enforce-eager", "--kv-cache-mem", "1"]
    for v in (V026, V032):
        assert F.adapt_args(ok, v, strict=True) == (ok, [])


def test_optional_defaults_are_dropped_and_aliases_renamed_with_notes():
    old = version("0.26.0", drop=("--uvicorn-log-level", "--gpu-memory-utilization"))
    old = F.VllmFeatures(version="0.9", flags=old.flags | {"--device-memory-utilization"})
    args, notes = F.adapt_args(["--uvicorn-log-level", "warning", "--gpu-memory-utilization=0.3", "--seed", "1"],
                               old, strict=False)
    assert args == ["--device-memory-utilization=0.3", "--seed", "1"]
    assert notes == ["dropped --uvicorn-log-level (vLLM 0.9 has no such flag)",
                     "--gpu-memory-utilization -> --device-memory-utilization (vLLM 0.9)"]
    with pytest.raises(InputError):   # the same flag given by the user is not silently dropped
        F.adapt_args(["--uvicorn-log-level", "warning"], old, strict=True)


def test_unknown_vllm_takes_every_flag_as_given():
    args = ["--anything", "1", "--gpu-memory-utilization", "0.4"]
    assert F.adapt_args(args, F.UNKNOWN, strict=True) == (args, [])
    assert F.UNKNOWN.flag("--x") == "--x" and F.UNKNOWN.connector("ExampleConnector") == "ExampleConnector"


def test_example_connector_named_as_the_host_names_it(tmp_path):
    old = F.VllmFeatures(version="0.10.1", connectors=frozenset({"SharedStorageConnector", "NixlConnector"}))
    kv = connector_config("example", hardware="gpu-host", shared_dir=tmp_path, features=old)
    assert kv["kv_connector"] == "SharedStorageConnector"
    for v in (V026, V032):
        assert connector_config("example", hardware="gpu-host", shared_dir=tmp_path,
                                features=v)["kv_connector"] == "ExampleConnector"


def test_detect_probes_once_per_install_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path))
    calls = []
    probe = {"version": "0.26.0", "flags": sorted(V026.flags), "connectors": sorted(CONNECTORS), "errors": []}

    def fake_run(python, code, env, timeout_s, marker=""):
        calls.append("probe" if code == F.PROBE else "id")
        return probe if code == F.PROBE else ["/site/vllm/__init__.py", "0.26.0", 1.0]
    monkeypatch.setattr(F, "_run_json", fake_run)
    first = F.detect("python3")
    assert first.source == "probe" and first.version == "0.26.0" and first.flags == V026.flags
    second = F.detect("python3")
    assert second.source == "cache" and second.flags == V026.flags and calls == ["id", "probe", "id"]
    assert len(list((tmp_path / "vllm").glob("features-*.json"))) == 1
    monkeypatch.setenv(F.DISABLE_ENV, "0")
    assert F.detect("python3") is F.UNKNOWN


def test_detect_without_vllm_or_with_a_failing_probe_checks_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(F, "_run_json", lambda *a, **k: [None, None, None])
    assert F.detect("python3").flags is None
    monkeypatch.setattr(F, "_run_json", lambda p, code, *a, **k: None if code == F.PROBE else ["/v/__init__.py",
                                                                                                 "0.26.0", 2.0])
    f = F.detect("python3")
    assert f.flags is None and f.version == "0.26.0" and not list(tmp_path.glob("vllm/*"))


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_detect_reads_the_installed_vllm():
    import vllm
    f = F.detect()
    assert f.version == vllm.__version__ and "--kv-transfer-config" in f.flags and "NixlConnector" in f.connectors


# ----------------------------------------------------------------------------- /metrics names

# the series splitbench reads, as 0.26.0 and 0.32.0 name them (vllm/v1/metrics/loggers.py, nixl/stats.py of each)
CURRENT = textwrap.dedent("""\
    vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
    vllm:prefix_cache_queries_total{engine="0",model_name="m"} 64.0
    vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"} 0.5
    vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 10.0
    vllm:inter_token_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10.0
    """)
NIXL = textwrap.dedent("""\
    vllm:nixl_xfer_time_seconds_sum{engine="0",model_name="m"} 0.02
    vllm:nixl_xfer_time_seconds_count{engine="0",model_name="m"} 4.0
    vllm:nixl_bytes_transferred_sum{engine="0",model_name="m"} 4.0e6
    """)
# vLLM 0.8-0.11 (deprecated names; 0.10 and 0.11 send both)
OLD = textwrap.dedent("""\
    vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.5
    vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 64.0
    vllm:time_per_output_token_seconds_sum{engine="0",model_name="m"} 0.5
    vllm:time_per_output_token_seconds_count{engine="0",model_name="m"} 10.0
    vllm:time_per_output_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10.0
    vllm:time_per_output_token_seconds_created{engine="0",model_name="m"} 1.7e9
    """)


@pytest.mark.parametrize("text", [CURRENT + NIXL, OLD + NIXL, CURRENT + OLD + NIXL],
                         ids=["0.26/0.32", "0.9", "both (0.10)"])
def test_metrics_read_by_current_names_whichever_the_server_sends(text):
    d = select(parse_prometheus(text))
    assert d["gauges"] == {"vllm:kv_cache_usage_perc": 0.5}
    assert d["counters"] == {"vllm:prefix_cache_queries_total": 64.0}
    assert d["histograms"] == {"vllm:inter_token_latency_seconds": {"sum": 0.5, "count": 10.0,
                                                                    "buckets": [["+Inf", 10.0]]}}
    assert d["nixl"]["vllm:nixl_xfer_time_seconds_count"] == 4.0
    assert json.dumps(d).count("gpu_") == 0
