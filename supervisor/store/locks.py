"""File locks and temporary GC roots compatible with CppNix 2.8 (spec §3).

Holds:

* ``open_lock_file`` / ``flock``: the primitives (BSD ``flock``, never POSIX
  record locks; lock files opened ``O_RDWR|O_CREAT|O_CLOEXEC``, mode 0600).
* ``PathLock`` / ``lock_paths``: ``<path>.lock`` files with the "d"
  staleness protocol (§3.3).
* ``gc_lock``: ``<state>/gc.lock`` (§3.2).
* ``TempRoots``: this process's ``<state>/temproots/<pid>`` file and the
  protocol for adding a root while a real ``nix-store --gc`` runs (§3.5).
* ``read_temp_roots``: the temp roots of all live processes, for the GC.

Runs in the supervisor process (workers never lock or write the store).

Trust: lock and temp-root files live in directories writable only by the
store owner.  Other processes' temp-root files are read as untrusted text:
their contents are returned as strings and must be parsed as store paths by
the caller before use; non-numeric file names are skipped.  The GC socket is
created by a real Nix GC running as the store owner.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from typing import Iterator

from nixwarden.shared.fdio import write_all
from nixwarden.supervisor.store.layout import StoreLayout

log = logging.getLogger(__name__)

#: Pause before retrying when a GC holds gc.lock but its socket is not up yet.
_GC_SOCKET_RETRY_SECONDS = 0.01


def open_lock_file(path: str, create: bool = True) -> int | None:
    """Open a lock file like Nix's ``openLockFile``.

    Returns the descriptor, or None if ``create`` is false and the file
    does not exist.
    """
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        if create:
            raise
        return None


def flock(fd: int, exclusive: bool, wait: bool) -> bool:
    """Take a shared or exclusive flock; False if ``wait`` is off and busy."""
    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    if not wait:
        op |= fcntl.LOCK_NB
    try:
        fcntl.flock(fd, op)
    except BlockingIOError:
        return False
    return True


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


# -- path locks (§3.3) -------------------------------------------------------


class PathLock:
    """Exclusive locks on ``<p>.lock`` for a set of real store paths.

    Locks are taken in sorted order (no deadlocks between processes that
    lock overlapping sets).  With ``delete_on_release`` (the usual case, as
    Nix's ``setDeletion(true)``) each lock file is unlinked and marked
    stale with a ``d`` on release.  Usable as a context manager.
    """

    def __init__(self, real_paths: list[str], *, delete_on_release: bool = True):
        self.paths = sorted(set(real_paths))
        self.delete_on_release = delete_on_release
        self._held: list[tuple[int, str]] = []

    def acquire(self, wait: bool = True) -> bool:
        """Lock every path; without ``wait`` give up (holding none) if busy."""
        assert not self._held, "PathLock already held"
        for path in self.paths:
            fd = _lock_one(path + ".lock", wait)
            if fd is None:
                self._release(delete=False)
                return False
            self._held.append((fd, path + ".lock"))
        return True

    def release(self) -> None:
        self._release(delete=self.delete_on_release)

    def _release(self, delete: bool) -> None:
        held, self._held = self._held, []
        for fd, lock_path in held:
            try:
                if delete:
                    _mark_deleted(fd, lock_path)
            finally:
                os.close(fd)

    @property
    def held(self) -> bool:
        return bool(self._held) or not self.paths

    def __enter__(self) -> "PathLock":
        if not self._held:
            self.acquire(wait=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_paths(real_paths: list[str], wait: bool = True,
               *, delete_on_release: bool = True) -> PathLock | None:
    """Lock ``real_paths``; returns the held lock, or None (only if not ``wait``)."""
    lock = PathLock(real_paths, delete_on_release=delete_on_release)
    return lock if lock.acquire(wait) else None


def _lock_one(lock_path: str, wait: bool) -> int | None:
    """Open and exclusively lock one lock file, skipping stale ones."""
    while True:
        fd = open_lock_file(lock_path, create=True)
        assert fd is not None
        if not flock(fd, exclusive=True, wait=False):
            if not wait:
                os.close(fd)
                return None
            log.info("waiting for lock on '%s'", lock_path)
            flock(fd, exclusive=True, wait=True)
        if os.fstat(fd).st_size == 0:
            return fd
        # The previous holder unlinked the file and wrote "d": whoever
        # opens the path now gets a fresh file, so our lock means nothing.
        os.close(fd)


def _mark_deleted(fd: int, path: str) -> None:
    """Unlink a held lock file and write the stale marker ``d`` into it."""
    try:
        os.unlink(path)
    except OSError:
        pass  # removing the file is an optimisation (as in Nix)
    os.write(fd, b"d")


# -- GC lock (§3.2) ----------------------------------------------------------


@contextlib.contextmanager
def gc_lock(layout: StoreLayout, exclusive: bool, wait: bool = True) -> Iterator[bool]:
    """Hold ``<state>/gc.lock``; yields whether it was acquired.

    With ``wait`` (the default) it blocks and always yields True.
    """
    fd = open_lock_file(layout.gc_lock_path, create=True)
    assert fd is not None
    try:
        acquired = flock(fd, exclusive, wait=False)
        if not acquired and wait:
            log.info("waiting for the big garbage collector lock...")
            acquired = flock(fd, exclusive, wait=True)
        yield acquired
    finally:
        os.close(fd)


# -- temporary roots (§3.5) ---------------------------------------------------


class TempRoots:
    """This process's temporary GC roots (``<state>/temproots/<pid>``).

    Thread-safe.  The file is created on the first ``add`` and kept open
    with an exclusive flock until ``close`` (which unlinks it).  After a
    ``fork`` the child starts its own file on its next ``add``.
    """

    def __init__(self, layout: StoreLayout):
        self.layout = layout
        self._mutex = threading.Lock()
        self._pid = 0
        self._fd: int | None = None
        self._gc_fd: int | None = None
        self._sock: socket.socket | None = None
        self._added: set[str] = set()

    @property
    def file_path(self) -> str:
        return f"{self.layout.temproots_dir}/{os.getpid()}"

    def add(self, path_full: str) -> None:
        """Protect ``path_full`` (a full logical store path) from any GC."""
        if "\0" in path_full or "\n" in path_full:
            raise ValueError("store path contains NUL or newline")
        with self._mutex:
            self._check_fork()
            if self._fd is None:
                self._fd = self._create_file()
                self._pid = os.getpid()
            if self._gc_fd is None:
                self._gc_fd = open_lock_file(self.layout.gc_lock_path, create=True)
            if path_full in self._added:
                return  # already in our file, which every later GC reads
            self._add_locked(path_full)
            self._added.add(path_full)

    def _add_locked(self, path_full: str) -> None:
        assert self._fd is not None and self._gc_fd is not None
        record = path_full.encode() + b"\0"
        while True:
            if flock(self._gc_fd, exclusive=False, wait=False):
                # No GC can start while we hold gc.lock shared, and a GC
                # reads all temproots files after taking it exclusively.
                try:
                    write_all(self._fd, record)
                finally:
                    unlock(self._gc_fd)
                self._drop_socket()
                return
            # A GC is running: it only learns of new roots via its socket.
            if self._tell_gc(path_full):
                write_all(self._fd, record)
                return
            time.sleep(_GC_SOCKET_RETRY_SECONDS)

    def _tell_gc(self, path_full: str) -> bool:
        """Send the root to the running GC; False means "start over"."""
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock = sock
                sock.connect(self.layout.gc_socket_path)
            self._sock.sendall(path_full.encode() + b"\n")
            ack = self._sock.recv(1)
        except OSError as e:
            # ECONNREFUSED/ENOENT: the GC has exited or not yet created its
            # socket; EPIPE/ECONNRESET: it went away after we connected.
            log.debug("GC socket: %s", e)
            self._drop_socket()
            return False
        if ack != b"1":
            self._drop_socket()
            return False
        return True

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _create_file(self) -> int:
        """Create and exclusively lock our temproots file (Nix's loop)."""
        fn = self.file_path
        while True:
            try:
                os.unlink(fn)  # it must be stale: pids are unique
            except FileNotFoundError:
                pass
            fd = open_lock_file(fn, create=True)
            assert fd is not None
            flock(fd, exclusive=True, wait=True)
            st = os.fstat(fd)
            # A GC that found the file unlocked unlinked it and wrote "d".
            if st.st_size == 0 and st.st_nlink > 0 and _same_file(fn, st):
                return fd
            os.close(fd)

    def _check_fork(self) -> None:
        if self._fd is not None and self._pid != os.getpid():
            # The parent owns that file and its lock; do not unlink it.
            os.close(self._fd)
            self._fd = None
            self._added.clear()
            self._drop_socket()

    def close(self) -> None:
        """Release all temp roots (unlink our file)."""
        with self._mutex:
            if self._fd is not None:
                if self._pid == os.getpid():
                    try:
                        os.unlink(f"{self.layout.temproots_dir}/{self._pid}")
                    except FileNotFoundError:
                        pass
                os.close(self._fd)
                self._fd = None
                self._added.clear()
            if self._gc_fd is not None:
                os.close(self._gc_fd)
                self._gc_fd = None
            self._drop_socket()

    def __enter__(self) -> "TempRoots":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        cur = os.stat(path)
    except FileNotFoundError:
        return False
    return (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino)


def read_temp_roots(layout: StoreLayout, *, remove_stale: bool = False) -> dict[int, set[str]]:
    """Temp roots of live processes: pid -> set of paths as written.

    A file whose exclusive lock can be taken belongs to a dead process: it
    is skipped (and with ``remove_stale`` unlinked and marked ``d``, as
    Nix's GC does).  Our own file counts as live.
    """
    result: dict[int, set[str]] = {}
    try:
        names = os.listdir(layout.temproots_dir)
    except FileNotFoundError:
        return result
    for name in names:
        if name.startswith(".") or not name.isdigit():
            continue
        roots = _read_one(f"{layout.temproots_dir}/{name}", remove_stale)
        if roots is not None:
            result[int(name)] = roots
    return result


def _read_one(path: str, remove_stale: bool) -> set[str] | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if flock(fd, exclusive=True, wait=False):
            if remove_stale:
                log.info("removing stale temporary roots file '%s'", path)
                _mark_deleted(fd, path)
            return None
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
    finally:
        os.close(fd)
    # Only NUL-terminated entries count (a partial trailing write does not).
    return {p.decode("utf-8", "surrogateescape") for p in data.split(b"\0")[:-1]}
