"""The real cause of a server start failure, found in its log: the most specific exception line of the last
tracebacks (the engine core's ModuleNotFoundError, not the API server's "Engine core initialization failed"),
argparse's error line, or a known failure message. Pure text functions; the launcher puts the line in its error.
"""
from __future__ import annotations

import re
from pathlib import Path

MAX_CAUSE_CHARS = 400
# Threads whose death leaves a starting server alive and never healthy (vLLM's NIXL scheduler waits for its
# handshake listener to bind): such a death ends the start at once instead of after the whole timeout.
_STARTUP_THREADS = ("nixl_handshake_listener",)
_THREAD_DIED = re.compile(r"Exception in thread (\S+?):?\s*$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "(EngineCore_DP0 pid=123) ", "(APIServer pid=7) ", "(VllmWorker TP0 pid=9) ": the process of a vLLM log line
_PROCESS = re.compile(r"^\((?:[\w.-]+ )*pid=\d+\) ")
# vLLM's logger: "ERROR 08-19 13:12:57 [core.py:708] " (level, date, time, [file:line])
_LOGGER = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[[^\]]*\] ")
_TRACEBACK_END = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?::.*)?$")      # "pkg.mod.SomeError: message"
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*\w*(?:Error|Exception)\b(?::.*)?$")
_ARGPARSE = re.compile(r"^[\w. -]+?: error: .+$")                      # "api_server.py: error: unrecognized ..."
# Messages that only say something failed elsewhere: the cause is in another traceback.
_GENERIC = re.compile(r"Engine core initialization failed|EngineCore failed to start|Engine process failed to start"
                      r"|WorkerProc initialization failed|See root cause|see stack trace above"
                      r"|^(?:SystemExit|KeyboardInterrupt)\b", re.IGNORECASE)
# Causes worth naming even when a later exception wraps them; an earlier tier wins over a later one.
_KNOWN = (re.compile(r"OutOfMemoryError|out of memory", re.IGNORECASE),
          re.compile(r"^(?:ModuleNotFoundError|ImportError)\b"),
          re.compile(r"error: (?:unrecognized arguments|argument )"),
          re.compile(r"KV cache|cache blocks|memory utilization|gpu_memory_utilization|max seq len", re.IGNORECASE),
          re.compile(r"CUDA error|CUDA driver|NCCL|No CUDA GPUs|NVIDIA driver", re.IGNORECASE))


def _split(line: str) -> tuple[str, str]:
    """(process prefix, text) of a log line: no ANSI colours, no vLLM process or logger prefix."""
    line = _ANSI.sub("", line.rstrip("\r\n"))
    m = _PROCESS.match(line)
    proc = m.group(0) if m else ""
    return proc, _LOGGER.sub("", line[len(proc):])


def _candidates(lines: list[tuple[str, str]]) -> list[str]:
    """Final exception line of every traceback (followed per process: their lines interleave) and argparse
    error lines, in log order."""
    out: list[str] = []
    in_traceback: set[str] = set()
    for proc, line in lines:
        if line.startswith("Traceback (most recent call last):"):
            in_traceback.add(proc)
        elif proc in in_traceback:
            if line.strip() and line[0] not in " \t":          # not a frame, source line or ^^^^ marker
                in_traceback.discard(proc)
                if _TRACEBACK_END.match(line):
                    out.append(line.strip())
        elif _ARGPARSE.match(line):
            out.append(line.strip())
    return out


def failure_cause(text: str) -> str | None:
    """The one line of `text` (a server log) that best names why the server failed; None if none does.

    Known causes (CUDA OOM, a missing module, an argparse error, KV-cache memory, CUDA/NCCL errors) win over other
    exception lines, generic wrappers ("Engine core initialization failed") lose to any other; ties: the last."""
    lines = [_split(x) for x in text.splitlines()]
    found = _candidates(lines)
    if not found:   # no traceback: an exception line anywhere (e.g. one the logger printed alone)
        found = [x.strip() for _, x in lines if _EXCEPTION.match(x.strip())]
    specific = [c for c in found if not _GENERIC.search(c)]
    for pattern in _KNOWN:
        hits = [c for c in specific if pattern.search(c)]
        if hits:
            return _shorten(hits[-1])
    best = specific or found
    return _shorten(best[-1]) if best else None


def _shorten(line: str) -> str:
    return line if len(line) <= MAX_CAUSE_CHARS else line[:MAX_CAUSE_CHARS - 3] + "..."


def log_failure_cause(path: str | Path, max_bytes: int = 1 << 20) -> str | None:
    """failure_cause() of the last max_bytes of a log file; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - max_bytes))
            return failure_cause(f.read().decode("utf-8", "replace"))
    except OSError:
        return None


def start_hang_cause(text: str) -> str | None:
    """If `text` (new lines of a starting server's log) shows a thread the start waits on dying, the line naming
    why (e.g. "zmq.error.ZMQError: Address already in use"); None otherwise."""
    lines = text.splitlines()
    for k, line in enumerate(lines):
        m = _THREAD_DIED.search(line)
        if m and m.group(1) in _STARTUP_THREADS:
            cause = failure_cause("\n".join(lines[k:]))
            return f"thread {m.group(1)} died: {cause or 'see the log'}"
    return None
