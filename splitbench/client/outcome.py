"""How a request ended, in one place for every transport: an exception -> (status, message) by classify(), an HTTP
answer -> status by answer_status(); StreamError carries a status that a transport or the sink already knows."""
from __future__ import annotations

import asyncio
import sys

from splitbench.schema import records as R

try:
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import loads as _loads

ERROR_CHARS = 300          # error messages in records are cut to this length
ERROR_BODY_BYTES = 4096    # of an error answer's body, this much is kept to find its message

# the connection ended under a request that had been sent: its answer is cut short (and aiohttp's two such errors,
# _disconnected: looked up, not imported, so that the lean transport's users, the router, never load aiohttp)
_DISCONNECTS = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, asyncio.IncompleteReadError, EOFError)


def _disconnected(exc: BaseException) -> bool:
    if isinstance(exc, _DISCONNECTS):
        return True
    aiohttp = sys.modules.get("aiohttp")   # an aiohttp error exists only once aiohttp was imported
    return aiohttp is not None and isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError))


class StreamError(Exception):
    """A failed request; `status` is one of the records statuses."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def classify(exc: BaseException, timeout_s: float, idle_timeout_s: float) -> tuple[str, str]:
    """(record status, error message) of a request that ended with `exc`, whatever the transport: cancelled,
    a StreamError's own status, timeout, disconnected (the connection ended under it), else error."""
    if isinstance(exc, asyncio.CancelledError):
        return R.CANCELLED, "cancelled at shutdown"
    if isinstance(exc, StreamError):
        return exc.status, str(exc)[:ERROR_CHARS]
    if isinstance(exc, TimeoutError):   # asyncio's and aiohttp's timeouts are TimeoutErrors
        return R.TIMEOUT, f"no response within limits (total {timeout_s:g}s, idle {idle_timeout_s:g}s)"
    message = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
    if _disconnected(exc):
        return R.DISCONNECTED, message
    return R.ERROR, message


def answer_status(http_status: int, complete: bool = True) -> str:
    """The status of a request that got an HTTP answer: http_error unless 200; a 200 stream that ended without
    its end marker ([DONE]) was cut: disconnected."""
    if http_status != 200:
        return R.HTTP_ERROR
    return R.OK if complete else R.DISCONNECTED


def error_text(body: bytes) -> str:
    """The message of an OpenAI-style error body (or the body itself), shortened."""
    try:
        msg = _loads(body)
        err = msg.get("error", msg) if isinstance(msg, dict) else msg
        if isinstance(err, dict):
            err = err.get("message") or err
        return str(err)[:ERROR_CHARS]
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:ERROR_CHARS]
