"""The file system as a builtin builder would see it inside the sandbox.

Holds ``PathView``: maps logical paths (``/nix/store/…``) to host paths
and resolves symlinks itself, component by component, so that a builtin
builder running in the (dropped, but not namespaced) build child sees
what a sandboxed builder would: only the store paths it was given (the
input closure and its own outputs), with symlinks interpreted in the
logical name space even when the real store directory differs.  An
unrestricted view (non-sandboxed builds) maps only the given entries and
passes every other path through unchanged.

Process: the forked builder child, as the build user.

Trust: paths to resolve come from the client's derivation (env values,
symlink targets in store paths); the mapping comes from the daemon.  A
restricted view answers ``FileNotFoundError`` for anything outside it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping

#: Symlinks followed while resolving one path (Linux's limit).
MAX_SYMLINKS = 40


class PathView:
    """Logical-to-host path mapping for builtin builders.

    ``entries`` maps logical store paths (``<store>/<base>``, no slash
    after it) to host paths.  With ``restricted`` every other path is
    invisible; without, it is used as is.
    """

    def __init__(self, store_dir: str, entries: Mapping[str, str], *, restricted: bool):
        self.store_dir = store_dir
        self.entries = dict(entries)
        self.restricted = restricted

    def host(self, path: str) -> str:
        """The host path of logical ``path``, without resolving any link.

        Raises:
            FileNotFoundError: ``path`` is outside a restricted view.
        """
        prefix = self.store_dir + "/"
        if path.startswith(prefix):
            base, slash, rest = path[len(prefix):].partition("/")
            mapped = self.entries.get(prefix + base)
            if mapped is not None:
                return mapped + slash + rest
        if self.restricted:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return path

    def lstat(self, path: str) -> os.stat_result:
        return os.lstat(self.host(path))

    def canon(self, path: str) -> str:
        """``path`` made absolute and free of links (Nix's ``canonPath(p, true)``).

        Raises:
            FileNotFoundError: a component is missing or outside the view.
            NotADirectoryError: a non-final component is not a directory.
            OSError: ELOOP after ``MAX_SYMLINKS`` links.
        """
        todo = [c for c in path.split("/") if c][::-1]
        resolved, followed = "", 0
        while todo:
            comp = todo.pop()
            if comp == ".":
                continue
            if comp == "..":
                resolved = resolved.rpartition("/")[0]
                continue
            if resolved and not self._is_dir(resolved):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), resolved)
            candidate = resolved + "/" + comp
            if (self.store_dir + "/").startswith(candidate + "/"):
                resolved = candidate  # the store directory and its parents
                continue
            st = self.lstat(candidate)
            if not stat.S_ISLNK(st.st_mode):
                resolved = candidate
                continue
            followed += 1
            if followed > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(self.host(candidate))
            todo.extend([c for c in target.split("/") if c][::-1])
            if target.startswith("/"):
                resolved = ""
        return resolved or "/"

    def _is_dir(self, path: str) -> bool:
        if (self.store_dir + "/").startswith(path + "/"):
            return True
        return stat.S_ISDIR(self.lstat(path).st_mode)

    def stat(self, path: str) -> os.stat_result:
        """``stat`` (following links) of logical ``path``."""
        return os.lstat(self.host(self.canon(path)))

    def resolve(self, path: str) -> str:
        """The host path of ``path`` with every link resolved in the view."""
        return self.host(self.canon(path))
