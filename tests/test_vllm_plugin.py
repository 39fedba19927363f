"""splitbench's vLLM plugin: a process it runs in holds the AMX tile-data permission afterwards (on AMX CPUs), which
vLLM CPU's AMX attention kernel needs in a decode-only P/D instance (it died of SIGILL without it)."""
from __future__ import annotations

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
