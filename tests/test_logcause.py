"""The real cause of a vLLM start failure in one line, from log snippets shaped like vLLM's own (process and logger
prefixes, the engine core's traceback logged then re-raised, the API server's generic RuntimeError last)."""
from __future__ import annotations

from splitbench.servers.logcause import MAX_CAUSE_CHARS, failure_cause, log_failure_cause

ENGINE = "(EngineCore_DP0 pid=4140) "
LOGGED = ENGINE + "ERROR 08-03 17:46:16 [core.py:1330] "
API = "(APIServer pid=4021) "

API_GENERIC = f"""{API}Traceback (most recent call last):
{API}  File "/venv/lib/python3.12/site-packages/vllm/entrypoints/openai/api_server.py", line 1915, in <module>
{API}    uvloop.run(run_server(args))
{API}  File "/venv/lib/python3.12/site-packages/vllm/v1/engine/utils.py", line 955, in wait_for_engine_startup
{API}    raise RuntimeError(
{API}RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {{}}
"""


def _engine_traceback(frames: list[str], exception: str) -> str:
    """The engine core's failure as vLLM writes it: logged by core.py (with the logger prefix), then re-raised."""
    body = ["Traceback (most recent call last):", *frames, exception]
    logged = [LOGGED + "EngineCore failed to start."] + [LOGGED + x for x in body]
    raised = [ENGINE + "Process EngineCore_DP0:"] + [ENGINE + x for x in body]
    return "\n".join(logged + raised) + "\n"


FRAMES = ['  File "/venv/lib/python3.12/site-packages/vllm/v1/engine/core.py", line 1321, in run_engine_core',
          "    engine_core = EngineCoreProc(*args, **kwargs)",
          "                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
          '  File "/venv/lib/python3.12/site-packages/vllm/v1/worker/gpu_worker.py", line 330, in init_device',
          "    self.model_runner = GPUModelRunnerV2(self.vllm_config, self.device)"]
INFO = f"{API}INFO 08-03 17:45:58 [api_server.py:1839] vLLM API server version 0.26.0\n"


def test_missing_flashinfer_beats_engine_core_initialization_failed():
    log = INFO + _engine_traceback(FRAMES, "ModuleNotFoundError: No module named 'flashinfer'") + API_GENERIC
    assert failure_cause(log) == "ModuleNotFoundError: No module named 'flashinfer'"


def test_cuda_oom():
    oom = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 has a total capacity of "
           "139.72 GiB of which 1.12 GiB is free. Including non-PyTorch memory, this process has 138.58 GiB memory in "
           "use. Of the allocated memory 136.40 GiB is allocated by PyTorch, and 1.21 GiB is reserved by PyTorch but "
           "unallocated.")
    cause = failure_cause(INFO + _engine_traceback(FRAMES, oom) + API_GENERIC)
    assert cause.startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB")
    assert len(cause) <= MAX_CAUSE_CHARS


def test_kv_cache_does_not_fit():
    kv = ("ValueError: To serve at least one request with the models's max seq len (131072), (16.00 GiB KV cache is "
          "needed, which is larger than the available KV cache memory (3.50 GiB). Based on the available memory, the "
          "estimated maximum model length is 28672. Try increasing `gpu_memory_utilization` or decreasing "
          "`max_model_len` when initializing the engine.")
    assert failure_cause(_engine_traceback(FRAMES, kv) + API_GENERIC).startswith("ValueError: To serve at least")


def test_unknown_argument_is_argparse_error_line():
    log = ("usage: api_server.py [-h] [--host HOST] [--port PORT] [--model MODEL]\n"
           "                     [--load-format {auto,pt,safetensors,npcache,dummy}]\n"
           "api_server.py: error: unrecognized arguments: --no-such-flag 3\n")
    assert failure_cause(log) == "api_server.py: error: unrecognized arguments: --no-such-flag 3"
    bad_choice = "vllm serve: error: argument --load-format: invalid choice: 'random' (choose from auto, dummy)\n"
    assert failure_cause(INFO + bad_choice).endswith("argument --load-format: invalid choice: 'random' "
                                                     "(choose from auto, dummy)")


def test_chained_import_error_beats_its_wrapper_and_interleaved_lines_are_followed_per_process():
    log = (f"{ENGINE}Traceback (most recent call last):\n"
           f'{ENGINE}  File "/venv/lib/python3.12/site-packages/nixl/_api.py", line 20, in <module>\n'
           f"{API}INFO 08-03 17:46:01 [utils.py:312] Note: waiting for 1 local engine core(s) to start.\n"
           f"{ENGINE}    from nixl._bindings import nixlBind\n"
           f"{ENGINE}ImportError: libcudart.so.13: cannot open shared object file: No such file or directory\n"
           f"{ENGINE}\n"
           f"{ENGINE}The above exception was the direct cause of the following exception:\n"
           f"{ENGINE}\n"
           f"{ENGINE}Traceback (most recent call last):\n"
           f'{ENGINE}  File "/venv/lib/python3.12/site-packages/vllm/distributed/kv_transfer/nixl.py", line 9\n'
           f"{ENGINE}RuntimeError: NIXL is not available\n") + API_GENERIC
    assert failure_cause(log) == ("ImportError: libcudart.so.13: cannot open shared object file: "
                                  "No such file or directory")


def test_other_exceptions_generic_fallback_ansi_and_nothing():
    other = _engine_traceback(FRAMES, "huggingface_hub.errors.HFValidationError: Repo id must be in the form "
                                      "'repo_name'") + API_GENERIC
    assert failure_cause(other).startswith("huggingface_hub.errors.HFValidationError: Repo id")
    assert failure_cause(API_GENERIC).startswith("RuntimeError: Engine core initialization failed")  # all there is
    colored = f"\x1b[1;31m{LOGGED}\x1b[0mRuntimeError: CUDA error: no kernel image is available for execution\n"
    assert failure_cause(colored) == "RuntimeError: CUDA error: no kernel image is available for execution"
    assert failure_cause(INFO + f"{API}WARNING 08-03 17:45:59 [topk_topp_sampler.py:61] FlashInfer is not "
                                "available. Falling back to the PyTorch-native implementation\n") is None
    assert failure_cause("") is None


def test_log_file(tmp_path):
    path = tmp_path / "prompt-0.log"
    path.write_text("x" * 5000 + "\n" + _engine_traceback(FRAMES, "ModuleNotFoundError: No module named 'x'"))
    assert log_failure_cause(path, max_bytes=2000) == "ModuleNotFoundError: No module named 'x'"
    assert log_failure_cause(tmp_path / "missing.log") is None


def test_a_dead_nixl_handshake_thread_is_a_start_hang_with_its_cause():
    from splitbench.servers.logcause import start_hang_cause
    log = "\n".join([
        "(EngineCore pid=6593) INFO 12-07 12:13:00 [base_scheduler.py:109] Initializing NIXL Scheduler 2f05",
        "Exception in thread nixl_handshake_listener:",
        "Traceback (most recent call last):",
        '  File "/usr/lib/python3.11/threading.py", line 1045, in _bootstrap_inner',
        "    self.run()",
        "zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:34295')"])
    assert start_hang_cause(log) == ("thread nixl_handshake_listener died: zmq.error.ZMQError: Address already in use "
                                     "(addr='tcp://127.0.0.1:34295')")
    other = log.replace("nixl_handshake_listener", "usage_stats")   # other threads' deaths do not end a start
    assert start_hang_cause(other) is None and start_hang_cause("INFO all good") is None
