"""Wire primitives of the Nix worker protocol, sans-IO (spec worker-protocol §2).

Readers are generators: each ``yield n`` asks the driver for exactly ``n``
more bytes and receives them; the generator's return value is the decoded
item.  They compose with ``yield from`` and never see a socket, so the same
reader runs over a whole buffer, over one byte at a time, or over a live
connection (``worker/server.py`` is that edge).  Every length is checked
against a limit before any byte of it is requested, and a declared length
is never allocated ahead of the bytes that arrive (the driver accumulates
what comes).

Writers are plain functions returning bytes.
"""

from __future__ import annotations

import struct
from typing import Generator, Iterable

from nixwarden.shared import limits
from nixwarden.shared.errors import ClientProtocolError

Reader = Generator[int, bytes, object]

_U64 = struct.Struct("<Q")
_ZERO_PAD = bytes(8)
_SMALL_STRING = 4096  # read with its padding at once (copied once more to drop it)


def u64() -> Generator[int, bytes, int]:
    """Read one little-endian u64."""
    data = yield 8
    return _U64.unpack(data)[0]


def u32() -> Generator[int, bytes, int]:
    """Read a u64 that CppNix reads into an ``unsigned int``."""
    value = _U64.unpack((yield 8))[0]
    if value > 0xFFFFFFFF:
        raise ClientProtocolError(
            f"serialised integer {value} is too large for type 'j'")
    return value


def u8() -> Generator[int, bytes, int]:
    """Read a u64 that CppNix reads into a ``uint8_t``."""
    value = yield from u64()
    if value > 0xFF:
        raise ClientProtocolError(
            f"serialised integer {value} is too large for type 'h'")
    return value


def boolean() -> Generator[int, bytes, bool]:
    """Read a bool: any non-zero value is true (spec §2.2)."""
    return (yield from u64()) != 0


def padding(length: int) -> Generator[int, bytes, None]:
    """Read and check the zero padding after a string of ``length`` bytes."""
    pad = (8 - length % 8) % 8
    if pad:
        _check_zeros((yield pad))


def _check_zeros(pad: bytes) -> None:
    if pad != _ZERO_PAD[:len(pad)]:
        raise ClientProtocolError("non-zero padding")


def raw_bytes(max_len: int = limits.MAX_STRING) -> Generator[int, bytes, bytes]:
    """Read a length-prefixed, zero-padded byte string of at most ``max_len``."""
    length = _U64.unpack((yield 8))[0]
    if length > max_len:
        raise ClientProtocolError(
            f"string of {length} bytes exceeds the limit of {max_len}")
    pad = -length % 8
    if length <= _SMALL_STRING and pad:  # data and padding in one piece
        data = yield length + pad
        _check_zeros(data[length:])
        return data[:length]
    data = (yield length) if length else b""
    yield from padding(length)
    return data


def string(max_len: int = limits.MAX_STRING) -> Generator[int, bytes, str]:
    """Read a protocol string as text (UTF-8; undecodable bytes are escaped)."""
    data = yield from raw_bytes(max_len)
    return data.decode("utf-8", "surrogateescape")


def count(max_items: int = limits.MAX_LIST_ITEMS) -> Generator[int, bytes, int]:
    """Read a collection's element count, bounded by ``max_items``."""
    n = yield from u64()
    if n > max_items:
        raise ClientProtocolError(
            f"collection of {n} elements exceeds the limit of {max_items}")
    return n


def strings(max_items: int = limits.MAX_LIST_ITEMS,
            max_len: int = limits.MAX_STRING) -> Generator[int, bytes, list[str]]:
    """Read a list (or set) of strings."""
    n = yield from count(max_items)
    out = []
    for _ in range(n):
        out.append((yield from string(max_len)))
    return out


def string_pairs(max_items: int = limits.MAX_LIST_ITEMS,
                 max_len: int = limits.MAX_STRING
                 ) -> Generator[int, bytes, list[tuple[str, str]]]:
    """Read a map of string to string as an ordered list of pairs."""
    n = yield from count(max_items)
    out = []
    for _ in range(n):
        key = yield from string(max_len)
        out.append((key, (yield from string(max_len))))
    return out


# --- writers -------------------------------------------------------------------

def w_u64(value: int) -> bytes:
    """Encode one u64."""
    return _U64.pack(value)


def w_bool(value: bool) -> bytes:
    """Encode a bool as 0 or 1."""
    return _U64.pack(1 if value else 0)


def w_bytes(data: bytes) -> bytes:
    """Encode a byte string with its length and zero padding."""
    return _U64.pack(len(data)) + data + _ZERO_PAD[:(8 - len(data) % 8) % 8]


def w_str(text: str) -> bytes:
    """Encode text as a protocol string."""
    return w_bytes(text.encode("utf-8", "surrogateescape"))


def w_strings(items: Iterable[str]) -> bytes:
    """Encode a list of strings (the caller decides the order)."""
    items = list(items)
    return _U64.pack(len(items)) + b"".join(w_str(s) for s in items)


def w_string_set(items: Iterable[str]) -> bytes:
    """Encode a set of strings in CppNix's (byte-wise sorted) order."""
    return w_strings(sorted(set(items), key=lambda s: s.encode("utf-8", "surrogateescape")))


def w_string_map(pairs: dict[str, str]) -> bytes:
    """Encode a map of string to string, sorted by key as CppNix writes it."""
    keys = sorted(pairs)
    return _U64.pack(len(keys)) + b"".join(w_str(k) + w_str(pairs[k]) for k in keys)
