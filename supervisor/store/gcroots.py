"""Finding garbage-collector roots the way CppNix does (spec local-store §6.1).

Permanent roots (symlinks and files under ``gcroots/`` and ``profiles/``,
indirect roots one level deep, stale ``gcroots/auto`` links removed),
runtime roots (what running processes have open, mapped, as cwd or exe,
or name in their environment) and temporary roots (``temproots/<pid>``
files of live processes).  Process: session.

Trust: roots come from the file system and /proc; nothing from a client.
What a client learns is censored for untrusted ones (``FindRoots``).
"""

from __future__ import annotations

import errno
import os
import re
import stat

from nixwarden.shared.storepath import BadStorePath, StoreDir
from nixwarden.supervisor.store.locks import read_temp_roots

CENSORED = "{censored}"
_MAP_LINE = re.compile(r"^\s*\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+(/\S+)\s*$")
_IGNORED_ERRORS = (errno.EACCES, errno.ENOENT, errno.ENOTDIR, errno.ESRCH)


class RootFinder:
    def __init__(self, layout, db, log=None):
        self.layout = layout
        self.db = db
        self.store_dir = StoreDir(layout.store_dir)
        self.log = log or (lambda text: None)

    def _store_path_of(self, target: str) -> str | None:
        """The valid store path that ``target`` lies in, if any."""
        if not self.store_dir.is_in_store(target):
            return None
        try:
            path = self.store_dir.print(self.store_dir.to_store_path(target))
        except BadStorePath:
            return None
        return path if self.db.is_valid(path) else None

    # --- permanent roots -----------------------------------------------------------

    def permanent(self) -> dict[str, set[str]]:
        roots: dict[str, set[str]] = {}
        for top in (self.layout.gcroots_dir, self.layout.profiles_dir):
            self._scan(top, roots)
        return roots

    def _scan(self, path: str, roots) -> None:
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                for name in os.listdir(path):  # readdir order, as Nix's readDirectory
                    self._scan(os.path.join(path, name), roots)
            elif stat.S_ISLNK(st.st_mode):
                self._symlink_root(path, os.readlink(path), roots)
            elif stat.S_ISREG(st.st_mode):
                candidate = f"{self.store_dir}/{os.path.basename(path)}"
                if self._store_path_of(candidate) == candidate:
                    roots.setdefault(candidate, set()).add(path)
        except OSError as exc:
            if exc.errno not in _IGNORED_ERRORS:
                raise
            self.log(f"cannot read potential root '{path}'")

    def _found(self, link: str, target: str, roots) -> None:
        if not self.store_dir.is_in_store(target):
            return
        path = self._store_path_of(target)
        if path is None:
            self.log(f"skipping invalid root from '{link}' to '{target}'")
        else:
            roots.setdefault(path, set()).add(link)

    def _symlink_root(self, link: str, target: str, roots) -> None:
        if self.store_dir.is_in_store(target):
            self._found(link, target, roots)
            return
        target = os.path.normpath(os.path.join(os.path.dirname(link), target))
        if not os.path.lexists(target):
            auto = os.path.join(self.layout.gcroots_dir, "auto") + "/"
            if link.startswith(auto):
                self.log(f"removing stale link from '{link}' to '{target}'")
                os.unlink(link)
            return
        if stat.S_ISLNK(os.lstat(target).st_mode):
            target2 = os.readlink(target)
            if self.store_dir.is_in_store(target2):
                self._found(target, target2, roots)

    # --- runtime roots -------------------------------------------------------------

    def runtime(self, censor: bool) -> dict[str, set[str]]:
        unchecked: dict[str, set[str]] = {}
        env_re = re.compile(re.escape(self.layout.store_dir).encode()
                            + rb"/[0-9a-z]+[0-9a-zA-Z+\-._?=]*")
        for pid in filter(str.isdigit, os.listdir("/proc")):
            self._process_roots(f"/proc/{pid}", unchecked, env_re)
        for name in ("modprobe", "fbsplash", "poweroff_cmd"):
            _read_into(f"/proc/sys/kernel/{name}", unchecked)
        roots: dict[str, set[str]] = {}
        for target, links in unchecked.items():
            path = self._store_path_of(target)
            if path is not None:
                roots.setdefault(path, set()).update({CENSORED} if censor else links)
        return roots

    def _process_roots(self, proc: str, unchecked, env_re) -> None:
        for link in (f"{proc}/exe", f"{proc}/cwd"):
            _readlink_into(link, unchecked)
        try:
            fds = os.listdir(f"{proc}/fd")
        except OSError:
            return
        for fd in fds:
            _readlink_into(f"{proc}/fd/{fd}", unchecked)
        try:
            with open(f"{proc}/maps") as f:
                for line in f:
                    m = _MAP_LINE.match(line)
                    if m:
                        unchecked.setdefault(m.group(1), set()).add(f"{proc}/maps")
            with open(f"{proc}/environ", "rb") as f:
                for m in env_re.finditer(f.read()):
                    unchecked.setdefault(m.group().decode(errors="replace"), set()).add(
                        f"{proc}/environ")
        except OSError:
            return

    # --- temporary roots -----------------------------------------------------------

    def temporary(self, censor: bool) -> dict[str, set[str]]:
        roots: dict[str, set[str]] = {}
        for pid, paths in read_temp_roots(self.layout, remove_stale=True).items():
            for path in paths:
                roots.setdefault(path, set()).add(CENSORED if censor else f"{{temp:{pid}}}")
        return roots

    def all(self, censor: bool) -> dict[str, set[str]]:
        """What FindRoots reports: every root and where it comes from."""
        roots = self.permanent()
        for extra in (self.runtime(censor), self.temporary(censor)):
            for path, links in extra.items():
                roots.setdefault(path, set()).update(links)
        return roots


def _readlink_into(link: str, unchecked) -> None:
    try:
        unchecked.setdefault(os.readlink(link), set()).add(link)
    except OSError:
        pass


def _read_into(path: str, unchecked) -> None:
    try:
        with open(path) as f:
            unchecked.setdefault(f.read().strip(), set()).add(path)
    except OSError:
        pass
