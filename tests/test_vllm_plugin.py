"""splitbench's vLLM plugin: a process it runs in holds the AMX tile-data permission afterwards (on AMX CPUs), which
vLLM CPU's AMX attention kernel needs in a decode-only P/D instance (it died of SIGILL without it)."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from splitbench.servers import vllm_plugin


def _cpu_has_amx() -> bool:
    try:
        return " amx_tile" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def test_the_plugin_is_registered_for_vllm():
    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("splitbench_cpu_amx") == "splitbench.servers.vllm_plugin:register"


@pytest.mark.parametrize("env", ["1", "0"])
def test_register_requests_amx_only_when_splitbench_launched_the_server(env):
    if vllm_plugin.amx_permission() is None:
        pytest.skip("not Linux x86_64")
    code = ("import os; from splitbench.servers import vllm_plugin as p; before = p.amx_permission(); "
            "p.register(); print(before, p.amx_permission())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", vllm_plugin.ENV: env}).stdout.split()
    assert out[0] == "False"                 # a fresh interpreter holds no permission (no oneDNN matmul yet)
    assert out[1] == str(env == "1" and _cpu_has_amx())


def test_numa_groups_are_cut_to_the_processs_own_cores():
    assert vllm_plugin.own_numa_groups([[0, 1]], {0}) == [[0]]
    assert vllm_plugin.own_numa_groups([[0, 1], [2, 3]], {1, 3}) == [[1], [3]]
    assert vllm_plugin.own_numa_groups([[0, 1], [2, 3]], {2, 3}) == [[2, 3]]
    assert vllm_plugin.own_numa_groups([[0, 1]], {5}) == []


_NIXL_PROBE = """
import os
os.sched_setaffinity(0, {0})
from splitbench.servers import vllm_plugin
vllm_plugin.register()
from vllm.platforms.cpu import CpuPlatform
from vllm.distributed.nixl_utils import nixl_agent_config
print(max(max(g) for g in CpuPlatform.discover_numa_topology()), nixl_agent_config(num_threads=4).enable_pthread)
"""


@pytest.mark.parametrize("cores", [None, "0"])
def test_a_pinned_instance_keeps_nixl_on_its_cores_and_without_a_spinning_progress_thread(cores):
    """Real vLLM and NIXL classes, patched by the plugin as a vLLM process loads it: pinned (SPLITBENCH_CPU_CORES
    set), the core vLLM's NIXL worker pins its model thread to is the process's own, and the agent config it makes
    has no progress thread; unpinned, both are vLLM's own (the host's last core; a progress thread)."""
    pytest.importorskip("vllm")
    pytest.importorskip("nixl")
    if len(os.sched_getaffinity(0)) < 2 or 0 not in os.sched_getaffinity(0):
        pytest.skip("needs cores 0 and 1")
    env = {k: v for k, v in os.environ.items() if k not in (vllm_plugin.CORES_ENV, vllm_plugin.PROGRESS_ENV)}
    if cores:
        env[vllm_plugin.CORES_ENV] = cores
    out = subprocess.run([sys.executable, "-c", _NIXL_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    last_core, pthread = out.stdout.split()[-2:]
    host_last = max(int(c[3:]) for c in os.listdir("/sys/devices/system/cpu") if c[3:].isdigit())
    assert (int(last_core), pthread) == ((0, "False") if cores else (host_last, "True"))
