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
from nixwarden.shared.fdio import write_all, writev_all
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
    A frame larger than the buffer is read straight into a buffer of its
    size when that is at most ``PREALLOCATE`` bytes (a bulk data chunk);
    a larger one is accumulated as it arrives, so a lying header costs at
    most ``PREALLOCATE`` bytes ahead of the data.
    """

    RECV_SIZE = 64 * 1024  # below malloc's mmap threshold (see limits.RECV_CHUNK)
    BULK_READ = 1024 * 1024  # the largest single read of a large frame's rest
    #: A frame up to this size (bulk data chunks are ``limits.RPC_CHUNK``)
    #: is read into a buffer of its size allocated from its header.
    PREALLOCATE = 1024 * 1024

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
        write_all(self.write_fd, frame)

    def send_chunk(self, pieces: list) -> None:
        """Send one ``schema.Chunk`` whose data is ``pieces`` joined, written
        from where the pieces lie (no frame is assembled in memory)."""
        writev_all(self.write_fd, [codec.chunk_frame_head(sum(len(p) for p in pieces)),
                                   *pieces])

    def recv_frame(self, bulk: bool = False) -> bytes | memoryview:
        """Return the next frame's payload: bytes, or a read-only view of a
        buffer nothing changes after it is returned.

        Args:
            bulk: a large frame is likely (bulk data): read its header alone,
                so that the whole payload is read straight into its buffer.

        Raises:
            ChannelClosed: clean end of stream before a frame.
            WorkerViolation: truncated frame or oversized header.
        """
        header_size = codec.HEADER.size
        self._fill(header_size, first=True, exact=bulk)
        length = codec.frame_length(bytes(self._buf[:header_size]))
        end = header_size + length
        if len(self._buf) >= end:  # a small frame, whole in the buffer
            with memoryview(self._buf) as view:
                payload = bytes(view[header_size:end])
            del self._buf[:end]
            return payload
        if length <= self.PREALLOCATE:
            return memoryview(self._recv_rest_into(bytearray(length))).toreadonly()
        # A larger frame: read its rest in pieces as they arrive (nothing is
        # allocated ahead from a header that may lie), joined once.
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

    def _recv_rest_into(self, frame: bytearray) -> bytearray:
        """Fill ``frame`` with the buffered start of the current frame's
        payload, then read the rest straight into it (no copy to join)."""
        header_size = codec.HEADER.size
        have = len(self._buf) - header_size
        with memoryview(frame) as view:
            with memoryview(self._buf) as buffered:
                view[:have] = buffered[header_size:]
            self._buf.clear()
            while have < len(frame):
                n = os.readv(self.read_fd, [view[have:]])
                if not n:
                    raise WorkerViolation("RPC channel closed mid-frame")
                have += n
        return frame

    def peer_closed(self) -> bool:
        """After a selector found the channel readable: whether the peer
        closed it.  Bytes that did arrive are kept for ``recv_frame``."""
        chunk = os.read(self.read_fd, self.RECV_SIZE)
        self._buf += chunk
        return not chunk

    def _fill(self, n: int, *, first: bool, exact: bool = False) -> None:
        """Buffer at least ``n`` bytes; exactly ``n`` (no read-ahead) if ``exact``."""
        while len(self._buf) < n:
            want = n - len(self._buf) if exact else self.RECV_SIZE
            chunk = os.read(self.read_fd, want)
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
