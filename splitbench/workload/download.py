"""One sha256-checked download: a temp file beside the target, renamed into place only when every check passed,
so a failed or tampered download leaves nothing behind (traces and SplitwiseSim's profile both use it)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from splitbench.errors import InputError


def download_checked(url: str, target: Path, *, timeout_s: float, must_match: str | None = None,
                     max_bytes: int | None = None, progress: Callable[[int, int | None], None] | None = None
                     ) -> tuple[str, int]:
    """Download url to target; returns (sha256 hex, bytes). must_match: that sha256 or InputError; a short read
    (Content-Length), more than max_bytes or any network error is an InputError too, and nothing is saved."""
    # imported here, not at the top: urllib.request and http.client cost ~25 ms of imports (measured on the
    # simulate path) and only a download uses them
    import http.client
    import urllib.error
    import urllib.request
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    h, nbytes = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            while chunk := resp.read(1 << 20):
                nbytes += len(chunk)
                if max_bytes is not None and nbytes > max_bytes:
                    raise InputError(f"download of {url} exceeds {max_bytes} bytes; nothing was saved")
                f.write(chunk)
                h.update(chunk)
                if progress:
                    progress(nbytes, total)
            f.flush()
            os.fsync(f.fileno())
        if total is not None and nbytes != total:
            raise InputError(f"download of {url} truncated: {nbytes} of {total} bytes; nothing was saved")
        if must_match is not None and h.hexdigest() != must_match:
            raise InputError(f"sha256 mismatch for {url}: got {h.hexdigest()}, expected {must_match}; "
                             "nothing was saved")
        os.replace(tmp, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise InputError(f"download of {url} failed: {e}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return h.hexdigest(), nbytes
