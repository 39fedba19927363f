"""User-facing input errors: one line naming file, line and field; the CLI maps them to exit code 2."""
from __future__ import annotations


class InputError(Exception):
    """Bad user input (trace, config, flag). str() is the one-line message shown to the user."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 column: str | None = None):
        loc = ":".join(str(p) for p in (file, line) if p is not None)
        col = f" column {column!r}" if column else ""
        prefix = f"{loc}:{col} " if loc else (f"{col.strip()}: " if col else "")
        super().__init__(f"{prefix}{message}".replace("\n", " "))
        self.file, self.line, self.column = file, line, column
