"""Running the stub server: serve() picks the lean or aiohttp server, run_server() serves in the foreground (the
child process of StubBackend and `splitbench serve-stub`), run_stub_in_thread() serves from a thread (tests).
`python -m splitbench.servers.stub_main --port 8000 --ttft-ms 20 --tpot-ms 5`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from splitbench.errors import InputError
from splitbench.servers.stub import DEFAULT_MODEL, LOOPS, SERVERS, StubConfig
from splitbench.servers.stub_lean import serve_lean
from splitbench.timing import new_event_loop


async def serve(cfg: StubConfig, host: str = "127.0.0.1", port: int = 0, *, stop: asyncio.Event | None = None,
                on_ready=None, server: str = "lean", manage_gc: bool = False,
                reuse_port: bool = False) -> dict[str, Any]:
    """Serve until `stop` is set (or the task is cancelled); on_ready(port) once listening. -> stats() at exit.
    server: "lean" (asyncio.Protocol + shared ticker, stub_lean.py) or "aiohttp" (stub_aiohttp.py).
    manage_gc: the lean server owns this process's GC (no automatic full collections); run_server sets it.
    reuse_port: several stub processes listen on one port (SO_REUSEPORT)."""
    if server not in SERVERS:
        raise InputError(f"stub server must be one of {', '.join(SERVERS)}, got {server!r}")
    if server == "aiohttp":
        # lazy: aiohttp would cost every stub process start 0.3-0.6 s of imports (measured on the shared 2-core
        # dev host: stub_main 0.86-1.2 s with it at top, 0.10-0.31 s without); the default lean server never uses it
        from splitbench.servers.stub_aiohttp import serve_aiohttp
        return await serve_aiohttp(cfg, host, port, stop or asyncio.Event(), on_ready, reuse_port=reuse_port)
    return await serve_lean(cfg, host, port, stop or asyncio.Event(), on_ready, manage_gc=manage_gc,
                            reuse_port=reuse_port)


def run_stub_in_thread(ttft_s: float = 0.02, tpot_s: float = 0.005, tokens_per_chunk: int = 1,
                       host: str = "127.0.0.1", port: int = 0, loop: str = "precise", server: str = "lean",
                       **cfg: Any):
    """Serve from a daemon thread with its own loop -> (url, stop_fn); for tests, sync or async.
    stop_fn() blocks until the server has shut down."""
    config = StubConfig(ttft_s, tpot_s, tokens_per_chunk, **cfg)
    ev_loop, ready, box = new_event_loop(loop), threading.Event(), {}

    def on_ready(p: int) -> None:
        box["port"] = p
        ready.set()

    def main() -> None:
        asyncio.set_event_loop(ev_loop)
        box["stop"] = asyncio.Event()
        try:
            ev_loop.run_until_complete(serve(config, host, port, stop=box["stop"], on_ready=on_ready,
                                             server=server))
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            box["error"] = e
        finally:
            ready.set()
            ev_loop.close()

    thread = threading.Thread(target=main, name="splitbench-stub", daemon=True)
    thread.start()
    ready.wait(30)
    if "port" not in box:
        raise RuntimeError(f"stub server did not start: {box.get('error')!r}")

    def stop_fn() -> None:
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):
                ev_loop.call_soon_threadsafe(box["stop"].set)
            thread.join(10)

    return f"http://{host}:{box['port']}", stop_fn


def run_server(cfg: StubConfig, host: str = "127.0.0.1", port: int = 8000, *, cpu: int | None = None,
               loop: str = "precise", port_file: str | None = None, server: str = "lean",
               reuse_port: bool = False) -> dict[str, Any]:
    """Serve in the foreground until SIGINT/SIGTERM; pins this process to `cpu` when given. Prints a one-line
    exit summary (requests, chunks' emission lateness) and returns stats()."""
    if loop not in LOOPS:
        raise InputError(f"stub loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    if server not in SERVERS:
        raise InputError(f"stub server must be one of {', '.join(SERVERS)}, got {server!r}")
    if cpu is not None:
        if not 0 <= cpu < (os.cpu_count() or 1):
            raise InputError(f"--cpu {cpu} is not a core of this machine (0..{(os.cpu_count() or 1) - 1})")
        os.sched_setaffinity(0, {cpu})
    with contextlib.suppress(Exception):  # 1 µs timer slack instead of 50 µs (Linux; best effort)
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, ns
    ev_loop = new_event_loop(loop)
    asyncio.set_event_loop(ev_loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        ev_loop.add_signal_handler(sig, stop.set)

    def on_ready(bound: int) -> None:
        if port_file:
            tmp = f"{port_file}.tmp"
            Path(tmp).write_text(str(bound))
            os.replace(tmp, port_file)
        print(f"splitbench stub listening on http://{host}:{bound} (ttft {cfg.ttft_s * 1e3:g} ms, tpot "
              f"{cfg.tpot_s * 1e3:g} ms, {cfg.tokens_per_chunk} token/chunk, pid {os.getpid()}, cpu {cpu}, "
              f"loop {loop}, server {server})", flush=True)
    try:
        st = ev_loop.run_until_complete(serve(cfg, host, port, stop=stop, on_ready=on_ready, server=server,
                                              manage_gc=True, reuse_port=reuse_port))
    except OSError as e:
        raise InputError(f"stub cannot listen on {host}:{port}: {e.strerror or e}") from None
    finally:
        ev_loop.close()
    print(summary_line(st), flush=True)
    return st


def summary_line(st: dict[str, Any]) -> str:
    la = st["chunk_lateness"]
    return (f"splitbench stub: {st['requests']} requests, {st['success']} ok, {st['generation']} tokens; chunk "
            f"lateness p50 {la['p50_s'] * 1e3:.3f} ms, p99 {la['p99_s'] * 1e3:.3f} ms, max {la['max_s'] * 1e3:.3f} ms "
            f"over {la['count']} chunks")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m splitbench.servers.stub_main",
                                description="Built-in OpenAI-compatible stub server: vLLM's chunk shapes, exact "
                                            "TTFT/TPOT pacing, fault injection.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--ttft-ms", type=float, default=20.0, help="request received -> first token chunk")
    p.add_argument("--tpot-ms", type=float, default=5.0, help="time per output token after the first chunk")
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--fail-rate", type=float, default=0.0, help="fraction of requests answered 500")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-transfer-ms", type=float, default=0.0, help="P/D: replaces ttft for do_remote_prefill")
    p.add_argument("--cpu", type=int, default=None, help="pin the server to this core")
    p.add_argument("--loop", choices=LOOPS, default="precise")
    p.add_argument("--server", choices=SERVERS, default="lean", help="lean (shared ticker) or aiohttp (comparison)")
    p.add_argument("--tick-ms", type=float, default=0.2, help="lean server: least time between ticker wakeups")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    p.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT: several stubs share one port")
    p.add_argument("--prefix-block-tokens", type=int, default=16, help="prefix cache block; 0: no prefix cache")
    p.add_argument("--kv-connector", choices=("nixl", "consumer", "none"), default=None,
                   help="P/D: KV-connector series in /metrics (nixl, consumer) or none (kv_transfer_params ignored)")
    p.add_argument("--prefix-cache-blocks", type=int, default=1 << 16, help="blocks the prefix cache holds (LRU)")
    p.add_argument("--max-concurrency", type=int, default=0, help="requests served at once, later ones queue "
                   "(FIFO); 0: no limit")
    a = p.parse_args(argv)
    try:
        cfg = StubConfig(a.ttft_ms / 1e3, a.tpot_ms / 1e3, a.tokens_per_chunk, a.model, a.fail_rate, a.seed,
                         kv_transfer_s=a.kv_transfer_ms / 1e3, tick_s=a.tick_ms / 1e3,
                         prefix_block_tokens=a.prefix_block_tokens, prefix_cache_blocks=a.prefix_cache_blocks,
                         kv_connector=a.kv_connector, max_concurrency=a.max_concurrency)
        run_server(cfg, a.host, a.port, cpu=a.cpu, loop=a.loop, port_file=a.port_file, server=a.server,
                   reuse_port=a.reuse_port)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
