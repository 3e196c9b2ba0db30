"""Containment of worker processes (DESIGN.md §2 rule 2, STYLE.md 1.8).

``contain_zygote`` runs once in the freshly exec'd zygote, while it is
still root: new network and IPC namespaces, then groups, gid and uid
dropped to the worker account, a regain attempt that must fail,
no_new_privs and not-dumpable.  ``contain_worker`` runs in each forked
worker once it holds its client: only its own descriptors left open,
resource limits, and a seccomp filter.  Each layer is logged as active or
inactive; a required layer that fails ends the process with a distinct
exit code.  Process: worker zygote and workers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import pwd
import resource

from nixwarden.shared import limits

log = logging.getLogger("nixwarden.containment")

EXIT_DROP_FAILED = 70
EXIT_REGAINED = 71
EXIT_PRCTL_FAILED = 72

PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class ContainmentError(SystemExit):
    pass


def _layer(name: str, active: bool, detail: str = "") -> None:
    log.info("containment layer %-16s %s%s", name,
             "active" if active else "inactive", f" ({detail})" if detail else "")


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        log.error("prctl(%d) failed: %s", option, os.strerror(err))
        raise ContainmentError(EXIT_PRCTL_FAILED)


def unshare_namespaces() -> None:
    """New network and IPC namespaces, where the kernel allows it."""
    if _libc.unshare(CLONE_NEWNET | CLONE_NEWIPC) == 0:
        _layer("namespaces", True, "net, ipc")
    else:
        _layer("namespaces", False, os.strerror(ctypes.get_errno()))


def drop_to(user: str) -> None:
    """setgroups([]), setgid, setuid to ``user``; prove the old ids are gone."""
    try:
        pw = pwd.getpwnam(user)
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    except (KeyError, OSError) as exc:
        log.error("cannot drop privileges to %r: %s", user, exc)
        raise ContainmentError(EXIT_DROP_FAILED) from None
    for regain in (lambda: os.setuid(0), lambda: os.setgid(0),
                   lambda: os.setgroups([0])):
        try:
            regain()
        except PermissionError:
            continue
        log.error("regained root after dropping privileges")
        raise ContainmentError(EXIT_REGAINED)
    if set(os.getresuid()) != {pw.pw_uid} or set(os.getresgid()) != {pw.pw_gid}:
        raise ContainmentError(EXIT_REGAINED)
    _layer("uid/gid", True, f"{user} uid={pw.pw_uid} gid={pw.pw_gid}, no groups")


def contain_zygote(user: str) -> None:
    """Apply the process-wide layers; called before any worker is forked."""
    from nixwarden.worker import seccomp
    seccomp.preload()
    if os.geteuid() == 0:
        unshare_namespaces()
        drop_to(user)
    else:
        _layer("namespaces", False, "daemon not root")
        _layer("uid/gid", False, f"daemon runs as uid {os.geteuid()}")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _layer("no_new_privs", True)
    _prctl(PR_SET_DUMPABLE, 0)
    _layer("not-dumpable", True)


def close_other_fds(keep: set[int]) -> None:
    """Close every descriptor not in ``keep``; 0 and 1 become /dev/null, so
    no descriptor received later lands where stdin/stdout are expected."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for fd in (0, 1):
        if fd not in keep:
            os.dup2(devnull, fd)
    os.close(devnull)
    keep = keep | {0, 1}
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def set_rlimits() -> None:
    """No new processes, no core dumps, bounded memory and descriptors.

    (No RLIMIT_FSIZE: stderr may be a log file; writes are refused by the
    seccomp filter's open rules and by the worker's uid instead.)
    """
    for res, value in ((resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_NOFILE, limits.WORKER_RLIMIT_NOFILE),
                       (resource.RLIMIT_AS, limits.WORKER_RLIMIT_AS)):
        soft, hard = resource.getrlimit(res)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))


def contain_worker(keep: set[int], *, quiet: bool = True) -> None:
    """Per-worker layers, applied in each pooled worker before its handover
    (``keep``: stderr and the handover socket)."""
    close_other_fds(keep)
    set_rlimits()
    from nixwarden.worker import seccomp
    active, detail = seccomp.install()
    if not active:
        log.warning("seccomp filter inactive: %s", detail)
    if not quiet:
        _layer("rlimits", True)
        _layer("seccomp", active, detail)
