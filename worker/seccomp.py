"""The worker's seccomp filter, through libseccomp (when it is installed).

The filter refuses with EPERM what a protocol worker never needs: running
programs, creating sockets, opening files for writing or creating them,
changing the file system (mkdir, unlink, rename, link, chmod, chown,
truncate), tracing, and mounting.  Reading files stays allowed: a worker
reads the store to serve NarFromPath.  Process: workers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7

DENIED = (
    "execve", "execveat", "socket", "socketpair", "connect", "bind", "listen",
    "accept", "accept4", "ptrace", "process_vm_writev", "mount", "umount2",
    "mkdir", "mkdirat", "unlink", "unlinkat", "rename", "renameat", "renameat2",
    "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat",
    "chown", "fchown", "fchownat", "lchown", "truncate", "ftruncate", "creat",
    "setuid", "setgid", "setgroups", "setreuid", "setregid", "setresuid",
    "setresgid", "unshare", "setns", "keyctl", "add_key", "bpf",
)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


_lib = None


def preload() -> None:
    """Find and load libseccomp now, in the zygote, while searching is possible.

    ``find_library`` runs helper programs and writes temporary files,
    which a contained worker can no longer do.
    """
    global _lib
    if _lib is None:
        _lib = _load()


def _load():
    name = ctypes.util.find_library("seccomp")
    if not name:
        return False
    lib = ctypes.CDLL(name)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
        ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _add(lib, ctx, name: str, cmps=()) -> None:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return  # not on this architecture
    arr = (_ArgCmp * max(1, len(cmps)))(*cmps)
    rc = lib.seccomp_rule_add_array(ctx, _errno_action(errno.EPERM), nr, len(cmps), arr)
    if rc != 0:
        raise OSError(-rc, f"seccomp rule for {name}")


def _open_rules(lib, ctx) -> None:
    """Refuse open/openat with a write access mode or O_CREAT/O_TRUNC."""
    for name, flag_arg in (("open", 1), ("openat", 2)):
        for mask, datum in ((os.O_ACCMODE, os.O_WRONLY), (os.O_ACCMODE, os.O_RDWR),
                            (os.O_CREAT, os.O_CREAT), (os.O_TRUNC, os.O_TRUNC)):
            _add(lib, ctx, name, [_ArgCmp(flag_arg, SCMP_CMP_MASKED_EQ, mask, datum)])
    _add(lib, ctx, "openat2")  # its flags live in a struct: refuse it whole


def install() -> tuple[bool, str]:
    """Load the filter into this process; return (active, detail)."""
    lib = _lib
    if not lib:
        return False, "libseccomp not installed" if lib is False else "libseccomp not loaded"
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        return False, "seccomp_init failed"
    try:
        for name in DENIED:
            _add(lib, ctx, name)
        _open_rules(lib, ctx)
        rc = lib.seccomp_load(ctx)
        if rc != 0:
            return False, f"seccomp_load failed: {os.strerror(-rc)}"
    except OSError as exc:
        return False, str(exc)
    finally:
        lib.seccomp_release(ctx)
    return True, f"{len(DENIED) + 9} rules"
