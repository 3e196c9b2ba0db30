"""Recursive Nix: a daemon socket inside one build (Nix 2.8's ``startDaemon``).

A derivation that requires the ``recursive-nix`` system feature (with the
experimental feature of that name enabled) finds ``NIX_REMOTE`` pointing
at ``.nix-socket`` in its build directory.  Each connection on it gets
what any client gets, with privileges separated the same way: a contained
worker (from a zygote of this build's own) speaks the protocol, and a
session process started by the build's session serves it with the
build's restricted view of the store (``session/restricted.py``).  The paths those
sessions add or build are reported back here: they become visible to later
connections of the build, appear in its sandbox, and may be referred to by
its outputs.  Process: session.

Trust: the socket belongs to the build user; everything on it is the
builder's (client-controlled) traffic, which never reaches this process.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess

from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.rpc.channel import open_pipes
from nixwarden.shared.rpc.handover import Assignment
from nixwarden.shared.version import NIX_COMPAT_VERSION
from nixwarden.supervisor.session import recursive_process
from nixwarden.supervisor.trust import Identity

log = logging.getLogger("nixwarden.build")

FEATURE = "recursive-nix"
SOCKET_NAME = ".nix-socket"


def wanted(drv) -> bool:
    """Whether ``drv`` asks for a recursive Nix daemon."""
    from nixwarden.supervisor.build.prepare import required_system_features
    return FEATURE in required_system_features(drv)


def check_available(realiser) -> None:
    """Refuse the build (before anything is set up) if this daemon cannot
    start workers for it.  (Without the experimental feature, the system
    features check has refused it already.)"""
    if realiser.session.new_zygote is None:
        raise StoreRefusal("recursive Nix is not available in this daemon")


class RecursiveDaemon:
    """The socket of one build and the sessions serving it."""

    def __init__(self, realiser, build_dir: str, build_dir_inside: str, user,
                 allowed: set[str], materialise=None):
        """
        Args:
            allowed: the build's input closure.
            materialise: ``f(path)`` that makes an added path appear in the
                build's sandbox (None when the build is not sandboxed).
        """
        session = realiser.session
        self.session = session
        self.user = user
        self.allowed = set(allowed)
        self.added: set[str] = set()
        self.materialise = materialise
        self.children: dict[subprocess.Popen, int] = {}  # session -> its report pipe
        self._partial: dict[int, bytes] = {}
        self.zygote = None
        self.path = os.path.join(build_dir, SOCKET_NAME)
        self.env = {"NIX_REMOTE": f"unix://{build_dir_inside}/{SOCKET_NAME}"}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        os.chmod(self.path, 0o600)
        if user is not None:
            os.chown(self.path, user.user.uid, user.user.gid)
        self.listener.listen(16)

    def fileno(self) -> int:
        return self.listener.fileno()

    # --- connections ------------------------------------------------------------------

    def accept(self) -> None:
        """Serve one new connection from the builder."""
        conn, _ = self.listener.accept()
        try:
            self.drain()  # paths added by earlier connections are visible to this one
            if self.zygote is None:
                self.zygote = self.session.new_zygote()
                self.zygote.start()
            self._serve(conn)
        finally:
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        uid = self.user.user.uid if self.user is not None else os.geteuid()
        gid = self.user.user.gid if self.user is not None else os.getegid()
        identity = Identity(pid=None, uid=uid, gid=gid, user=None, trusted=False)
        session_ends, worker_ends = open_pipes()
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        state_r, state_w = os.pipe2(os.O_CLOEXEC)
        own = (*session_ends, report_w, state_r)
        try:
            proc = subprocess.Popen(
                recursive_process.command(state_r, session_ends, report_w),
                pass_fds=own, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except OSError:
            for fd in (*own, *worker_ends, report_r, state_w):
                os.close(fd)
            raise
        for fd in own:
            os.close(fd)
        os.set_blocking(report_r, False)
        self.children[proc] = report_r
        try:
            with os.fdopen(state_w, "wb") as f:
                f.write(recursive_process.spawn_state(
                    self.session.layout, self.session.settings, identity,
                    self.allowed | self.added))
        except OSError as exc:  # the session died before reading its state
            log.error("recursive Nix session %d did not start: %s", proc.pid, exc)
            proc.kill()
            for fd in worker_ends:
                os.close(fd)
            return
        layout = self.session.layout
        assignment = Assignment(uid, None, False, layout.store_dir, layout.real_store_dir,
                                NIX_COMPAT_VERSION)
        try:
            self.zygote.handover(assignment, [conn.fileno(), conn.fileno(), *worker_ends])
        finally:
            for fd in worker_ends:
                os.close(fd)

    # --- what the sessions report -------------------------------------------------------

    def drain(self) -> None:
        """Take in the paths the sessions have reported so far."""
        for fd in self.children.values():
            data = self._partial.pop(fd, b"")
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                data += chunk
            *lines, rest = data.split(b"\n")
            if rest:
                self._partial[fd] = rest
            for line in lines:
                self._add(line.decode("utf-8", "surrogateescape"))

    def _add(self, path: str) -> None:
        if path in self.allowed or path in self.added:
            return
        self.session.store_path(path)  # a session reports store paths only
        self.session.temp_roots.add(path)  # kept until the outputs are registered
        self.added.add(path)
        if self.materialise is not None:
            self.materialise(path)

    # --- the end of the build -----------------------------------------------------------

    def close(self) -> set[str]:
        """End every connection of the build; return the paths added."""
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        for proc in self.children:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.children:
            proc.wait()
        self.drain()
        for fd in self.children.values():
            os.close(fd)
        self.children.clear()
        if self.zygote is not None:
            self.zygote.stop()
        return set(self.added)
