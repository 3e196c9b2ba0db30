"""Starting a builder process: pseudo-terminal, session, identity, exec.

The child becomes a session leader, gets ``/dev/null`` as stdin and the
pty's slave as stdout and stderr, enters the build directory, drops to
the build user (when there is one), closes every other descriptor and
execs the builder (or bubblewrap, or runs a ``builtin:`` builder in
process).  Process: session (parent) and the forked builder child.

Trust: the builder and its arguments come from a client's derivation;
the child runs them only after giving up the daemon's identity.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import traceback
import tty
from dataclasses import dataclass

from nixwarden.shared.logtypes import ANSI_NORMAL, ANSI_WARNING


@dataclass(frozen=True)
class Launch:
    argv: list[str]  # argv[0] is the program to exec
    env: dict[str, str]
    cwd: str
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    builtin: object = None  # callable run in the child instead of exec
    after_exit: object = None  # callable run by the session once the builder exited


def start(launch: Launch) -> tuple[int, int]:
    """Start the builder; return (pid, pty master fd).

    A builder that keeps the daemon's identity is started with vfork+exec
    (``subprocess``): forking the session, a large Python process, costs
    several milliseconds a build.  Changing identity or running a builtin
    builder needs a forked child (below); so does reporting an exec
    failure into the build log.
    """
    master, slave = os.openpty()
    tty.setraw(slave)
    pid = _spawn(launch, slave) if launch.uid is None and launch.builtin is None else None
    if pid is None:
        pid = os.fork()
        if pid == 0:
            os.close(master)
            _child(launch, slave)
    os.close(slave)
    os.set_blocking(master, False)
    return pid, master


def _spawn(launch: Launch, slave: int) -> int | None:
    """vfork+exec the builder as ``_child`` would; None if exec failed."""
    _no_core_dumps()
    try:
        proc = subprocess.Popen(
            [os.path.basename(launch.argv[0])] + launch.argv[1:], executable=launch.argv[0],
            env=launch.env, cwd=launch.cwd, stdin=subprocess.DEVNULL, stdout=slave,
            stderr=slave, start_new_session=True, close_fds=True)
    except OSError:
        return None
    # The job reaps it with waitpid; keep subprocess from reaping it too.
    proc.returncode = 0
    return proc.pid


def exec_failure(program: str, reason: str) -> bytes:
    """What a Nix 2.8 builder child writes when exec fails: ``\\1`` and a
    newline, then the error serialised as on the worker protocol.  (Nix's
    parent parses it only for sandboxed builds, so with ``sandbox = false``
    the raw bytes are what its build log shows; so do ours.)"""
    hint = (f"executing '{ANSI_WARNING}{program}{ANSI_NORMAL}': "
            f"{ANSI_WARNING}{reason}{ANSI_NORMAL}")
    frame = (_text("Error") + _u64(0) + _text("Error") + _text(hint)  # type, level, name, msg
             + _u64(0) + _u64(0))  # no position, no traces
    return b"\x01\n" + frame


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "little")


def _text(text: str) -> bytes:
    """A Nix serialised string (the supervisor never imports the client wire codec)."""
    data = text.encode(errors="surrogateescape")
    return _u64(len(data)) + data + bytes(-len(data) % 8)


def _no_core_dumps() -> None:
    """Builders never dump core: set once in the session, inherited by each."""
    if resource.getrlimit(resource.RLIMIT_CORE) != (0, 0):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _child(launch: Launch, slave: int) -> None:
    code = 1
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(slave, 1)
        os.dup2(slave, 2)
        os.closerange(3, 1 << 16)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.chdir(launch.cwd)
        if launch.uid is not None:
            os.setgroups(list(launch.groups))
            os.setgid(launch.gid)
            os.setuid(launch.uid)
        if launch.builtin is not None:
            code = launch.builtin()
        else:
            argv = [os.path.basename(launch.argv[0])] + launch.argv[1:]
            try:
                os.execve(launch.argv[0], argv, launch.env)
            except OSError as exc:
                os.write(2, exec_failure(launch.argv[0], exc.strerror or str(exc)))
                code = 1
    except BaseException as exc:  # report to the build log, never return
        try:
            msg = f"error: {exc}\n" if isinstance(exc, OSError) else traceback.format_exc()
            os.write(2, msg.encode(errors="replace"))
        except OSError:
            pass
    finally:
        sys.stdout.flush() if sys.stdout else None
        os._exit(code if isinstance(code, int) else 1)
