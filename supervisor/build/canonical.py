"""Canonical metadata for store objects (spec local-store §4.2).

After a build every file of an output is owned by the store's owner
(the daemon's uid and gid), has mode 0444 or 0555 (directories 0555),
and mtime 1.  Nothing is followed: symlinks keep their targets and get
only their own times set.  Process: session.

Trust: the tree was written by a builder (client-controlled code running
as a build user); only regular files, directories and symlinks are
accepted, and files not owned by the build user are refused.
"""

from __future__ import annotations

import os
import stat

from nixwarden.shared.errors import StoreRefusal


def canonicalise(path: str, *, from_uid: int | None) -> None:
    """Make ``path`` (recursively) canonical; refuse odd file types or owners.

    Args:
        from_uid: the build user's uid; files owned by anyone else (except
            the daemon itself) are refused, as Nix does.
    """
    _canonicalise_one(path, None, from_uid)
    if stat.S_ISDIR(os.lstat(path).st_mode):
        for root, dirs, files, root_fd in os.fwalk(path, topdown=False):
            for name in dirs + files:
                _canonicalise_one(name, root_fd, from_uid)
        _canonicalise_one(path, None, from_uid)


def _canonicalise_one(name: str, dir_fd: int | None, from_uid: int | None) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    mode = st.st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        raise StoreRefusal(f"file '{name}' has an unsupported type")
    euid, egid = os.geteuid(), os.getegid()
    if from_uid is not None and st.st_uid not in (from_uid, euid):
        raise StoreRefusal(f"invalid ownership on file '{name}'")
    if not stat.S_ISLNK(mode):
        want = 0o555 if stat.S_ISDIR(mode) or mode & 0o111 else 0o444
        if stat.S_IMODE(mode) != want:
            os.chmod(name, want, dir_fd=dir_fd)
    if st.st_uid != euid or st.st_gid != egid:
        os.chown(name, euid, egid, dir_fd=dir_fd, follow_symlinks=False)
    os.utime(name, (1, 1), dir_fd=dir_fd, follow_symlinks=False)
