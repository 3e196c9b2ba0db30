"""Hash algorithms and the text forms Nix gives hashes (spec/store-formats.md
§1, §3, §4).

Holds ``HashAlgo``, the ``Hash`` value type with its printers and its
length-inferring parser, ``HashSink`` for incremental hashing, and
``compress_hash`` (the XOR fold used for store-path digests).  Pure; used by
every process.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
from dataclasses import dataclass

from nixwarden.shared import base32


class HashAlgo(str, enum.Enum):
    """A hash algorithm Nix knows, valued by its (lower-case) name."""

    MD5 = "md5"
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA512 = "sha512"

    def __str__(self) -> str:
        return self.value

    @property
    def size(self) -> int:
        """Digest size in bytes."""
        return _SIZES[self]

    @classmethod
    def parse(cls, name: str) -> HashAlgo:
        """The algorithm called ``name`` (case-sensitive, as Nix).

        Raises:
            ValueError: unknown name.
        """
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown hash algorithm '{name}'") from None


_SIZES = {HashAlgo.MD5: 16, HashAlgo.SHA1: 20, HashAlgo.SHA256: 32, HashAlgo.SHA512: 64}

BASES = ("base16", "nix32", "base64")


def _base64_length(n_bytes: int) -> int:
    return 4 * ((n_bytes + 2) // 3)


@dataclass(frozen=True)
class Hash:
    """A digest together with its algorithm."""

    algo: HashAlgo
    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.algo, HashAlgo):
            raise TypeError("algo must be a HashAlgo")
        if len(self.digest) != self.algo.size:
            raise ValueError(f"digest of {len(self.digest)} bytes for {self.algo.value}")

    # --- printing -------------------------------------------------------------

    def to_base16(self) -> str:
        """Lower-case hex, no prefix."""
        return self.digest.hex()

    def to_nix32(self) -> str:
        """Nix base-32, no prefix."""
        return base32.encode(self.digest)

    def to_base64(self) -> str:
        """Standard padded base64, no prefix."""
        return base64.b64encode(self.digest).decode("ascii")

    def to_sri(self) -> str:
        """SRI form ``<algo>-<base64>``."""
        return f"{self.algo.value}-{self.to_base64()}"

    def to_prefixed(self, base: str = "nix32") -> str:
        """``<algo>:<digest>`` with the digest in ``base`` (see ``BASES``)."""
        return f"{self.algo.value}:{self.encode(base)}"

    def encode(self, base: str) -> str:
        """The digest alone in ``base`` ("base16", "nix32" or "base64")."""
        if base == "base16":
            return self.to_base16()
        if base == "nix32":
            return self.to_nix32()
        if base == "base64":
            return self.to_base64()
        raise ValueError(f"unknown hash encoding '{base}'")

    def __str__(self) -> str:
        return self.to_prefixed("nix32")

    # --- construction ---------------------------------------------------------

    @classmethod
    def compute(cls, algo: HashAlgo, data: bytes) -> Hash:
        """Hash ``data`` with ``algo``."""
        return cls(algo, hashlib.new(algo.value, data).digest())

    @classmethod
    def parse(cls, text: str, algo: HashAlgo | None = None) -> Hash:
        """Parse any textual hash Nix accepts (spec §3).

        Forms: ``<algo>:<base16|nix32|base64>``, SRI ``<algo>-<base64>``,
        or a bare digest when ``algo`` is given; the encoding of a digest
        is inferred from its length.  If both a prefix and ``algo`` are
        present they must agree.

        Raises:
            ValueError: with a Nix-like message.
        """
        colon, dash = text.find(":"), text.find("-")
        if colon < 0 and dash < 0:
            if algo is None:
                raise ValueError(
                    f"hash '{text}' does not include a type, "
                    "nor is the type otherwise known from context")
            return cls.parse_non_sri(text, algo)
        is_sri = colon < 0
        sep = dash if is_sri else colon
        found = HashAlgo.parse(text[:sep])
        if algo is not None and found is not algo:
            raise ValueError(f"hash '{text}' should have type '{algo.value}'")
        rest = text[sep + 1:]
        if is_sri:
            return cls._parse_sri_digest(text, rest, found)
        return cls.parse_non_sri(rest, found, whole=text)

    @classmethod
    def parse_non_sri(cls, digest: str, algo: HashAlgo, *, whole: str | None = None) -> Hash:
        """Parse a bare digest of ``algo`` in base16, nix32 or base64.

        ``whole`` is the full text, used only in error messages.

        Raises:
            ValueError: wrong length for ``algo`` or invalid characters.
        """
        whole = digest if whole is None else whole
        size = algo.size
        if len(digest) == 2 * size:
            return cls(algo, _decode_base16(digest, whole))
        if len(digest) == base32.encoded_length(size):
            try:
                return cls(algo, base32.decode(digest))
            except ValueError:
                raise ValueError(f"invalid base-32 hash '{whole}'") from None
        if len(digest) == _base64_length(size):
            return cls(algo, _decode_base64(digest, size, whole))
        raise ValueError(f"hash '{whole}' has wrong length for hash type '{algo.value}'")

    @classmethod
    def _parse_sri_digest(cls, whole: str, digest: str, algo: HashAlgo) -> Hash:
        if len(digest) != _base64_length(algo.size):
            raise ValueError(f"invalid SRI hash '{whole}'")
        return cls(algo, _decode_base64(digest, algo.size, whole, sri=True))


def _decode_base16(digest: str, whole: str) -> bytes:
    try:
        if not digest.isascii():
            raise ValueError
        return bytes.fromhex(digest)
    except ValueError:
        raise ValueError(f"invalid base-16 hash '{whole}'") from None


def _decode_base64(digest: str, size: int, whole: str, *, sri: bool = False) -> bytes:
    """Base64 with the standard alphabet and padding; exactly ``size`` bytes.

    Like Nix, unused low bits of the last character are ignored.
    """
    kind = "SRI" if sri else "base-64"
    try:
        raw = base64.b64decode(digest.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError(f"invalid {kind} hash '{whole}'") from None
    if len(raw) != size:
        raise ValueError(f"invalid {kind} hash '{whole}'")
    return raw


class HashSink:
    """Incremental hashing that also counts the bytes fed."""

    def __init__(self, algo: HashAlgo):
        self.algo = algo
        self.size = 0
        self._h = hashlib.new(algo.value)

    def update(self, data: bytes) -> None:
        """Hash ``data`` (any bytes-like object)."""
        self._h.update(data)
        self.size += len(data)

    def finish(self) -> Hash:
        """The hash of everything fed so far (the sink stays usable)."""
        return Hash(self.algo, self._h.digest())


def compress_hash(digest: bytes, size: int) -> bytes:
    """XOR-fold ``digest`` into ``size`` bytes (spec §4; not a truncation)."""
    if size <= 0:
        raise ValueError("compressed size must be positive")
    out = bytearray(size)
    for i, b in enumerate(digest):
        out[i % size] ^= b
    return bytes(out)
