"""The hardened NAR restorer: NAR events into a new entry of the store directory.

Everything is created relative to directory descriptors, with
``O_NOFOLLOW``/``O_EXCL`` and never through a path string, so no name in
a NAR can reach outside the entry being built; symlinks are created as
data and never followed.  Metadata is canonical as it is written (files
0444 or 0555, directories 0555, mtime 1; ownership is the daemon's).
The events come from ``shared.nar.NarParser``, which has already checked
names, order, lengths and depth.  Process: session.

Trust: the NAR comes from a client through a worker and is hostile; the
parser rejects malformed input and this module adds the file-system side:
no following, no overwriting, no path strings.
"""

from __future__ import annotations

import os
import stat
import threading

from nixwarden.shared import nar
from nixwarden.shared.fdio import write_all

CANONICAL_TIME = (1, 1)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Restorer:
    """Builds the NAR's root as ``name`` inside the directory ``parent_fd``."""

    def __init__(self, parent_fd: int, name: str):
        self.parent_fd = parent_fd
        self.name = name
        self._dirs: list[tuple[tuple, int]] = []  # (path, fd), innermost last
        self._file: int | None = None
        self._file_mode = 0o444

    def _locate(self, path: tuple) -> tuple[int, str]:
        """Close finished directories; return (directory fd, leaf name) for ``path``."""
        while self._dirs and self._dirs[-1][0] != path[:-1]:
            self._finish_dir()
        if not path:
            return self.parent_fd, self.name
        if not self._dirs:
            raise nar.NarError("NAR entry outside its directory")
        return self._dirs[-1][1], path[-1]

    def _finish_dir(self) -> None:
        _, fd = self._dirs.pop()
        os.fchmod(fd, 0o555)
        os.utime(fd, CANONICAL_TIME)
        os.close(fd)

    def apply(self, event) -> None:
        """Apply one parser event to the file system."""
        if isinstance(event, nar.Contents):
            write_all(self._file, event.data)
        elif isinstance(event, nar.ContentsEnd):
            os.fchmod(self._file, self._file_mode)
            os.utime(self._file, CANONICAL_TIME)
            os.close(self._file)
            self._file = None
        elif isinstance(event, nar.Regular):
            dir_fd, leaf = self._locate(event.path)
            self._file = os.open(leaf, _FILE_FLAGS, 0o600, dir_fd=dir_fd)
            self._file_mode = 0o555 if event.executable else 0o444
        elif isinstance(event, nar.Directory):
            dir_fd, leaf = self._locate(event.path)
            os.mkdir(leaf, 0o700, dir_fd=dir_fd)
            self._dirs.append((event.path, os.open(leaf, _DIR_FLAGS, dir_fd=dir_fd)))
        elif isinstance(event, nar.Symlink):
            dir_fd, leaf = self._locate(event.path)
            os.symlink(event.target, leaf, dir_fd=dir_fd)
            os.utime(leaf, CANONICAL_TIME, dir_fd=dir_fd, follow_symlinks=False)
        elif isinstance(event, nar.End):
            while self._dirs:
                self._finish_dir()

    def close(self) -> None:
        """Release descriptors (after an error); the entry is left for removal."""
        if self._file is not None:
            os.close(self._file)
            self._file = None
        for _, fd in self._dirs:
            os.close(fd)
        self._dirs = []


def remove_entry(parent_fd: int, name: str) -> int:
    """Delete ``name`` in ``parent_fd`` whatever it is, without following
    links, and return the bytes that frees as Nix counts them: the sizes
    of the non-directories with at most two links (the last link, or the
    last but the store's ``.links`` entry).

    One pass over the tree, by directory descriptors (an explicit stack,
    however deep the tree); a non-root daemon first makes each directory
    writable (the store keeps them read-only)."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return _unlink_counted(parent_fd, name, st)
    make_writable = os.geteuid() != 0
    freed = 0
    stack: list[tuple[int, str, int, list]] = []  # (parent fd, name, fd, entries left)

    def enter(pfd: int, dname: str) -> None:
        fd = os.open(dname, _DIR_FLAGS, dir_fd=pfd)
        try:
            if make_writable:
                os.fchmod(fd, 0o700)
            with os.scandir(fd) as it:
                entries = list(it)
        except BaseException:
            os.close(fd)
            raise
        stack.append((pfd, dname, fd, entries))

    enter(parent_fd, name)
    try:
        while stack:
            pfd, dname, fd, entries = stack[-1]
            while entries:
                entry = entries.pop()
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    enter(fd, entry.name)
                    break
                freed += _unlink_counted(fd, entry.name, st)
            else:
                stack.pop()
                os.close(fd)
                os.rmdir(dname, dir_fd=pfd)
    finally:
        for _, _, fd, _ in stack:
            os.close(fd)
    return freed


def remove_path(path: str) -> int:
    """``remove_entry`` for the last component of ``path`` in its directory."""
    parent, name = os.path.split(path)
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return remove_entry(parent_fd, name)
    finally:
        os.close(parent_fd)


#: Held from the link count's reading to the unlink for files with more
#: than one link: two threads removing two links of one file (the GC's
#: trash threads, after ``--optimise``) must not both see the other link
#: still there, or neither would count the file as freed.
_LINKED = threading.Lock()


def _unlink_counted(dir_fd: int, name: str, st: os.stat_result) -> int:
    """Unlink ``name``; return the bytes that frees as Nix counts them: the
    size of a file with at most two links left (the last one, or the last
    but the store's ``.links`` entry)."""
    if st.st_nlink == 1:
        os.unlink(name, dir_fd=dir_fd)
        return st.st_size
    with _LINKED:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        os.unlink(name, dir_fd=dir_fd)
    return st.st_size if st.st_nlink <= 2 else 0
