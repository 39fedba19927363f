"""splitbench's error types and the one exit-code map the CLI uses: bad input 2, a server that could not start or
crashed 1 (not bad input), a run that lost a worker 3, interrupted 130; `exit_code(exc)` picks the code.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1        # an SLO missed, a gate regression, or a backend/server that could not start or crashed
EXIT_INPUT = 2         # bad input (trace, config, flag): one line naming file/line/field
EXIT_INCOMPLETE = 3    # a worker or replayer died: the records are incomplete
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT (128 + 2)


class SplitbenchError(Exception):
    """Base of the errors splitbench reports as one line (str()) and an exit code, never a traceback."""
    exit_code = EXIT_FAILED


class InputError(SplitbenchError):
    """Bad user input (trace, config, flag). str() is the one-line message shown to the user."""
    exit_code = EXIT_INPUT

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 column: str | None = None):
        loc = ":".join(str(p) for p in (file, line) if p is not None)
        col = f" column {column!r}" if column else ""
        prefix = f"{loc}:{col} " if loc else (f"{col.strip()}: " if col else "")
        super().__init__(f"{prefix}{message}".replace("\n", " "))
        self.file, self.line, self.column = file, line, column


class ServerStartError(SplitbenchError):
    """A backend's server (stub, vLLM, router, scraper) died or was not ready in time. The message carries the
    real cause on its first line and the server's log tail; it is not bad input."""
    exit_code = EXIT_FAILED


class IncompleteRunError(SplitbenchError):
    """A worker or replayer process died during the replay: what it had not reported is missing."""
    exit_code = EXIT_INCOMPLETE


def exit_code(exc: BaseException) -> int:
    """The process exit code for an exception that ended a command."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, SystemExit):
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_FAILED)
    if isinstance(exc, SplitbenchError):
        return exc.exit_code
    return EXIT_FAILED
