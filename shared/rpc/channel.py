"""Send and receive whole RPC frames on a connected stream socket.

The only module of ``nixwarden.shared`` that touches a socket.  It uses
plain ``sendall``/``recv_into`` and never asks for ancillary data, so no
file descriptor can arrive on an RPC channel (STYLE.md 1.6).
"""

from __future__ import annotations

import socket

from nixwarden.shared.errors import WorkerViolation
from nixwarden.shared.rpc import codec


class ChannelClosed(Exception):
    """The peer closed the channel at a frame boundary."""


class Channel:
    """One end of a worker<->session RPC connection."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, message) -> None:
        self.sock.sendall(codec.encode(message))

    def recv_frame(self) -> bytes:
        """Return the next frame's payload.

        Raises:
            ChannelClosed: clean end of stream before a frame.
            WorkerViolation: truncated frame or oversized header.
        """
        header = self._recv_exact(codec.HEADER.size, first=True)
        return self._recv_exact(codec.frame_length(header), first=False)

    def _recv_exact(self, n: int, *, first: bool) -> bytes:
        buf = bytearray(n) if n <= 1 << 20 else bytearray()
        if n > 1 << 20:
            return self._recv_growing(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                if first and got == 0:
                    raise ChannelClosed()
                raise WorkerViolation("RPC channel closed mid-frame")
            got += k
        return bytes(buf)

    def _recv_growing(self, n: int) -> bytes:
        # Large frames are accumulated as they arrive, never preallocated.
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(1 << 20, n - len(buf)))
            if not chunk:
                raise WorkerViolation("RPC channel closed mid-frame")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()
