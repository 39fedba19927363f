"""TCP ports for the servers splitbench starts: free now and outside the kernel's ephemeral range, so nothing else
is handed them before their server binds."""
from __future__ import annotations

import random
import socket
from pathlib import Path


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (ports it hands to bind(0) and outgoing connections)."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


LOWEST_PORT = 11024         # below the ephemeral range, picks start here (clear of the well-known and common ports)
_HANDED: set[int] = set()   # ports this process handed out: never the same one twice


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now and outside the ephemeral range, so no outgoing connection or bind(0) of
    another process takes it before its server binds it (a NIXL side channel binds ~60 s after the pick).
    Falls back to the OS's pick when no such port binds."""
    lo, hi = ephemeral_range()
    span = [(LOWEST_PORT, lo)] if lo > LOWEST_PORT else []
    span += [(hi + 1, 65536)] if hi < 65000 else []
    rng = random.Random()
    for _ in range(200 if span else 0):
        a, b = rng.choice(span)
        port = rng.randrange(a, b)
        if port in _HANDED:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
