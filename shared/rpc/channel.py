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
    """One end of a worker<->session RPC connection.

    Reads are buffered: one ``recv`` usually brings a whole small frame
    (header and payload), so a request costs one system call per side.
    A frame larger than the buffer is accumulated as it arrives, never
    allocated ahead from its header.
    """

    RECV_SIZE = 64 * 1024  # below malloc's mmap threshold (see limits.RECV_CHUNK)

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()

    def send(self, message) -> None:
        self.sock.sendall(codec.encode(message))

    def recv_frame(self) -> bytes:
        """Return the next frame's payload.

        Raises:
            ChannelClosed: clean end of stream before a frame.
            WorkerViolation: truncated frame or oversized header.
        """
        header_size = codec.HEADER.size
        self._fill(header_size, first=True)
        length = codec.frame_length(bytes(self._buf[:header_size]))
        self._fill(header_size + length, first=False)
        payload = bytes(self._buf[header_size:header_size + length])
        del self._buf[:header_size + length]
        return payload

    def _fill(self, n: int, *, first: bool) -> None:
        while len(self._buf) < n:
            chunk = self.sock.recv(self.RECV_SIZE)
            if not chunk:
                if first and not self._buf:
                    raise ChannelClosed()
                raise WorkerViolation("RPC channel closed mid-frame")
            self._buf += chunk

    def close(self) -> None:
        self.sock.close()
