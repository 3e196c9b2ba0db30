"""Binary cache metadata: ``.narinfo`` files and ``nix-cache-info``.

Pure parsing and printing (spec/store-formats.md §13, §14; Nix 2.8
``nar-info.cc`` and ``BinaryCacheStore::init``).  ``parse_narinfo`` checks
every field and returns a ``NarInfo`` with typed values; ``render`` prints
one back in Nix's writer order (used by tests and the disk cache);
``parse_cache_info`` reads ``nix-cache-info``.  Process: session.

Trust: both files come from binary caches, i.e. from the network, and are
untrusted.  Every field is checked: store paths must parse and lie in the
cache's store dir, hashes and sizes must be well formed (``NarHash`` must
be SHA-256, since the store only computes that), single-valued keys may not
repeat, and the ``URL`` must stay inside the cache (no ``..``, no absolute
path, no ``file:`` URL; absolute ``http(s)`` URLs are allowed as in Nix).
Anything malformed raises ``NarInfoError`` naming the file and the field;
nothing here decides about signatures (``substitute.py`` does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nixwarden.shared.hashes import Hash, HashAlgo
from nixwarden.shared.storepath import BadStorePath, ContentAddress, StoreDir, StorePath

#: Largest value of Nix's unsigned 64-bit sizes.
_UINT64_MAX = 2**64 - 1
_DECIMAL = re.compile(r"[0-9]+")
_PRIORITY = re.compile(r"\s*([+-]?[0-9]+)")
_SPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_SINGLE = frozenset({"StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash",
                     "NarSize", "References", "Deriver", "System", "CA"})


class NarInfoError(ValueError):
    """A malformed ``.narinfo`` or ``nix-cache-info`` file."""


@dataclass(frozen=True)
class NarInfo:
    """One parsed ``.narinfo``.  Paths are full, in the cache's store dir.

    ``file_size`` is 0 and ``file_hash`` None when the file does not say;
    ``references`` and ``sigs`` are sorted and free of duplicates.
    """

    path: str
    url: str
    compression: str
    file_hash: Hash | None
    file_size: int
    nar_hash: Hash
    nar_size: int
    references: tuple[str, ...]
    deriver: str | None
    system: str
    sigs: tuple[str, ...]
    ca: ContentAddress | None

    @property
    def hash_part(self) -> str:
        return self.path.rsplit("/", 1)[1][:32]


@dataclass(frozen=True)
class CacheInfo:
    """What ``nix-cache-info`` says; None where a key is absent."""

    store_dir: str | None = None
    want_mass_query: bool | None = None
    priority: int | None = None


# --- .narinfo -------------------------------------------------------------------------


def parse_narinfo(text: str, store_dir: StoreDir, *, whence: str = "narinfo") -> NarInfo:
    """Parse a ``.narinfo`` file of a cache whose store dir is ``store_dir``.

    ``whence`` names the file in messages (e.g. ``<cache>/<hash>.narinfo``).

    Raises:
        NarInfoError: "NAR info file '<whence>' is corrupt (<reason>)".
    """
    fields = _split_lines(text, whence)
    parser = _Fields(store_dir, whence)
    for name, value in fields:
        parser.take(name, value)
    return parser.finish()


def _split_lines(text: str, whence: str) -> list[tuple[str, str]]:
    """``Key: Value\\n`` lines, as Nix reads them but without its leniencies."""
    out = []
    pos = 0
    while pos < len(text):
        eol = text.find("\n", pos)
        if eol < 0:
            raise _corrupt(whence, "last line is not terminated by a newline")
        line = text[pos:eol]
        colon = line.find(":")
        if colon < 0:
            raise _corrupt(whence, f"line without a colon: '{_clip(line)}'")
        if line[colon + 1:colon + 2] != " ":
            raise _corrupt(whence, f"no space after the colon of '{_clip(line[:colon])}'")
        out.append((line[:colon], line[colon + 2:]))
        pos = eol + 1
    return out


class _Fields:
    """Accumulates the fields of one ``.narinfo``."""

    def __init__(self, store_dir: StoreDir, whence: str):
        self.store_dir = store_dir
        self.whence = whence
        self.seen: set[str] = set()
        self.values: dict[str, object] = {"sigs": set(), "references": (), "compression": "",
                                          "file_hash": None, "file_size": 0, "deriver": None,
                                          "system": "", "ca": None, "url": ""}

    def take(self, name: str, value: str) -> None:
        if name in _SINGLE:
            if name in self.seen:
                raise _corrupt(self.whence, f"field '{name}' appears twice")
            self.seen.add(name)
        handler = _HANDLERS.get(name)
        if handler is None:
            return  # unknown keys are ignored, as in Nix
        try:
            handler(self, value)
        except (ValueError, BadStorePath) as e:
            raise _corrupt(self.whence, f"bad {name} '{_clip(value)}': {e}") from None

    def finish(self) -> NarInfo:
        for key in ("StorePath", "NarHash", "NarSize", "URL"):
            if key not in self.seen:
                raise _corrupt(self.whence, f"field '{key}' is missing")
        v = self.values
        return NarInfo(path=v["path"], url=v["url"], compression=v["compression"] or "bzip2",
                       file_hash=v["file_hash"], file_size=v["file_size"],
                       nar_hash=v["nar_hash"], nar_size=v["nar_size"],
                       references=v["references"], deriver=v["deriver"], system=v["system"],
                       sigs=tuple(sorted(v["sigs"])), ca=v["ca"])

    # --- one handler per key ------------------------------------------------------

    def store_path(self, value: str) -> None:
        self.values["path"] = self.store_dir.print(self.store_dir.parse(value))

    def url(self, value: str) -> None:
        check_url(value)
        self.values["url"] = value

    def compression(self, value: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.+-]*", value):
            raise ValueError("not a compression method name")
        self.values["compression"] = value

    def file_hash(self, value: str) -> None:
        self.values["file_hash"] = Hash.parse(value)

    def file_size(self, value: str) -> None:
        self.values["file_size"] = _uint(value)

    def nar_hash(self, value: str) -> None:
        h = Hash.parse(value)
        if h.algo is not HashAlgo.SHA256:
            raise ValueError("the NAR hash must be SHA-256")
        self.values["nar_hash"] = h

    def nar_size(self, value: str) -> None:
        n = _uint(value)
        if n == 0:
            raise ValueError("the NAR size must not be zero")
        self.values["nar_size"] = n

    def references(self, value: str) -> None:
        bases = {StorePath.from_base(r) for r in value.split(" ") if r}
        self.values["references"] = tuple(self.store_dir.print(sp) for sp in sorted(bases))

    def deriver(self, value: str) -> None:
        if value != "unknown-deriver":
            self.values["deriver"] = self.store_dir.print(StorePath.from_base(value))

    def system(self, value: str) -> None:
        self.values["system"] = value

    def sig(self, value: str) -> None:
        if not value:
            raise ValueError("empty signature")
        self.values["sigs"].add(value)

    def ca(self, value: str) -> None:
        self.values["ca"] = ContentAddress.parse(value) if value else None


_HANDLERS = {"StorePath": _Fields.store_path, "URL": _Fields.url,
             "Compression": _Fields.compression, "FileHash": _Fields.file_hash,
             "FileSize": _Fields.file_size, "NarHash": _Fields.nar_hash,
             "NarSize": _Fields.nar_size, "References": _Fields.references,
             "Deriver": _Fields.deriver, "System": _Fields.system, "Sig": _Fields.sig,
             "CA": _Fields.ca}


def check_url(url: str) -> None:
    """Refuse a NAR URL that would leave the cache (see the module's Trust note).

    Raises:
        ValueError: empty, a local absolute path or ``file:`` URL, a
            ``..`` component, or control characters.
    """
    if not url:
        raise ValueError("empty URL")
    if _SPACE_OR_CONTROL.search(url):
        raise ValueError("URL contains spaces or control characters")
    scheme, sep, _ = url.partition("://")
    if sep and "/" not in scheme:
        if scheme not in ("http", "https"):
            raise ValueError(f"URL scheme '{scheme}' is not allowed")
        return
    if url.startswith("/") or ":" in url.split("/", 1)[0]:
        raise ValueError("URL must be relative to the cache")
    if ".." in url.split("?", 1)[0].split("/"):
        raise ValueError("URL must not contain '..'")


def _uint(value: str) -> int:
    if not _DECIMAL.fullmatch(value) or int(value) > _UINT64_MAX:
        raise ValueError("not an unsigned 64-bit decimal number")
    return int(value)


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _corrupt(whence: str, reason: str) -> NarInfoError:
    return NarInfoError(f"NAR info file '{whence}' is corrupt ({reason})")


def render(info: NarInfo) -> str:
    """The ``.narinfo`` text of ``info`` in Nix's writer order (spec §13)."""
    lines = [f"StorePath: {info.path}", f"URL: {info.url}", f"Compression: {info.compression}"]
    if info.file_hash is not None:
        lines.append(f"FileHash: {info.file_hash.to_prefixed('nix32')}")
    if info.file_size:
        lines.append(f"FileSize: {info.file_size}")
    lines.append(f"NarHash: {info.nar_hash.to_prefixed('nix32')}")
    lines.append(f"NarSize: {info.nar_size}")
    lines.append("References: " + " ".join(r.rsplit("/", 1)[1] for r in info.references))
    if info.deriver:
        lines.append(f"Deriver: {info.deriver.rsplit('/', 1)[1]}")
    if info.system:
        lines.append(f"System: {info.system}")
    lines += [f"Sig: {s}" for s in info.sigs]
    if info.ca is not None:
        lines.append(f"CA: {info.ca.render()}")
    return "\n".join(lines) + "\n"


# --- nix-cache-info ---------------------------------------------------------------------


def parse_cache_info(text: str, *, whence: str = "nix-cache-info") -> CacheInfo:
    """Parse ``nix-cache-info`` (lines without a colon and unknown keys ignored).

    Raises:
        NarInfoError: a ``Priority`` that does not start with an integer.
    """
    store_dir = want = priority = None
    for line in text.split("\n"):
        name, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.strip()
        if name == "StoreDir":
            store_dir = value
        elif name == "WantMassQuery":
            want = value == "1"
        elif name == "Priority":
            m = _PRIORITY.match(value)
            if m is None or abs(int(m.group(1))) >= 2**31:
                raise NarInfoError(f"'{whence}' has an invalid Priority '{_clip(value)}'")
            priority = int(m.group(1))
    return CacheInfo(store_dir, want, priority)
