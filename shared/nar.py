"""NAR (Nix ARchive) writing and sans-IO reading (spec/store-formats.md §8).

Holds:

* the writer: ``dump`` / ``dump_fd`` stream a file-system object as the
  exact bytes ``nix-store --dump`` gives, opening everything relative to
  directory fds with ``O_NOFOLLOW`` and never reading a file whole;
  ``nar_of_bytes`` builds the NAR of one regular file;
* the reader: ``NarParser``, an incremental validator that turns NAR bytes
  into events and enforces the strictest rules of any Nix version (exact
  token order, sorted unique names, zero padding) plus the caps in
  ``limits``; it never allocates a declared length ahead of the bytes and
  passes file contents through as they arrive;
* ``nar_hash_of_path``.

Trust: the parser's input comes from clients (through a worker) and is
hostile; every failure is a ``NarError`` (a ``ClientProtocolError``) and
poisons the parser.  The writer reads the local file system only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from nixwarden.shared import limits
from nixwarden.shared.errors import ClientProtocolError
from nixwarden.shared.hashes import Hash, HashAlgo, HashSink

MAGIC = b"nix-archive-1"


class NarError(ClientProtocolError):
    """The NAR byte stream is malformed or breaks a NAR rule."""


class NarDumpError(ValueError):
    """A file-system object cannot be archived (unsupported type, changed)."""


# --- encoding primitives (spec §8.1) ------------------------------------------

def _pad_len(n: int) -> int:
    return -n % 8


def _str(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + bytes(_pad_len(len(data)))


def _tokens(*items: bytes) -> bytes:
    return b"".join(_str(t) for t in items)


def _decode_name(raw: bytes) -> str:
    """Names and targets as ``str``; ``os.fsencode`` gives the bytes back."""
    return raw.decode("utf-8", "surrogateescape")


# --- writer --------------------------------------------------------------------

def nar_of_bytes(contents: bytes, executable: bool = False) -> bytes:
    """The NAR of a single regular file holding ``contents``."""
    marker = (b"executable", b"") if executable else ()
    return _tokens(MAGIC, b"(", b"type", b"regular", *marker, b"contents",
                   contents, b")")


def dump(path: str | os.PathLike, *, chunk_size: int = limits.NAR_DUMP_CHUNK,
         scratch: bytearray | None = None) -> Iterator[bytes]:
    """Serialise the object at ``path`` exactly like ``nix-store --dump``.

    ``path`` itself is not followed if it is a symlink.

    Args:
        scratch: read file contents into this buffer and yield views of it,
            each valid only until the next piece is asked for (for a
            consumer that hashes or writes a piece at once): no buffer is
            allocated per chunk.

    Yields:
        NAR bytes in pieces; file contents in chunks of at most
        ``chunk_size`` bytes (``len(scratch)`` with a scratch buffer).
    Raises:
        OSError: from the file system.
        NarDumpError: an unsupported file type, a file that shrank while
            being read, or nesting deeper than ``MAX_NAR_DEPTH``.
    """
    yield _str(MAGIC)
    yield from _dump_at(None, os.fspath(path), 0, _Chunks(chunk_size, scratch))


def dump_fd(fd: int, *, chunk_size: int = limits.NAR_DUMP_CHUNK,
            scratch: bytearray | None = None) -> Iterator[bytes]:
    """Like ``dump`` for an open regular-file or directory fd (not closed)."""
    yield _str(MAGIC)
    yield from _dump_open(fd, os.fstat(fd), 0, _Chunks(chunk_size, scratch))


class _Chunks:
    """How a dump reads file contents: fresh chunks, or a reused buffer."""

    def __init__(self, size: int, scratch: bytearray | None):
        self.size = len(scratch) if scratch is not None else size
        self.view = memoryview(scratch) if scratch is not None else None

    def read(self, fd: int, remaining: int):
        """Yield exactly ``remaining`` bytes of ``fd`` in pieces."""
        while remaining:
            want = min(self.size, remaining)
            if self.view is None:
                chunk = os.read(fd, want)
                got = len(chunk)
            else:
                got = os.readv(fd, [self.view[:want]])
                chunk = self.view[:got]
            if not got:
                raise NarDumpError("file shrank while it was being dumped")
            remaining -= got
            yield chunk


def _dump_at(dir_fd: int | None, name: str | bytes, depth: int,
             chunks: _Chunks) -> Iterator[bytes]:
    """Dump ``name`` relative to ``dir_fd`` (or the cwd when None)."""
    st = os.lstat(name, dir_fd=dir_fd)
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(os.fsencode(name), dir_fd=dir_fd)
        yield _tokens(b"(", b"type", b"symlink", b"target", target, b")")
        return
    if stat.S_ISREG(st.st_mode):
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    elif stat.S_ISDIR(st.st_mode):
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_DIRECTORY
    else:
        raise NarDumpError(f"file '{os.fsdecode(name)}' has an unsupported type")
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        fst = os.fstat(fd)
        if stat.S_IFMT(fst.st_mode) != stat.S_IFMT(st.st_mode):
            raise NarDumpError(f"file '{os.fsdecode(name)}' changed type while dumping")
        yield from _dump_open(fd, fst, depth, chunks)
    finally:
        os.close(fd)


def _dump_open(fd: int, st: os.stat_result, depth: int, chunks: _Chunks) -> Iterator[bytes]:
    if stat.S_ISREG(st.st_mode):
        yield from _dump_file(fd, st, chunks)
    elif stat.S_ISDIR(st.st_mode):
        yield from _dump_dir(fd, depth, chunks)
    else:
        raise NarDumpError("open file has an unsupported type")


def _dump_file(fd: int, st: os.stat_result, chunks: _Chunks) -> Iterator[bytes]:
    """A regular file node; executable iff the owner x bit is set (spec §8.3)."""
    marker = (b"executable", b"") if st.st_mode & stat.S_IXUSR else ()
    size = st.st_size
    yield _tokens(b"(", b"type", b"regular", *marker, b"contents") + size.to_bytes(8, "little")
    yield from chunks.read(fd, size)
    yield bytes(_pad_len(size)) + _str(b")")


def _dump_dir(fd: int, depth: int, chunks: _Chunks) -> Iterator[bytes]:
    """A directory node with its entries in bytewise name order."""
    names = sorted(os.fsencode(n) for n in os.listdir(fd))
    if names and depth >= limits.MAX_NAR_DEPTH:
        raise NarDumpError("directory nesting is deeper than the NAR limit")
    yield _tokens(b"(", b"type", b"directory")
    for name in names:
        yield _tokens(b"entry", b"(", b"name", name, b"node")
        yield from _dump_at(fd, name, depth + 1, chunks)
        yield _str(b")")
    yield _str(b")")


def nar_hash_of_path(path: str | os.PathLike,
                     algo: HashAlgo = HashAlgo.SHA256) -> tuple[Hash, int]:
    """The hash (SHA-256 unless ``algo``) and size of the NAR of ``path``
    (spec §8.3), read through one reused buffer."""
    return _hash_pieces(dump(path, scratch=bytearray(limits.NAR_DUMP_CHUNK)), algo)


def nar_hash_of_fd(fd: int, algo: HashAlgo = HashAlgo.SHA256) -> tuple[Hash, int]:
    """``nar_hash_of_path`` for an open file or directory (not closed)."""
    return _hash_pieces(dump_fd(fd, scratch=bytearray(limits.NAR_DUMP_CHUNK)), algo)


def _hash_pieces(pieces, algo: HashAlgo) -> tuple[Hash, int]:
    sink = HashSink(algo)
    for piece in pieces:
        sink.update(piece)
    return sink.finish(), sink.size


# --- reader events ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Directory:
    """A directory at ``path`` (``()`` is the root); its entries follow."""
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Regular:
    """A regular file starts; ``size`` bytes of Contents and a ContentsEnd follow."""
    path: tuple[str, ...]
    executable: bool
    size: int


@dataclass(frozen=True, slots=True)
class Contents:
    """A non-empty piece of the current file's contents: bytes, or a
    read-only view of the (immutable) input given to ``feed``."""
    path: tuple[str, ...]
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class ContentsEnd:
    """The current file's contents are complete."""
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Symlink:
    """A symlink at ``path`` pointing to ``target`` (never followed)."""
    path: tuple[str, ...]
    target: str


@dataclass(frozen=True, slots=True)
class End:
    """The archive is complete."""


NarEvent = Directory | Regular | Contents | ContentsEnd | Symlink | End


# --- reader --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _ReadStr:
    """Grammar request: one length-prefixed string of at most ``limit`` bytes."""
    limit: int
    what: str


@dataclass(frozen=True, slots=True)
class _ReadContents:
    """Grammar request: a file's contents, streamed as events."""
    path: tuple[str, ...]
    executable: bool


_TOKEN = _ReadStr(limits.MAX_NAR_TOKEN, "NAR token")

# Low-level read modes.
_LEN, _DATA, _CONTENTS, _PAD = range(4)


def _check_entry_name(name: bytes) -> None:
    if not name:
        raise NarError("NAR contains an empty entry name")
    if name in (b".", b".."):
        raise NarError(f"NAR contains invalid entry name {name!r}")
    if b"/" in name or b"\0" in name:
        raise NarError(f"NAR entry name {name!r} contains '/' or NUL")


def _check_target(target: bytes) -> None:
    if not target:
        raise NarError("NAR contains an empty symlink target")
    if b"\0" in target:
        raise NarError("NAR symlink target contains NUL")


def _want(got: bytes, expected: bytes) -> None:
    if got != expected:
        raise NarError(f"bad NAR: expected {expected.decode()!r}, got {got!r}")


class NarParser:
    """Incremental NAR validator producing events (sans-IO, STYLE.md 2.1).

    ``feed(chunk)`` returns the events the chunk completes; ``feed(b"")``
    means end of input.  ``wanted()`` says how many bytes may be read next
    without passing the end of the archive.  After any error every call
    raises.
    """

    def __init__(self) -> None:
        self._grammar = self._archive()
        self._req: _ReadStr | _ReadContents = next(self._grammar)
        self._mode = _LEN
        self._need = 8
        self._part = bytearray()
        self._strlen = 0
        self._remaining = 0
        self._events: list[NarEvent] = []
        self._done = False
        self._error: BaseException | None = None
        self._share = False  # see feed
        self.bytes_consumed = 0

    @property
    def done(self) -> bool:
        """True once the root node's closing ")" has been consumed."""
        return self._done

    def wanted(self) -> int:
        """Most bytes acceptable now without reading past the NAR's end (0 when done)."""
        self._check_usable()
        if self._done:
            return 0
        if self._mode == _CONTENTS:
            return self._remaining + _pad_len(self._strlen)
        return self._need - len(self._part)

    def feed(self, data: bytes) -> list[NarEvent]:
        """Consume ``data`` (``b""`` = end of input) and return new events.

        Raises:
            NarError: the input is not a valid NAR, is truncated, or has
                bytes after its end; also on any call after an error.
        """
        self._check_usable()
        # Contents events may be views of ``data`` when nothing can change
        # it: bytes, or a read-only view (whose owner promises as much).
        self._share = isinstance(data, bytes) or (
            isinstance(data, memoryview) and data.readonly)
        try:
            return self._feed(memoryview(data).cast("B"))
        except BaseException as exc:
            self._error = exc
            raise

    def _check_usable(self) -> None:
        if self._error is not None:
            raise NarError(f"NAR parser unusable after an earlier error: {self._error}")

    def _feed(self, view: memoryview) -> list[NarEvent]:
        self._events = events = []
        if not view:
            if not self._done:
                raise NarError("NAR is truncated: input ended inside the archive")
            return events
        pos = 0
        while pos < len(view) and not self._done:
            start = pos
            pos = self._step(view, pos)
            self.bytes_consumed += pos - start
        if pos < len(view):
            raise NarError("unexpected data after the end of the NAR")
        return events

    # --- byte level ------------------------------------------------------------

    def _step(self, view: memoryview, pos: int) -> int:
        if self._mode == _CONTENTS:
            return self._step_contents(view, pos)
        need, part = self._need, self._part
        if not part and len(view) - pos >= need:
            # The whole field is at hand (the usual case): no copy into _part.
            self._complete(view[pos:pos + need])
            return pos + need
        take = min(need - len(part), len(view) - pos)
        part += view[pos:pos + take]
        if len(part) == need:
            field = bytes(part)
            part.clear()
            self._complete(field)
        return pos + take

    def _complete(self, field) -> None:
        """Act on one whole field: a length, or a value with its padding."""
        mode = self._mode
        if mode == _LEN:
            self._on_length(int.from_bytes(field, "little"))
            return
        value_len = 0 if mode == _PAD else self._strlen
        if any(field[value_len:]):
            raise NarError("NAR padding is not zero")
        if mode == _PAD:
            self._end_contents()
        else:
            self._resume(bytes(field[:value_len]))

    def _on_length(self, length: int) -> None:
        req = self._req
        self._strlen = length
        if isinstance(req, _ReadContents):
            self._events.append(Regular(req.path, req.executable, length))
            self._remaining = length
            self._mode = _CONTENTS
            if length == 0:
                self._start_padding()
            return
        if length > req.limit:
            raise NarError(f"{req.what} is too long ({length} bytes, at most {req.limit})")
        self._mode, self._need = _DATA, length + _pad_len(length)
        if self._need == 0:
            self._resume(b"")

    def _step_contents(self, view: memoryview, pos: int) -> int:
        take = min(self._remaining, len(view) - pos)
        piece = view[pos:pos + take]
        self._events.append(Contents(self._req.path, piece if self._share else bytes(piece)))
        self._remaining -= take
        if self._remaining == 0:
            self._start_padding()
        return pos + take

    def _start_padding(self) -> None:
        self._mode, self._need = _PAD, _pad_len(self._strlen)
        if self._need == 0:
            self._end_contents()

    def _end_contents(self) -> None:
        self._events.append(ContentsEnd(self._req.path))
        self._resume(None)

    def _resume(self, value: bytes | None) -> None:
        try:
            self._req = self._grammar.send(value)
        except StopIteration:
            self._done = True
            return
        self._mode, self._need = _LEN, 8

    # --- grammar (spec §8.2), one generator per nesting level ------------------

    def _archive(self):
        magic = yield _ReadStr(limits.MAX_NAR_TOKEN, "NAR magic")
        if magic != MAGIC:
            raise NarError("input is not a Nix archive (bad magic)")
        yield from self._node(())
        self._events.append(End())

    def _node(self, path: tuple[str, ...]):
        _want((yield _TOKEN), b"(")
        _want((yield _TOKEN), b"type")
        kind = yield _TOKEN
        if kind == b"regular":
            yield from self._regular(path)
        elif kind == b"symlink":
            _want((yield _TOKEN), b"target")
            target = yield _ReadStr(limits.MAX_NAR_TARGET, "NAR symlink target")
            _check_target(target)
            self._events.append(Symlink(path, _decode_name(target)))
            _want((yield _TOKEN), b")")
        elif kind == b"directory":
            self._events.append(Directory(path))
            prev = None
            while (tok := (yield _TOKEN)) != b")":
                _want(tok, b"entry")
                name = yield from self._entry_header(path, prev)
                yield from self._node(path + (_decode_name(name),))
                _want((yield _TOKEN), b")")
                prev = name
        else:
            raise NarError(f"unknown NAR node type {kind!r}")

    def _regular(self, path: tuple[str, ...]):
        tok = yield _TOKEN
        executable = tok == b"executable"
        if executable:
            if (yield _TOKEN) != b"":
                raise NarError("NAR 'executable' marker must have an empty value")
            tok = yield _TOKEN
        _want(tok, b"contents")
        yield _ReadContents(path, executable)
        _want((yield _TOKEN), b")")

    def _entry_header(self, path: tuple[str, ...], prev: bytes | None):
        """Read ``( name <name> node`` and check the name; returns it."""
        if len(path) >= limits.MAX_NAR_DEPTH:
            raise NarError(f"NAR nesting is deeper than {limits.MAX_NAR_DEPTH}")
        _want((yield _TOKEN), b"(")
        _want((yield _TOKEN), b"name")
        name = yield _ReadStr(limits.MAX_NAR_NAME, "NAR entry name")
        _check_entry_name(name)
        if prev is not None and name == prev:
            raise NarError(f"NAR directory contains duplicate entry {name!r}")
        if prev is not None and name < prev:
            raise NarError(f"NAR directory is not sorted ({name!r} after {prev!r})")
        _want((yield _TOKEN), b"node")
        return name


def parse_nar(data: bytes) -> list[NarEvent]:
    """Validate a complete NAR held in memory and return its events."""
    parser = NarParser()
    events = parser.feed(data)
    events += parser.feed(b"")
    return events
