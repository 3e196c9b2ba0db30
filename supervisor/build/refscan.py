"""Reference scanning and hash rewriting of built outputs
(spec/store-formats.md §12, spec/local-store.md §8.7).

Holds ``RefScanner`` (sans-IO: feed NAR bytes, read what was found),
``scan_references`` (scan the NAR serialisation of a path, streamed with
``shared.nar.dump``) and ``rewrite_hashes`` (replace hash parts in place
in a scratch output: file contents, symlink targets and entry names).
Run by the supervisor's build code after a builder exits; only
``rewrite_hashes`` writes, and only below the path it is given.

Trust: the scanned tree was written by the (untrusted) builder.  Scanning
never follows symlinks, reads files in bounded chunks and keeps at most
``HASH_PART_LEN - 1`` bytes between chunks, so cost is linear in the NAR
size whatever the contents.  Only candidates (the input closure and the
build's own outputs, chosen by the caller) can be found.
``rewrite_hashes`` opens everything relative to directory fds with
``O_NOFOLLOW`` and never follows a symlink the builder left.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping

from nixwarden.shared import base32, limits
from nixwarden.shared.nar import dump
from nixwarden.shared.storepath import HASH_PART_LEN, StoreDir

#: A run of at least one hash part's length of nix32 characters.
_RUN = re.compile(b"[" + base32.ALPHABET.encode() + b"]{%d,}" % HASH_PART_LEN)


class RefScanner:
    """Find which of a set of 32-character hash parts occur in a byte stream.

    ``feed`` the stream in pieces of any size; ``found`` holds the hash
    parts seen so far (as ``str``).  Matches spanning pieces are found:
    the last ``HASH_PART_LEN - 1`` bytes are kept and rescanned with the
    next piece.
    """

    def __init__(self, hash_parts: Iterable[str]):
        self._pending = {h.encode("ascii") for h in hash_parts}
        self._tail = b""
        self.found: set[str] = set()

    @property
    def done(self) -> bool:
        """True once every hash part was found (further input is moot)."""
        return not self._pending

    def feed(self, data: bytes) -> None:
        """Scan the next piece of the stream."""
        if not self._pending or not data:
            return
        buf = self._tail + data
        for m in _RUN.finditer(buf):
            self._check_run(m.group())
        self._tail = buf[-(HASH_PART_LEN - 1):]

    def _check_run(self, run: bytes) -> None:
        pending = self._pending
        for i in range(len(run) - HASH_PART_LEN + 1):
            window = run[i:i + HASH_PART_LEN]
            if window in pending:
                pending.discard(window)
                self.found.add(window.decode("ascii"))
                if not pending:
                    return


def _hash_parts(candidates: Iterable[str], store_dir: StoreDir) -> dict[str, list[str]]:
    by_hash: dict[str, list[str]] = {}
    for path in candidates:
        by_hash.setdefault(store_dir.parse(path).hash_part, []).append(path)
    return by_hash


def scan_references(real_path: str, candidates: Iterable[str], store_dir: str | StoreDir,
                    *, chunk_size: int = limits.NAR_DUMP_CHUNK) -> set[str]:
    """Which candidates' hash parts occur in the NAR serialisation of
    ``real_path`` (contents, symlink targets, entry names; spec SF §12).

    Args:
        real_path: where the object is on disk now (not followed if a
            symlink).
        candidates: full store paths under ``store_dir``.
        store_dir: the logical store directory of ``candidates``.
        chunk_size: bytes read from a file at once.
    Returns:
        The candidates found (all candidates sharing a found hash part).
    Raises:
        BadStorePath: a candidate is not a store path in ``store_dir``.
        OSError, NarDumpError: from reading ``real_path``.
    """
    store = store_dir if isinstance(store_dir, StoreDir) else StoreDir(store_dir)
    by_hash = _hash_parts(candidates, store)
    scanner = RefScanner(by_hash)
    if not scanner.done:
        for piece in dump(real_path, chunk_size=chunk_size):
            scanner.feed(piece)
            if scanner.done:
                break
    return {path for h in scanner.found for path in by_hash[h]}


# --- rewriting hash parts in place ------------------------------------------------

def _check_mapping(mapping: Mapping[str, str]) -> dict[bytes, bytes]:
    table = {}
    for old, new in mapping.items():
        if len(old) != HASH_PART_LEN or len(new) != HASH_PART_LEN:
            raise ValueError(f"hash rewrite '{old}' -> '{new}' is not between hash parts")
        if old != new:
            table[old.encode("ascii")] = new.encode("ascii")
    return table


def _replace(data: bytes, table: Mapping[bytes, bytes], pattern: re.Pattern) -> bytes:
    return pattern.sub(lambda m: table[m.group()], data)


def rewrite_hashes(real_path: str, mapping: Mapping[str, str], *,
                   chunk_size: int = limits.NAR_DUMP_CHUNK) -> None:
    """Replace hash parts in place below ``real_path`` (spec §8.7 step 7).

    The equivalent of Nix's rewriting of the object's NAR: file contents,
    symlink targets and entry names (including ``real_path``'s own
    contents, not its name).  Replacements are simultaneous and left to
    right; Nix applies the keys one after the other, which differs only if
    a new hash part is also an old one.  Files are patched with
    ``pwrite`` (same length), so modes, inodes and sizes are kept; a file
    without owner write permission gets it for the rewrite only.

    Args:
        real_path: the scratch output on disk.
        mapping: old hash part -> new hash part (both 32 characters).
    Raises:
        ValueError: a mapping entry that is not between hash parts.
        OSError: from the file system.
    """
    table = _check_mapping(mapping)
    if not table:
        return
    pattern = re.compile(b"|".join(re.escape(k) for k in sorted(table)))
    parent, name = os.path.split(os.path.abspath(real_path))
    dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _rewrite_at(dir_fd, os.fsencode(name), table, pattern, chunk_size, 0)
    finally:
        os.close(dir_fd)


def _rewrite_at(dir_fd: int, name: bytes, table: Mapping[bytes, bytes],
                pattern: re.Pattern, chunk_size: int, depth: int) -> None:
    st = os.lstat(name, dir_fd=dir_fd)
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=dir_fd)
        new_target = _replace(target, table, pattern)
        if new_target != target:
            os.unlink(name, dir_fd=dir_fd)
            os.symlink(new_target, name, dir_fd=dir_fd)
    elif stat.S_ISREG(st.st_mode):
        _rewrite_file(dir_fd, name, st, table, pattern, chunk_size)
    elif stat.S_ISDIR(st.st_mode):
        if depth >= limits.MAX_NAR_DEPTH:
            raise OSError(f"directory '{os.fsdecode(name)}' is nested too deeply")
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
        try:
            _rewrite_dir(fd, table, pattern, chunk_size, depth)
        finally:
            os.close(fd)


def _rewrite_dir(fd: int, table: Mapping[bytes, bytes], pattern: re.Pattern,
                 chunk_size: int, depth: int) -> None:
    for entry in sorted(os.fsencode(n) for n in os.listdir(fd)):
        _rewrite_at(fd, entry, table, pattern, chunk_size, depth + 1)
        new_entry = _replace(entry, table, pattern)
        if new_entry != entry:
            os.rename(entry, new_entry, src_dir_fd=fd, dst_dir_fd=fd)


def _rewrite_file(dir_fd: int, name: bytes, st: os.stat_result, table: Mapping[bytes, bytes],
                  pattern: re.Pattern, chunk_size: int) -> None:
    restore_mode = None
    if not st.st_mode & stat.S_IWUSR:
        restore_mode = stat.S_IMODE(st.st_mode)
        os.chmod(name, restore_mode | stat.S_IWUSR, dir_fd=dir_fd, follow_symlinks=False)
    try:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY,
                     dir_fd=dir_fd)
        try:
            _patch_fd(fd, table, pattern, chunk_size)
        finally:
            os.close(fd)
    finally:
        if restore_mode is not None:
            os.chmod(name, restore_mode, dir_fd=dir_fd, follow_symlinks=False)


def _patch_fd(fd: int, table: Mapping[bytes, bytes], pattern: re.Pattern,
              chunk_size: int) -> None:
    """Stream the file, ``pwrite`` each replacement at its offset.

    ``carry`` holds the unmatched tail (< one hash part) of the previous
    buffer that lies after the last match, so a match spanning chunks is
    found once and matches never overlap.
    """
    carry, carry_offset, offset = b"", 0, 0
    while chunk := os.pread(fd, chunk_size, offset):
        buf, base = carry + chunk, carry_offset
        offset += len(chunk)
        end = 0
        for m in pattern.finditer(buf):
            os.pwrite(fd, table[m.group()], base + m.start())
            end = m.end()
        keep = max(end, len(buf) - (HASH_PART_LEN - 1))
        carry, carry_offset = buf[keep:], base + keep

