"""Receiving one store object's bytes into a temporary entry of the store.

An ``Incoming`` object is fed the chunks a client sent and writes them
under ``<random hash>-nixwarden-tmp`` in the real store directory.  That
name is a store path whose hash part is registered as a temporary root
first, so no garbage collector (ours or CppNix's, which match temporary
roots by hash part) deletes it while it is being built.  The NAR hash,
the size and, when asked, a content-address hash are computed while the
bytes are written; nothing is believed.  Process: session.

Trust: the bytes come from a client through a worker; they pass through
``NarParser`` (syntax and limits) and ``Restorer`` (file-system safety).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

from nixwarden.shared import base32, nar
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.fdio import write_all
from nixwarden.shared.hashes import Hash, HashAlgo, HashSink
from nixwarden.shared.storepath import ContentAddressMethod
from nixwarden.supervisor.store.restore import (CANONICAL_TIME, Restorer,
                                                remove_entry)

TEMP_NAME = "nixwarden-tmp"
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class NotRegularFile(StoreRefusal):
    """Flat (or text) content whose NAR is not a single regular file."""


@dataclass(frozen=True)
class Received:
    nar_hash: Hash
    nar_size: int
    ca_hash: Hash | None


def temp_entry_name() -> str:
    """A fresh store-path-shaped name for a temporary entry."""
    return f"{base32.encode(secrets.token_bytes(20))}-{TEMP_NAME}"


class Incoming:
    """One object being received; ``finish`` or ``abort`` exactly once."""

    def __init__(self, store_fd: int, name: str, *, nar_input: bool,
                 ca: ContentAddressMethod | None):
        self.store_fd = store_fd
        self.name = name
        self.nar_input = nar_input
        self.ca = ca
        self.ca_sink = HashSink(HashAlgo(ca.algo)) if ca and self._ca_separate() else None
        if nar_input:
            self.parser = nar.NarParser()
            self.restorer = Restorer(store_fd, name)
            self.nar_sink = HashSink(HashAlgo.SHA256)
            self.flat_seen = False
            self.root_is_directory = False
        else:
            self.file_fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=store_fd)
            self.size = 0

    def _ca_separate(self) -> bool:
        """Whether the content-address hash differs from the NAR's sha256."""
        return not (self.ca.method == "nar" and self.ca.algo == "sha256")

    def feed(self, data: bytes) -> None:
        if not self.nar_input:
            write_all(self.file_fd, data)
            self.size += len(data)
            if self.ca_sink:
                self.ca_sink.update(data)
            return
        self.nar_sink.update(data)
        if self.ca_sink and self.ca.method == "nar":
            self.ca_sink.update(data)
        for event in self.parser.feed(data):
            self._event(event)

    def _event(self, event) -> None:
        if self.ca_sink and self.ca.method != "nar":
            if isinstance(event, nar.Regular) and event.path == ():
                self.flat_seen = True
            elif isinstance(event, nar.Directory) and event.path == ():
                self.root_is_directory = True
            elif isinstance(event, nar.Contents):
                self.ca_sink.update(event.data)
        self.restorer.apply(event)

    def finish(self) -> Received:
        """Complete the entry and return what was computed.

        Raises:
            NarError: the NAR ended early.
            NotRegularFile: flat content that is not a single regular file.
        """
        if not self.nar_input:
            return self._finish_flat()
        self.parser.feed(b"")
        if self.ca_sink and self.ca.method in ("flat", "text") and not self.flat_seen:
            # A directory: CppNix reads the restored path as a file and fails
            # with read(2)'s error; a symlink, which it would follow, is
            # refused with our own words.
            raise NotRegularFile("reading from file: Is a directory" if self.root_is_directory
                                 else "flat content must be a single regular file")
        nar_hash = self.nar_sink.finish()
        ca_hash = None
        if self.ca:
            ca_hash = self.ca_sink.finish() if self.ca_sink else nar_hash
        return Received(nar_hash, self.nar_sink.size, ca_hash)

    def _finish_flat(self) -> Received:
        os.fchmod(self.file_fd, 0o444)
        os.utime(self.file_fd, CANONICAL_TIME)
        os.close(self.file_fd)
        self.file_fd = None
        nar_hash, nar_size = _nar_hash_of_entry(self.store_fd, self.name)
        ca_hash = self.ca_sink.finish() if self.ca_sink else None
        if self.ca and not self.ca_sink:
            ca_hash = nar_hash
        return Received(nar_hash, nar_size, ca_hash)

    def abort(self) -> None:
        if self.nar_input:
            self.restorer.close()
        elif self.file_fd is not None:
            os.close(self.file_fd)
        remove_entry(self.store_fd, self.name)


def _nar_hash_of_entry(store_fd: int, name: str) -> tuple[Hash, int]:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=store_fd)
    try:
        return nar.nar_hash_of_fd(fd)
    finally:
        os.close(fd)
