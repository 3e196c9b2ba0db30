"""The three ways a client's bulk data reaches the worker (spec §2.14, §2.15, §4.5).

* ``InlineSource``: raw bytes on the connection (NARs of old clients);
* ``FramedSource``: length-prefixed frames ending with a zero frame;
* ``PullSource``: pieces the worker asks for with STDERR_READ (Nix 2.3).

Each offers ``read_some(max_n)`` and ``run(reader)`` (to drive a sans-IO
reader over the data), so op handlers treat them alike.  ``nar_chunks``
pulls exactly one NAR from a source, parsing as it goes so it never reads
a byte past the NAR's end (a NAR carries no length prefix).
Process: worker.
"""

from __future__ import annotations

from typing import Generator, Iterator

from nixwarden.shared import limits
from nixwarden.shared.errors import ClientProtocolError
from nixwarden.shared.nar import NarParser
from nixwarden.shared.wire import primitives as w
from nixwarden.shared.wire.ops import Stderr

PULL_SIZE = 32768  # what the C++ daemon asks for with STDERR_READ


class _Source:
    def read_some(self, max_n: int) -> bytes:
        raise NotImplementedError

    def run(self, reader: Generator[int, bytes, object]):
        """Drive a sans-IO reader with bytes from this source."""
        try:
            want = next(reader)
            while True:
                buf = bytearray()
                while len(buf) < want:
                    buf += self.read_some(want - len(buf))
                want = reader.send(bytes(buf))
        except StopIteration as done:
            return done.value


class InlineSource(_Source):
    def __init__(self, conn):
        self.conn = conn

    def read_some(self, max_n: int) -> bytes:
        return self.conn.read_some(max_n)


class FramedSource(_Source):
    """Bytes of a framed stream; ``drain`` consumes the rest up to the zero frame."""

    def __init__(self, conn):
        self.conn = conn
        self.left = 0
        self.finished = False

    def _next_frame(self) -> None:
        self.left = self.conn.read(w.u32())
        if self.left == 0:
            self.finished = True

    def read_some(self, max_n: int) -> bytes:
        while not self.left:
            if self.finished:
                raise ClientProtocolError("unexpected end of framed data")
            self._next_frame()
        data = self.conn.read_some(min(max_n, self.left))
        self.left -= len(data)
        return data

    def chunks(self) -> Iterator[bytes]:
        """Every remaining byte of the stream, as it arrives."""
        while True:
            while not self.left and not self.finished:
                self._next_frame()
            if self.finished:
                return
            yield self.read_some(limits.RECV_CHUNK)

    def drain(self) -> None:
        for _ in self.chunks():
            pass


class PullSource(_Source):
    """Data requested from the client with STDERR_READ; never over-reads."""

    def __init__(self, conn):
        self.conn = conn

    def read_some(self, max_n: int) -> bytes:
        want = min(max_n, PULL_SIZE)
        self.conn.write(w.w_u64(Stderr.READ) + w.w_u64(want))
        self.conn.flush()
        data = self.conn.read(w.raw_bytes(want))
        if not data:
            raise ClientProtocolError("unexpected end-of-file")
        return data


def nar_chunks(source: _Source) -> Iterator[bytes]:
    """Yield exactly one NAR's bytes from ``source``, checking its syntax."""
    parser = NarParser()
    while not parser.done:
        data = source.read_some(min(parser.wanted(), limits.RPC_CHUNK))
        parser.feed(data)
        yield data
