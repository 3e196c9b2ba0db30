"""Store paths and content addresses (spec/store-formats.md §5-§7).

Holds the ``StorePath`` value type (validated base names), ``StoreDir``
(parsing and printing full paths under one logical store directory, and
computing store paths the way ``makeStorePath`` does), and the
``ContentAddress`` / ``ContentAddressMethod`` text forms.  Pure; used by
every process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from nixwarden.shared import base32
from nixwarden.shared.hashes import Hash, HashAlgo, compress_hash

#: Characters of a store-path hash part (a 20-byte digest in nix32).
HASH_PART_LEN = 32

#: Longest store-path name (spec §5).
MAX_NAME_LEN = 211

_NAME_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=")
_HASH_CHARS = frozenset(base32.ALPHABET)

#: ``<hash>-<name>`` as it almost always arrives: every character legal and
#: nothing for canonicalisation to do.  Only the ``.``/``..`` name rules
#: (``_is_dot_name``) are left to check after a match.
_PLAIN_BASE = (f"([{re.escape(base32.ALPHABET)}]{{{HASH_PART_LEN}}})"
               f"-([{re.escape(''.join(sorted(_NAME_CHARS)))}]{{1,{MAX_NAME_LEN}}})")


class BadStorePath(ValueError):
    """Text that is not a valid store path (message as Nix words it)."""


def check_name(name: str, what: str) -> None:
    """Validate a store-path name (spec §5, the post-2.20 rules).

    Args:
        name: the part after ``<hash>-``.
        what: the full text being checked, for messages.
    Raises:
        BadStorePath: the name is empty, too long, has an illegal
            character, or is ``.``/``..`` or starts with ``.-``/``..-``.
    """
    if not name:
        raise BadStorePath(f"store path '{what}' has an empty name")
    if len(name) > MAX_NAME_LEN:
        raise BadStorePath(
            f"store path '{what}' has a name longer than {MAX_NAME_LEN} characters")
    for c in name:
        if c not in _NAME_CHARS:
            raise BadStorePath(f"store path '{what}' contains illegal character '{c}'")
    if _is_dot_name(name):
        raise BadStorePath(f"store path '{what}' has invalid name '{name}'")


def _is_dot_name(name: str) -> bool:
    """``.``, ``..``, or starting with ``.-``/``..-``: names Nix refuses."""
    return name[0] == "." and (name in (".", "..") or name.startswith((".-", "..-")))


def _check_hash_part(hash_part: str, what: str) -> None:
    if len(hash_part) != HASH_PART_LEN:
        raise BadStorePath(f"store path '{what}' has a hash part of the wrong length")
    for c in hash_part:
        if c not in _HASH_CHARS:
            raise BadStorePath(
                f"store path '{what}' contains illegal base-32 character '{c}'")


@dataclass(frozen=True, slots=True, order=True)
class StorePath:
    """A store path without its store directory: ``<hash_part>-<name>``.

    Validated when built; ordering is bytewise by base name (spec §5),
    which the field order gives because both fields are ASCII and the hash
    part has a fixed length.
    """

    hash_part: str
    name: str

    def __post_init__(self) -> None:
        what = f"{self.hash_part}-{self.name}"
        _check_hash_part(self.hash_part, what)
        check_name(self.name, what)

    @property
    def base(self) -> str:
        """The base name ``<hash>-<name>``."""
        return f"{self.hash_part}-{self.name}"

    @property
    def is_derivation(self) -> bool:
        """True for ``.drv`` paths."""
        return self.name.endswith(".drv")

    @classmethod
    def from_base(cls, base: str) -> StorePath:
        """Parse a base name ``<32 nix32 chars>-<name>``.

        Raises:
            BadStorePath: any rule of spec §5 broken.
        """
        if len(base) < HASH_PART_LEN + 1:
            raise BadStorePath(f"'{base}' is too short to be a valid store path")
        if base[HASH_PART_LEN] != "-":
            raise BadStorePath(f"store path '{base}' lacks a '-' after the hash part")
        return cls(base[:HASH_PART_LEN], base[HASH_PART_LEN + 1:])

    @classmethod
    def _checked(cls, hash_part: str, name: str) -> StorePath:
        """Build from parts that a caller has already validated in full."""
        sp = object.__new__(cls)
        object.__setattr__(sp, "hash_part", hash_part)
        object.__setattr__(sp, "name", name)
        return sp

    def full(self, store_dir: str) -> str:
        """The full path under ``store_dir``."""
        return f"{store_dir.rstrip('/')}/{self.base}"

    def __str__(self) -> str:
        return self.base


def output_path_name(drv_name: str, output_name: str) -> str:
    """Name of a derivation output's path: ``drv`` or ``drv-<output>``."""
    return drv_name if output_name == "out" else f"{drv_name}-{output_name}"


def _canon(path: str) -> str:
    """Lexically canonicalise an absolute path (like Nix's canonPath).

    Removes empty and ``.`` components and applies ``..``; no symlinks are
    resolved.  Raises BadStorePath for a relative path.
    """
    if not path.startswith("/"):
        raise BadStorePath(f"path '{path}' is not in the Nix store")
    parts: list[str] = []
    for comp in path.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
            continue
        parts.append(comp)
    return "/" + "/".join(parts)


@dataclass(frozen=True)
class StoreDir:
    """The logical store directory (e.g. ``/nix/store``) and what needs it.

    ``path`` is normalised: absolute, canonical, no trailing slash.
    """

    path: str = "/nix/store"
    _plain: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        canon = _canon(self.path) if self.path.startswith("/") else ""
        if canon in ("", "/") or canon != self.path.rstrip("/"):
            raise ValueError(f"store directory '{self.path}' is not a canonical absolute path")
        object.__setattr__(self, "path", canon)
        object.__setattr__(self, "_plain", re.compile(re.escape(canon) + "/" + _PLAIN_BASE))

    def __str__(self) -> str:
        return self.path

    # --- parsing and printing -------------------------------------------------

    def print(self, sp: StorePath) -> str:
        """The full path of ``sp`` in this store."""
        return f"{self.path}/{sp.base}"

    def is_in_store(self, path: str) -> bool:
        """True iff ``path`` lies strictly below the store directory."""
        prefix = self.path + "/"
        return path.startswith(prefix) and len(path) > len(prefix)

    def parse(self, full_path: str) -> StorePath:
        """Parse a full store path (no sub-path allowed).

        The path is canonicalised lexically first, as Nix does.

        Raises:
            BadStorePath: outside the store, a sub-path, or an invalid base.
        """
        plain = self._plain.fullmatch(full_path)
        if plain is not None:
            hash_part, name = plain.groups()
            if not _is_dot_name(name):
                return StorePath._checked(hash_part, name)
        canon = _canon(full_path)
        directory, _, base = canon.rpartition("/")
        if directory != self.path:
            raise BadStorePath(f"path '{full_path}' is not in the Nix store")
        return StorePath.from_base(base)

    def to_store_path(self, path: str) -> StorePath:
        """The store path containing ``path`` (Nix's ``toStorePath``).

        ``/nix/store/<hash>-x/bin/y`` gives ``<hash>-x``.

        Raises:
            BadStorePath: the path is not inside the store or its first
                component is not a valid base name.
        """
        canon = _canon(path)
        if not self.is_in_store(canon):
            raise BadStorePath(f"path '{path}' is not in the Nix store")
        first = canon[len(self.path) + 1:].split("/", 1)[0]
        return StorePath.from_base(first)

    parse_lenient = to_store_path

    def parse_many(self, paths: Iterable[str]) -> list[StorePath]:
        """Parse each of ``paths`` with ``parse``."""
        return [self.parse(p) for p in paths]

    # --- computing paths (spec §6) --------------------------------------------

    def make_store_path(self, path_type: str, inner_hash: Hash, name: str) -> StorePath:
        """``makeStorePath``: fingerprint, sha256, XOR-fold to 20 bytes.

        Raises:
            BadStorePath: ``name`` is not a valid store-path name.
        """
        fingerprint = f"{path_type}:{inner_hash.to_prefixed('base16')}:{self.path}:{name}"
        digest = Hash.compute(HashAlgo.SHA256, fingerprint.encode()).digest
        hash_part = base32.encode(compress_hash(digest, 20))
        check_name(name, f"{hash_part}-{name}")  # Nix names the whole base name
        return StorePath(hash_part, name)

    def make_output_path(self, output_name: str, drv_hash: Hash, name: str) -> StorePath:
        """Input-addressed output path; ``name`` is the derivation's name."""
        return self.make_store_path(
            f"output:{output_name}", drv_hash, output_path_name(name, output_name))

    def _make_type(self, kind: str, references: Iterable[StorePath], has_self: bool) -> str:
        refs = sorted(set(references))
        text = kind + "".join(f":{self.print(r)}" for r in refs)
        return text + ":self" if has_self else text

    def make_text_path(self, name: str, hash: Hash,
                       references: Iterable[StorePath] = ()) -> StorePath:
        """Path of a text object (``.drv``, ``builtins.toFile``).

        Raises:
            ValueError: ``hash`` is not sha256.
        """
        if hash.algo is not HashAlgo.SHA256:
            raise ValueError("text content addresses must use sha256")
        return self.make_store_path(self._make_type("text", references, False), hash, name)

    def make_fixed_output_path(self, method: str, hash: Hash, name: str,
                               references: Iterable[StorePath] = (),
                               has_self_reference: bool = False) -> StorePath:
        """Path of a content-addressed object (spec §6 table).

        ``method`` is "flat", "nar", "text" or "git".  NAR+sha256 gives the
        ``source`` type (references and self allowed); "text" goes to
        ``make_text_path``; anything else uses ``output:out`` and may not
        have references.

        Raises:
            ValueError: an unknown method, references where none are
                allowed, or a non-sha256 text hash.
        """
        refs = list(references)
        if method == "text":
            if has_self_reference:
                raise ValueError("text objects cannot refer to themselves")
            return self.make_text_path(name, hash, refs)
        if method == "nar" and hash.algo is HashAlgo.SHA256:
            return self.make_store_path(
                self._make_type("source", refs, has_self_reference), hash, name)
        prefix = _FIXED_PREFIX.get(method)
        if prefix is None:
            raise ValueError(f"unknown content-address method '{method}'")
        if refs or has_self_reference:
            raise ValueError(
                f"fixed output derivation '{name}' is not allowed to refer to other store paths")
        payload = f"fixed:out:{prefix}{hash.to_prefixed('base16')}:"
        inner = Hash.compute(HashAlgo.SHA256, payload.encode())
        return self.make_store_path("output:out", inner, name)

    def make_path_from_ca(self, name: str, ca: ContentAddress,
                          references: Iterable[StorePath] = (),
                          has_self_reference: bool = False) -> StorePath:
        """The path a content address with these references gives."""
        return self.make_fixed_output_path(
            ca.method, ca.hash, name, references, has_self_reference)


#: Ingestion-method prefix inside ``fixed:`` strings, by method.
_FIXED_PREFIX = {"flat": "", "nar": "r:", "git": "git:"}
_PREFIX_METHOD = {"r": "nar", "git": "git"}


def _split_method(text: str) -> tuple[str, str]:
    """Split ``text:...``/``fixed:[r:|git:]...`` into (method, rest)."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("text", "fixed"):
        raise ValueError(f"content address '{text}' has an unknown prefix")
    if kind == "text":
        return "text", rest
    sub, sep, after = rest.partition(":")
    if sep and sub in _PREFIX_METHOD:
        return _PREFIX_METHOD[sub], after
    return "flat", rest


def _method_prefix(method: str) -> str:
    if method == "text":
        return "text:"
    return "fixed:" + _FIXED_PREFIX[method]


@dataclass(frozen=True)
class ContentAddressMethod:
    """How an object is hashed: method ("text"|"flat"|"nar"|"git") and algorithm.

    Text form as in the newer AddToStore: ``text:sha256``, ``fixed:sha256``,
    ``fixed:r:sha256``, ``fixed:git:sha1``.
    """

    method: str
    algo: HashAlgo

    def __post_init__(self) -> None:
        if self.method not in ("text", "flat", "nar", "git"):
            raise ValueError(f"unknown content-address method '{self.method}'")
        if self.method == "text" and self.algo is not HashAlgo.SHA256:
            raise ValueError(
                f"text content address hash should use sha256, but uses {self.algo.value}")

    @classmethod
    def parse(cls, text: str) -> ContentAddressMethod:
        """Parse ``<method prefix><algo>``.

        Raises:
            ValueError: unknown prefix or algorithm, or text with non-sha256.
        """
        method, rest = _split_method(text)
        return cls(method, HashAlgo.parse(rest))

    def render(self) -> str:
        """The text form, e.g. ``fixed:r:sha256``."""
        return _method_prefix(self.method) + self.algo.value


@dataclass(frozen=True)
class ContentAddress:
    """A content address: method plus the content hash (spec §7)."""

    method: str
    hash: Hash

    def __post_init__(self) -> None:
        ContentAddressMethod(self.method, self.hash.algo)

    @property
    def method_algo(self) -> ContentAddressMethod:
        """The method and algorithm without the digest."""
        return ContentAddressMethod(self.method, self.hash.algo)

    @classmethod
    def parse(cls, text: str) -> ContentAddress:
        """Parse ``text:sha256:<h>`` or ``fixed:[r:|git:]<algo>:<h>``.

        The digest may be base16, nix32 or base64 (not SRI).

        Raises:
            ValueError: malformed text, unknown algorithm, bad digest.
        """
        method, rest = _split_method(text)
        algo_name, sep, digest = rest.partition(":")
        if not sep:
            raise ValueError(f"content address '{text}' lacks a hash")
        algo = HashAlgo.parse(algo_name)
        if method == "text" and algo is not HashAlgo.SHA256:
            raise ValueError(
                f"text content address hash should use sha256, but uses {algo.value}")
        return cls(method, Hash.parse_non_sri(digest, algo, whole=text))

    def render(self) -> str:
        """The canonical text form with a nix32 digest."""
        return _method_prefix(self.method) + self.hash.to_prefixed("nix32")
