"""Drivers that run the generator readers of ``primitives`` over bytes.

``WireDecoder`` is the incremental, push-style driver (h11's shape): feed
bytes, ask for the next item, get ``NEED_DATA`` until enough has arrived.
After any error it is poisoned and raises on every call (STYLE.md 2.1).
``decode_all`` runs a reader over one complete buffer, for tests and for
payloads that are already whole.
"""

from __future__ import annotations

from typing import Callable, Generator

from nixwarden.shared.errors import ClientProtocolError


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

ReaderFactory = Callable[[], Generator[int, bytes, object]]


class WireDecoder:
    """Decode a stream of items, each read by a fresh ``reader()``."""

    def __init__(self, reader: ReaderFactory):
        self._reader = reader
        self._buf = bytearray()
        self._gen: Generator | None = None
        self._want = 0
        self._eof = False
        self._error: Exception | None = None

    def feed(self, data: bytes) -> None:
        """Add bytes; ``b""`` marks the end of input."""
        self._check()
        if not data:
            self._eof = True
        self._buf += data

    def next(self):
        """Return the next decoded item, or ``NEED_DATA``.

        Raises:
            ClientProtocolError: malformed input, or input ended mid-item.
        """
        self._check()
        try:
            return self._step()
        except Exception as exc:
            self._error = exc
            raise

    def _step(self):
        if self._gen is None:
            if not self._buf:
                return NEED_DATA
            self._gen = self._reader()
            self._want = next(self._gen)
        while len(self._buf) >= self._want:
            chunk = bytes(self._buf[:self._want])
            del self._buf[:self._want]
            try:
                self._want = self._gen.send(chunk)
            except StopIteration as done:
                self._gen = None
                return done.value
        if self._eof:
            raise ClientProtocolError("unexpected end-of-file")
        return NEED_DATA

    def _check(self) -> None:
        if self._error is not None:
            raise ClientProtocolError(
                f"decoder unusable after earlier error: {self._error}")


def decode_all(reader: Generator[int, bytes, object], data: bytes,
               *, allow_trailing: bool = False):
    """Run one reader over a complete buffer and return its value.

    Raises:
        ClientProtocolError: malformed or truncated input, or (unless
            ``allow_trailing``) bytes left over.
    """
    pos = 0
    try:
        want = next(reader)
        while True:
            if pos + want > len(data):
                raise ClientProtocolError("unexpected end-of-file")
            chunk, pos = data[pos:pos + want], pos + want
            want = reader.send(chunk)
    except StopIteration as done:
        if pos != len(data) and not allow_trailing:
            raise ClientProtocolError(
                f"{len(data) - pos} bytes left after the end of the item") from None
        return done.value
