"""Send and receive whole RPC frames over a pair of pipes.

The only module of ``nixwarden.shared`` that touches the RPC descriptors.
A channel is two pipes, one per direction: plain ``read``/``write`` on
them can carry no file descriptor (STYLE.md 1.6), and, unlike a stream
socketpair, reading a request does not wake the peer that waits for its
reply (a socket's single wait queue wakes readers on every freed buffer),
which halves the wake-ups of a round trip.
"""

from __future__ import annotations

import fcntl
import os

from nixwarden.shared.errors import WorkerViolation
from nixwarden.shared.rpc import codec

#: Pipe capacity asked for (the default is 64 KiB): about a stream
#: socketpair's buffer, so an upload's chunks and the session's in-band log
#: lines rarely wait on each other.  Best effort: an unprivileged daemon
#: over its pipe-buffer quota keeps the default.
PIPE_SIZE = 256 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class ChannelClosed(Exception):
    """The peer closed the channel at a frame boundary."""


def open_pipes() -> tuple[tuple[int, int], tuple[int, int]]:
    """Make the two pipes of one channel.

    Returns ``(session_ends, worker_ends)``, each ``(read_fd, write_fd)``;
    all four descriptors are close-on-exec and the caller owns them.
    """
    req_r, req_w = os.pipe2(os.O_CLOEXEC)
    rep_r, rep_w = os.pipe2(os.O_CLOEXEC)
    for fd in (req_w, rep_w):
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
    return (req_r, rep_w), (rep_r, req_w)


class Channel:
    """One end of a worker<->session RPC connection.

    Reads are buffered: one ``read`` usually brings a whole small frame
    (header and payload), so a request costs one system call per side.
    A frame larger than the buffer is accumulated as it arrives, never
    allocated ahead from its header.
    """

    RECV_SIZE = 64 * 1024  # below malloc's mmap threshold (see limits.RECV_CHUNK)
    BULK_READ = 1024 * 1024  # the largest single read of a large frame's rest

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._buf = bytearray()

    def fileno(self) -> int:
        """The descriptor to wait on for incoming frames (for selectors)."""
        return self.read_fd

    def send(self, message) -> None:
        self.send_frame(codec.encode(message))

    def send_frame(self, frame: bytes) -> None:
        """Write one already encoded frame (``codec.encode``)."""
        with memoryview(frame) as view:
            while view:
                view = view[os.write(self.write_fd, view):]

    def recv_frame(self) -> bytes:
        """Return the next frame's payload.

        Raises:
            ChannelClosed: clean end of stream before a frame.
            WorkerViolation: truncated frame or oversized header.
        """
        header_size = codec.HEADER.size
        self._fill(header_size, first=True)
        length = codec.frame_length(bytes(self._buf[:header_size]))
        end = header_size + length
        if len(self._buf) >= end:  # a small frame, whole in the buffer
            payload = bytes(self._buf[header_size:end])
            del self._buf[:end]
            return payload
        # A large frame (bulk data): read exactly its rest, in pieces as they
        # arrive (nothing allocated ahead from the header), joined once.
        parts = [bytes(self._buf[header_size:])]
        have = len(parts[0])
        self._buf.clear()
        while have < length:
            chunk = os.read(self.read_fd, min(length - have, self.BULK_READ))
            if not chunk:
                raise WorkerViolation("RPC channel closed mid-frame")
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)

    def peer_closed(self) -> bool:
        """After a selector found the channel readable: whether the peer
        closed it.  Bytes that did arrive are kept for ``recv_frame``."""
        chunk = os.read(self.read_fd, self.RECV_SIZE)
        self._buf += chunk
        return not chunk

    def _fill(self, n: int, *, first: bool) -> None:
        while len(self._buf) < n:
            chunk = os.read(self.read_fd, self.RECV_SIZE)
            if not chunk:
                if first and not self._buf:
                    raise ChannelClosed()
                raise WorkerViolation("RPC channel closed mid-frame")
            self._buf += chunk

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
