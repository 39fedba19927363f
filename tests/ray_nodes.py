"""A local 2-node Ray cluster on this machine for tests: a head with 1 CPU and resource `prompt`, a second raylet
with 1 CPU and resource `token`, in a temp dir; `ray stop --force` after. Workers import this checkout."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180


def ray_env() -> dict[str, str]:
    """The environment the raylets (and so their workers and the vLLM they start) run with."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    for var, sub in (("SPLITBENCH_PROFILE_DIR", "profiles"), ("SPLITBENCH_TRACE_DIR", "traces")):
        shared = REPO.parent / "shared" / sub   # ../shared from the repo, whatever the workers' cwd
        dirs = [d for d in (env.get(var), str(shared) if shared.is_dir() else None) if d]
        if dirs:
            env[var] = os.pathsep.join(dirs)
    return env


def _ray(*args: str, env: dict) -> str:
    exe = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    out = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(f"ray {' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout + out.stderr


@contextlib.contextmanager
def two_nodes():
    """Yield the head's address (HOST:PORT) of a fresh prompt-node + token-node cluster; stop it after."""
    temp = tempfile.mkdtemp(prefix="sbray-", dir="/tmp")   # short: Ray's socket paths must fit 107 bytes
    env = ray_env()
    try:
        out = _ray("start", "--head", "--port", "0", "--num-cpus", "1", "--num-gpus", "0",
                   "--resources", '{"prompt": 1}', "--include-dashboard=false", "--disable-usage-stats",
                   "--temp-dir", temp, env=env)
        address = re.search(r"ray start --address='([^']+)'", out).group(1)
        _ray("start", "--address", address, "--num-cpus", "1", "--num-gpus", "0", "--resources", '{"token": 1}',
             "--disable-usage-stats", env=env)
        yield address
    finally:
        subprocess.run([shutil.which("ray") or "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
