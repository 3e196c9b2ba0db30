"""Nix base-32 ("nix32"): the encoding of store-path hash parts and of most
hashes Nix prints (spec/store-formats.md §2).

Pure functions, no state; used by every process.  This is *not* RFC 4648
base32: the input is read as one little-endian integer and written most
significant digit first, over an alphabet without ``e``, ``o``, ``t``, ``u``.
"""

import re

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"

_VALUE = {c: i for i, c in enumerate(ALPHABET)}
_DIGITS = re.compile(f"[{ALPHABET}]*")
# The same digit values in the alphabet ``int(text, 32)`` reads.
_AS_INT_DIGITS = str.maketrans(ALPHABET, "0123456789abcdefghijklmnopqrstuv")


def encoded_length(n_bytes: int) -> int:
    """Number of nix32 characters for ``n_bytes`` bytes (ceil(8n/5))."""
    if n_bytes < 0:
        raise ValueError("negative byte count")
    return (8 * n_bytes + 4) // 5


def _decoded_length(n_chars: int) -> int:
    """Number of bytes a valid nix32 string of ``n_chars`` characters holds."""
    return (5 * n_chars) // 8


def encode(data: bytes) -> str:
    """Encode ``data`` in nix32 (spec §2: little-endian integer, MSB first).

    Args:
        data: any bytes; the empty string encodes to "".
    Returns:
        ``encoded_length(len(data))`` characters.
    """
    length = encoded_length(len(data))
    value = int.from_bytes(data, "little")
    out = []
    for _ in range(length):
        out.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def decode(text: str) -> bytes:
    """Decode a nix32 string.

    The byte count is implied by the length; a length no byte count encodes
    to, a character outside the alphabet, or non-zero excess bits in the
    leading character are errors.

    Raises:
        ValueError: the text is not a canonical nix32 encoding.
    """
    n_bytes = _decoded_length(len(text))
    if encoded_length(n_bytes) != len(text):
        raise ValueError(f"invalid base-32 length {len(text)}")
    if not _DIGITS.fullmatch(text):
        bad = next(c for c in text if c not in _VALUE)
        raise ValueError(f"invalid character {bad!r} in base-32 string")
    value = int(text.translate(_AS_INT_DIGITS), 32) if text else 0
    if value >> (8 * n_bytes):
        raise ValueError("base-32 string has non-zero excess bits")
    return value.to_bytes(n_bytes, "little")


def is_valid(text: str, n_bytes: int) -> bool:
    """True iff ``text`` is the nix32 encoding of some ``n_bytes`` bytes."""
    if len(text) != encoded_length(n_bytes):
        return False
    try:
        decode(text)
    except ValueError:
        return False
    return True
