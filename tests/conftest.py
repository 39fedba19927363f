"""Shared fixtures: the cached tiny model and one real vLLM server per test session (tests marked `vllm`)."""
from __future__ import annotations

import importlib.util
import os

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The default tiny Llama, generated once into the user cache and reused."""
    from splitbench.servers.tiny_model import ensure_tiny_model
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def vllm_server(request, tiny_model_dir, tmp_path_factory):
    """One VllmServer on a free port for the whole session; stopped (process group killed) at the end.

    Only tests marked `@pytest.mark.vllm` may use it. Extra server args: $SPLITBENCH_TEST_VLLM_ARGS.
    """
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    from splitbench.servers.launcher import TINY_CPU_ARGS, VllmServer, free_port
    # with its /metrics on (no --disable-log-stats), as the launched clusters run: on a fast host the tiny model
    # makes a short answer's tokens faster than vLLM's frontend streams them, and sizing then reads vLLM's own ITL
    args = [a for a in TINY_CPU_ARGS if a != "--disable-log-stats"] + \
        os.environ.get("SPLITBENCH_TEST_VLLM_ARGS", "").split()
    server = VllmServer(tiny_model_dir, port=free_port(), extra_args=args,
                        log_path=tmp_path_factory.mktemp("vllm") / "vllm.log")
    try:
        server.start(timeout_s=300)
        pgid = server.proc.pid
        yield server
    finally:
        server.stop()
    try:  # stop() must leave nothing of the process group behind
        os.killpg(pgid, 0)
        pytest.fail(f"vLLM process group {pgid} still alive after stop()")
    except ProcessLookupError:
        pass


@pytest.fixture(autouse=True)
def _vllm_marker_guard(request):
    """Keep the slow server out of unmarked tests."""
    if "vllm_server" in request.fixturenames and request.node.get_closest_marker("vllm") is None:
        pytest.fail("tests using the vllm_server fixture must be marked @pytest.mark.vllm")
