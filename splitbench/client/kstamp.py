"""Kernel-timestamped plain-TCP transport for the lean client: each read carries the time the kernel queued its last
byte (SO_TIMESTAMPNS), so chunk times do not include the client's own event-loop delay (a busy loop reads late,
but stamps stay true). Minimal asyncio.Transport surface over a non-blocking socket and loop.add_reader.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
from typing import Callable

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)   # Linux value when Python does not export it
_TS = struct.Struct("qq")
_READ_BYTES = 256 * 1024
_ANC_BYTES = socket.CMSG_SPACE(16) if hasattr(socket, "CMSG_SPACE") else 64
SUPPORTED = sys.platform.startswith("linux") and hasattr(socket.socket, "recvmsg")


class ClockMap:
    """Maps CLOCK_REALTIME (kernel socket stamps) onto `clock` (the run clock): offset = the best of a few
    paired readings, refreshed at most once a second so a wall-clock step is absorbed quickly."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.offset_s = 0.0
        self.next_sync = 0.0
        self.sync()

    def sync(self) -> None:
        best_gap, best = float("inf"), 0.0
        for _ in range(5):
            a = self.clock()
            w = time.time()
            b = self.clock()
            if b - a < best_gap:
                best_gap, best = b - a, w - (a + b) / 2
        self.offset_s = best
        self.next_sync = self.clock() + 1.0


class StampedTransport:
    """Calls protocol.data_received_at(data, stamp) per read, stamp on the run clock (never later than the read
    itself); connection_lost(exc) once. Writes go straight to the socket; a short write is buffered."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol, clock_map: ClockMap):
        self._loop, self._sock, self._proto, self._map = loop, sock, protocol, clock_map
        self._fd = sock.fileno()
        self._closing = False
        self._wbuf = bytearray()
        self._peer = sock.getpeername()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:   # without stamps every read is stamped when handled (the clock fallback in _read)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:
            pass
        loop.add_reader(self._fd, self._read)

    # --------------------------------------------------------------- reads
    def _read(self) -> None:
        try:
            data, anc, _, _ = self._sock.recvmsg(_READ_BYTES, _ANC_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(e)
            return
        if not data:
            self._lost(None)
            return
        m = self._map
        now = m.clock()
        if anc:
            sec, ns = _TS.unpack_from(anc[0][2])
            if now > m.next_sync:
                m.sync()
            k = sec + ns * 1e-9 - m.offset_s
            if k < now:
                now = k
        self._proto.data_received_at(data, now)
        c = self._proto.client
        if c.due <= m.clock() and c.on_due is not None:   # a send fell due during this burst of reads: now
            c.on_due()

    # --------------------------------------------------------------- writes
    def write(self, data: bytes) -> None:
        if self._closing:
            return
        if self._wbuf:
            self._wbuf += data
            return
        try:
            n = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._lost(e)
            return
        if n < len(data):
            self._wbuf += data[n:]
            self._loop.add_writer(self._fd, self._flush)

    def _flush(self) -> None:
        try:
            n = self._sock.send(self._wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(e)
            return
        del self._wbuf[:n]
        if not self._wbuf:
            self._loop.remove_writer(self._fd)

    def get_write_buffer_size(self) -> int:
        return len(self._wbuf)

    # --------------------------------------------------------------- lifecycle
    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default=None):
        return {"peername": self._peer, "socket": self._sock}.get(name, default)

    def close(self) -> None:
        self._lost(None)

    abort = close

    def _lost(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if self._wbuf:
            self._loop.remove_writer(self._fd)
        self._sock.close()
        self._loop.call_soon(self._proto.connection_lost, exc)


async def open_stamped(loop: asyncio.AbstractEventLoop, host: str, port: int, protocol_factory,
                       clock_map: ClockMap) -> tuple[StampedTransport, object]:
    """Connect a plain TCP socket and wrap it; returns (transport, protocol) like loop.create_connection."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    err: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except OSError as e:
            sock.close()
            err = e
            continue
        except BaseException:
            sock.close()
            raise
        protocol = protocol_factory()
        transport = StampedTransport(loop, sock, protocol, clock_map)
        protocol.connection_made(transport)
        return transport, protocol
    raise err or OSError(f"cannot resolve {host}:{port}")
