"""Build users: the pool of accounts builders run as (spec §3.4, §8.5).

Holds ``BuildUser`` (who a builder runs as), ``acquire_build_user`` (take
the first free member of ``build-users-group`` with an exclusive,
non-blocking ``flock`` on ``<userpool_dir>/<uid>``, as Nix 2.8's
``UserLock::findFreeUser``), ``BuildUserLock`` (holds that lock until
``release``), ``become_build_user`` (the identity drop done in a forked
builder child) and ``kill_user_processes`` (Nix's ``killUser``: a child
that switches to the uid and sends ``kill(-1, SIGKILL)``).

Lock files are the same as CppNix's, so nixwarden and a real ``nix-daemon``
sharing one state directory never hand out the same uid at once.

Process: session (root).  ``become_build_user`` runs in the forked builder
child; ``kill_user_processes`` forks a short-lived child of its own.

Trust: the group and user databases and the userpool directory belong to
the administrator; nothing here reads client input.  The uid handed to
``kill_user_processes`` must come from a ``BuildUser`` (never from a
client); uid 0 and the daemon's own uid are refused.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import signal
from dataclasses import dataclass

from nixwarden.shared.errors import StoreRefusal
from nixwarden.supervisor.store.locks import flock, open_lock_file


class BuildUserError(StoreRefusal):
    """The build-users configuration is unusable (texts as Nix 2.8's lock.cc)."""


@dataclass(frozen=True)
class BuildUser:
    """An account a builder runs as.

    ``gid`` is the ``build-users-group`` gid (not the user's primary group),
    as in Nix; ``supplementary_gids`` is the user's group list (e.g. ``kvm``).
    """

    name: str
    uid: int
    gid: int
    supplementary_gids: tuple[int, ...]


class BuildUserLock:
    """An acquired build user; the uid is in use until ``release``.

    The lock is an ``flock`` on an open file description, so it is held per
    open (two acquisitions in one process exclude each other too) and goes
    away when the descriptor is closed, including when the process dies.
    """

    def __init__(self, user: BuildUser, fd: int, path: str):
        self.user = user
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the uid back to the pool (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "BuildUserLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def build_group_members(group: str) -> tuple[int, list[str]]:
    """The gid and member names (in ``/etc/group`` order) of ``group``.

    Raises:
        BuildUserError: the group does not exist or has no members.
    """
    try:
        gr = grp.getgrnam(group)
    except KeyError:
        raise BuildUserError(
            f"the group '{group}' specified in 'build-users-group' does not exist") from None
    if not gr.gr_mem:
        raise BuildUserError(f"the build users group '{group}' has no members")
    return gr.gr_gid, list(gr.gr_mem)


def acquire_build_user(group: str, userpool_dir: str, *,
                       exclude_uid: int) -> BuildUserLock | None:
    """Lock the first free member of ``group`` (spec §8.5).

    Args:
        group: the ``build-users-group`` setting (non-empty).
        userpool_dir: ``<global state dir>/userpool``; created if missing.
        exclude_uid: the daemon's own uid, which must not be a build user.

    Returns:
        The held lock, or None when every member is busy (the caller waits
        and retries, as Nix does).

    Raises:
        BuildUserError: no such group, no members, a member without a
            passwd entry, or the member locked is ``exclude_uid``.
        OSError: the userpool directory or a lock file cannot be opened.
    """
    gid, members = build_group_members(group)
    os.makedirs(userpool_dir, mode=0o755, exist_ok=True)
    for name in members:
        pw = _getpwnam(name, group)
        path = f"{userpool_dir}/{pw.pw_uid}"
        fd = open_lock_file(path)
        if not flock(fd, exclusive=True, wait=False):
            os.close(fd)
            continue
        lock = BuildUserLock(_build_user(pw, gid), fd, path)
        if pw.pw_uid in (exclude_uid, 0):
            lock.release()
            raise BuildUserError(f"the Nix user should not be a member of '{group}'")
        return lock
    return None


def _getpwnam(name: str, group: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise BuildUserError(
            f"the user '{name}' in the group '{group}' does not exist") from None


def _build_user(pw: pwd.struct_passwd, gid: int) -> BuildUser:
    try:
        groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        raise BuildUserError(
            f"failed to get list of supplementary groups for '{pw.pw_name}'") from None
    return BuildUser(pw.pw_name, pw.pw_uid, gid, groups)


def become_build_user(user: BuildUser) -> None:
    """Drop the calling process (a forked builder child, root) to ``user``.

    Order as Nix's ``runChild``: supplementary groups, gid, uid; then
    check that root cannot be regained.

    Raises:
        OSError: a step failed; the child must exit without running anything.
    """
    os.setgroups(list(user.supplementary_gids))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError(errno.EPERM, f"could regain root after dropping to '{user.name}'")


def kill_user_processes(uid: int) -> None:
    """Kill every process running as ``uid`` (Nix's ``killUser``).

    A forked child sets its uid to ``uid`` and sends ``kill(-1, SIGKILL)``
    until nothing is left to signal; ``kill(-1)`` spares the sender itself.
    Root's processes cannot be reached from that uid.

    Raises:
        ValueError: ``uid`` is 0 or this process's own uid.
        OSError: the killer child failed (e.g. not running as root).
    """
    if uid == 0 or uid in (os.getuid(), os.geteuid()):
        raise ValueError(f"refusing to kill all processes of uid {uid}")
    pid = os.fork()
    if pid == 0:
        os._exit(_killer_child(uid))
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(f"cannot kill processes for uid '{uid}': killer exited with {status:#x}")


def _killer_child(uid: int) -> int:
    """Body of the killer child: returns its exit status, never raises."""
    try:
        os.setuid(uid)
        while True:
            try:
                os.kill(-1, signal.SIGKILL)
                return 0
            except InterruptedError:
                continue
            except (ProcessLookupError, PermissionError):
                return 0  # nothing (more) to kill
    except BaseException:
        return 1
