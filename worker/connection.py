"""The worker's byte-level connection to one Nix client.

Runs the sans-IO readers of ``nixwarden.shared.wire`` against the client's
socket (or stdin/stdout pipes): the only place a worker reads client bytes.
Output is buffered and written on ``flush``.  Process: worker.
"""

from __future__ import annotations

import os
from typing import Generator

from nixwarden.shared import limits
from nixwarden.shared.errors import ClientProtocolError
from nixwarden.shared.fdio import write_all


class ClientGone(Exception):
    """The client closed the connection at a request boundary."""


class ClientConnection:
    """Buffered reads and writes on the client's descriptors."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._in = b""  # received bytes; those before _pos are consumed
        self._pos = 0
        self._out = bytearray()

    def read(self, reader: Generator[int, bytes, object], *, at_boundary=False):
        """Drive ``reader`` with bytes from the client and return its value.

        Raises:
            ClientGone: end of input before the first byte, when
                ``at_boundary`` (a clean end of the session).
            ClientProtocolError: malformed input or end of input mid-item.
        """
        try:
            want = next(reader)
            while True:
                end = self._pos + want
                if len(self._in) < end:
                    self._fill(want, at_boundary)
                    end = want
                at_boundary = False
                chunk = self._in[self._pos:end]
                self._pos = end
                want = reader.send(chunk)
        except StopIteration as done:
            return done.value

    def _fill(self, want: int, at_boundary: bool) -> None:
        """Read until ``want`` unconsumed bytes are buffered (from ``_pos`` 0)."""
        have = len(self._in) - self._pos
        parts = [self._in[self._pos:]] if have else []
        while have < want:
            try:
                data = os.read(self.read_fd, limits.RECV_CHUNK)
            except ConnectionResetError:
                data = b""
            if not data:
                if at_boundary and not have:
                    raise ClientGone()
                raise ClientProtocolError("unexpected end-of-file")
            parts.append(data)
            have += len(data)
        self._in = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos = 0

    def read_some(self, max_n: int) -> memoryview:
        """Return between 1 and ``max_n`` bytes (buffered first), as a
        read-only view of the received bytes (bulk data is not copied).

        Raises:
            ClientProtocolError: end of input.
        """
        if self._pos == len(self._in):
            self._fill(1, False)
        data = memoryview(self._in)[self._pos:self._pos + max_n]
        self._pos += len(data)
        return data

    def write(self, data: bytes) -> None:
        self._out += data

    def flush(self) -> None:
        if self._out:
            data, self._out = self._out, bytearray()
            write_all(self.write_fd, data)

    def write_now(self, data: bytes) -> None:
        """Write ``data`` after whatever is buffered, without copying it."""
        self.flush()
        write_all(self.write_fd, data)
