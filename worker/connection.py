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


class ClientGone(Exception):
    """The client closed the connection at a request boundary."""


class ClientConnection:
    """Buffered reads and writes on the client's descriptors."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._in = bytearray()
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
                if len(self._in) < want:
                    self._fill(want, at_boundary)
                at_boundary = False
                chunk = bytes(self._in[:want])
                del self._in[:want]
                want = reader.send(chunk)
        except StopIteration as done:
            return done.value

    def _fill(self, want: int, at_boundary: bool) -> None:
        while len(self._in) < want:
            try:
                data = os.read(self.read_fd, limits.RECV_CHUNK)
            except ConnectionResetError:
                data = b""
            if not data:
                if at_boundary and not self._in:
                    raise ClientGone()
                raise ClientProtocolError("unexpected end-of-file")
            self._in += data

    def read_some(self, max_n: int) -> bytes:
        """Return between 1 and ``max_n`` bytes (buffered first).

        Raises:
            ClientProtocolError: end of input.
        """
        if not self._in:
            self._fill(1, False)
        data = bytes(self._in[:max_n])
        del self._in[:max_n]
        return data

    def read_pieces(self, n: int, piece: int = limits.RECV_CHUNK):
        """Yield exactly ``n`` bytes in pieces of at most ``piece`` bytes."""
        while n:
            data = self.read_some(min(n, piece))
            n -= len(data)
            yield data

    def write(self, data: bytes) -> None:
        self._out += data

    def flush(self) -> None:
        if self._out:
            data, self._out = self._out, bytearray()
            self._write_all(data)

    def write_now(self, data: bytes) -> None:
        """Write ``data`` after whatever is buffered, without copying it."""
        self.flush()
        self._write_all(data)

    def _write_all(self, data) -> None:
        with memoryview(data) as view:
            while view:
                n = os.write(self.write_fd, view)
                view = view[n:]
