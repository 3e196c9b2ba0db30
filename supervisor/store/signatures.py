"""Ed25519 signing keys and store-path signatures (spec/store-formats.md §15;
Nix 2.8 ``crypto.cc`` and ``ValidPathInfo::fingerprint``/``checkSignatures``).

Holds the key types (``SecretKey``, ``PublicKey``) with their text forms
``<name>:<base64>``, the path fingerprint, signing, verification, counting
the valid signatures of a path, and loading the trusted keys from the
``trusted-public-keys`` and ``secret-key-files`` settings.

Runs in the supervisor process (signing and trust decisions are never made
in a worker).

Trust: key texts and key files come from the administrator's configuration;
a malformed one is an error (``StoreRefusal`` with Nix's message).
Signatures, paths, hashes and references come from clients, substituters or
other stores and are untrusted: a signature is accepted only if its key
name is among the trusted keys and the 64-byte Ed25519 signature verifies
over the fingerprint this module computes itself.  Anything malformed in a
signature makes it invalid, never an error.  Secret key bytes are never
shown in a repr.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey, Ed25519PublicKey)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from nixwarden.shared import limits
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.hashes import Hash

#: libsodium sizes: secret key (seed + public key), public key, signature.
SECRET_KEY_BYTES = 64
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}


class _BadBase64(ValueError):
    pass


def _b64decode(text: str) -> bytes:
    """Base64 as Nix 2.8 reads it: stops at the first ``=``, skips newlines.

    Raises:
        _BadBase64: a character outside the alphabet.
    """
    out = bytearray()
    acc = bits = 0
    for c in text:
        if c == "=":
            break
        if c == "\n":
            continue
        digit = _B64_VALUE.get(c)
        if digit is None:
            raise _BadBase64(f"invalid character in Base64 string: '{c}'")
        acc = (acc << 6 | digit) & 0xFFFF
        bits += 6
        if bits >= 8:
            bits -= 8
            out.append(acc >> bits & 0xFF)
    return bytes(out)


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _split(text: str) -> tuple[str, str]:
    """Split ``name:rest`` at the first colon; ("", "") if no name."""
    name, sep, rest = text.partition(":")
    return (name, rest) if sep and name else ("", "")


def _parse_key(text: str, size: int, kind: str) -> tuple[str, bytes]:
    name, b64 = _split(text.strip())
    if not name or not b64:
        raise StoreRefusal("secret key is corrupt")
    try:
        key = _b64decode(b64)
    except _BadBase64 as e:
        raise StoreRefusal(str(e)) from None
    if len(key) != size:
        raise StoreRefusal(f"{kind} key is not valid")
    return name, key


@dataclass(frozen=True)
class PublicKey:
    """A named Ed25519 public key (``<name>:<base64 of 32 bytes>``)."""

    name: str
    key: bytes

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name or len(self.key) != PUBLIC_KEY_BYTES:
            raise ValueError("public key is not valid")

    def to_text(self) -> str:
        """The ``trusted-public-keys`` form."""
        return f"{self.name}:{_b64encode(self.key)}"


@dataclass(frozen=True)
class SecretKey:
    """A named Ed25519 secret key: libsodium's 32-byte seed + 32-byte public key."""

    name: str
    seed_and_pub: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name or len(self.seed_and_pub) != SECRET_KEY_BYTES:
            raise ValueError("secret key is not valid")

    def to_text(self) -> str:
        """The key-file form (as ``nix-store --generate-binary-cache-key``)."""
        return f"{self.name}:{_b64encode(self.seed_and_pub)}"


def _derived_public(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def parse_secret_key(text: str) -> SecretKey:
    """Parse a secret key file's contents (surrounding whitespace ignored).

    Stricter than Nix 2.8: the public half stored in the key must be the one
    its seed gives (libsodium would sign with the stored one).

    Raises:
        StoreRefusal: "secret key is corrupt" (no name or key),
            "secret key is not valid" (wrong size or inconsistent halves),
            or an invalid base64 character.
    """
    name, key = _parse_key(text, SECRET_KEY_BYTES, "secret")
    if _derived_public(key[:32]) != key[32:]:
        raise StoreRefusal("secret key is not valid")
    return SecretKey(name, key)


def parse_public_key(text: str) -> PublicKey:
    """Parse a ``trusted-public-keys`` entry or public key file.

    Raises:
        StoreRefusal: "secret key is corrupt" (Nix 2.8 says so for public
            keys too), "public key is not valid", or bad base64.
    """
    name, key = _parse_key(text, PUBLIC_KEY_BYTES, "public")
    return PublicKey(name, key)


def public_key_of(secret: SecretKey) -> PublicKey:
    """The public half of ``secret``, under the same name."""
    return PublicKey(secret.name, secret.seed_and_pub[32:])


def fingerprint(path_full: str, nar_hash: Hash, nar_size: int,
                references_full: Iterable[str]) -> str:
    """The text a path signature signs (spec §15.2).

    ``1;<path>;<algo>:<nix32 NAR hash>;<NAR size>;<sorted refs, comma-joined>``.

    Raises:
        StoreRefusal: ``nar_size`` is 0 (unknown), as in Nix.
    """
    if nar_size == 0:
        raise StoreRefusal(
            f"cannot calculate fingerprint of path '{path_full}' because its size is not known")
    refs = ",".join(sorted(set(references_full)))
    return f"1;{path_full};{nar_hash.to_prefixed('nix32')};{nar_size};{refs}"


def sign(secret: SecretKey, fingerprint: str) -> str:
    """Sign ``fingerprint``: ``<key name>:<base64 of the 64-byte signature>``."""
    key = Ed25519PrivateKey.from_private_bytes(secret.seed_and_pub[:32])
    return f"{secret.name}:{_b64encode(key.sign(fingerprint.encode()))}"


def verify(fingerprint: str, sig_text: str, keys: Mapping[str, PublicKey]) -> bool:
    """True iff ``sig_text`` is a valid signature of ``fingerprint`` by a key in ``keys``.

    An unknown key name or a signature that does not verify gives False.

    Raises:
        StoreRefusal: a signature by a trusted key name that is not Base64
            or not 64 bytes long.  As Nix 2.8's ``verifyDetached`` throws
            there, this aborts what asked (a substitution, an addition)
            instead of trying the next signature or cache.
    """
    name, b64 = _split(sig_text)
    key = keys.get(name)
    if key is None:
        return False
    try:
        sig = _b64decode(b64)
    except _BadBase64 as e:
        raise StoreRefusal(str(e)) from None
    if len(sig) != SIGNATURE_BYTES:
        raise StoreRefusal("signature is not valid")
    try:
        Ed25519PublicKey.from_public_bytes(key.key).verify(sig, fingerprint.encode())
    except (InvalidSignature, ValueError):
        return False
    return True


def check_path_sigs(path_full: str, nar_hash: Hash, nar_size: int,
                    references: Iterable[str], sigs: Iterable[str],
                    keys: Mapping[str, PublicKey]) -> int:
    """How many distinct signatures of a path verify with ``keys``.

    Content-addressed paths need no signature; that check belongs to the
    caller (spec §15.2).

    Raises:
        StoreRefusal: ``nar_size`` is 0 (see ``fingerprint``).
    """
    fp = fingerprint(path_full, nar_hash, nar_size, references)
    return sum(1 for sig in set(sigs) if verify(fp, sig, keys))


def _read_key_file(path: str) -> str:
    """Contents of a key file, at most ``limits.MAX_KEY_FILE`` bytes.

    Raises:
        OSError: the file cannot be opened or read.
        StoreRefusal: the file is larger than the cap.
    """
    with open(path, "rb") as f:
        data = f.read(limits.MAX_KEY_FILE + 1)
    if len(data) > limits.MAX_KEY_FILE:
        raise StoreRefusal("secret key is corrupt")
    return data.decode("utf-8", "replace")


def load_public_keys(trusted_public_keys: Iterable[str], secret_key_files: Iterable[str],
                     *, ignore_unreadable: bool = True) -> dict[str, PublicKey]:
    """The trusted keys by name, as Nix 2.8's ``getDefaultPublicKeys``.

    ``trusted-public-keys`` entries first, then the public halves of the
    ``secret-key-files``; for a repeated name the first key wins.

    Args:
        trusted_public_keys: ``<name>:<base64>`` texts.
        secret_key_files: paths of secret key files.
        ignore_unreadable: skip key files that cannot be read, as Nix
            does ("normal in a multi-user installation"); if False, such
            a file is an error "opening file '<path>': <reason>".
    Raises:
        StoreRefusal: a malformed key (text or file contents), or an
            unreadable file when ``ignore_unreadable`` is False.
    """
    keys: dict[str, PublicKey] = {}
    for text in trusted_public_keys:
        key = parse_public_key(text)
        keys.setdefault(key.name, key)
    for path in secret_key_files:
        try:
            text = _read_key_file(path)
        except OSError as e:
            if ignore_unreadable:
                continue
            raise StoreRefusal(f"opening file '{path}': {e.strerror}") from None
        key = public_key_of(parse_secret_key(text))
        keys.setdefault(key.name, key)
    return keys
