"""Processes the supervisor starts: the worker zygote and session processes.

* The zygote is started by exec (``python -m nixwarden.worker``) with one
  SEQPACKET control socket; the supervisor sends it one handover per
  connection (``shared.rpc.handover``) and reads nothing from it.  It is
  replaced when it exits (after too many worker crashes, it asks to be).
* Sessions are forked from the supervisor (with ``multiprocess``) before
  they hold any per-client state and wait in a small pool with the store
  database already open; each serves one connection and exits.

Only the supervisor sends descriptors.  Process: supervisor (and, after
fork, the session's start-up).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import msgspec
import multiprocess
from setproctitle import setproctitle

from nixwarden.shared import limits
from nixwarden.shared.rpc import handover
from nixwarden.supervisor.trust import Identity

log = logging.getLogger("nixwarden.spawner")

ASSIGN_TAG = b"NWSA1"
MAX_ZYGOTE_RESTARTS = 5
ZYGOTE_RESTART_WINDOW = 60.0


class ZygoteHandle:
    """The running worker zygote and its control socket."""

    def __init__(self, user: str, log_level: str):
        self.user = user
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self.ctl: socket.socket | None = None
        self.restarts: list[float] = []

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-m", "nixwarden.worker", "--ctl-fd", str(theirs.fileno()),
               "--user", self.user, "--log-level", self.log_level]
        self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], close_fds=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs.close()
        self.ctl = ours
        log.debug("started worker zygote %d", self.proc.pid)

    def handover(self, assignment: handover.Assignment, fds: list[int]) -> None:
        handover.send_handover(self.ctl, assignment, fds)

    def check(self) -> bool:
        """Restart the zygote if it exited; False when it keeps dying."""
        if self.proc is None or self.proc.poll() is None:
            return True
        log.warning("worker zygote %d exited with status %s; starting a new one",
                    self.proc.pid, self.proc.returncode)
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < ZYGOTE_RESTART_WINDOW]
        self.restarts.append(now)
        if len(self.restarts) > MAX_ZYGOTE_RESTARTS:
            return False
        self.ctl.close()
        self.start()
        return True

    def stop(self) -> None:
        if self.ctl is not None:
            self.ctl.close()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class SessionHandle:
    def __init__(self, proc, ctl: socket.socket):
        self.proc = proc
        self.ctl = ctl

    def assign(self, identity: Identity, rpc_fds: tuple[int, int]) -> None:
        """Give the session its connection: the identity and the session's
        (read, write) ends of the RPC channel."""
        payload = ASSIGN_TAG + msgspec.msgpack.encode(identity)
        socket.send_fds(self.ctl, [payload], list(rpc_fds))
        self.ctl.close()


def receive_assignment(ctl: socket.socket) -> tuple[Identity, tuple[int, int]] | None:
    """In a pooled session: wait for the supervisor's assignment."""
    msg, fds, flags, _ = socket.recv_fds(ctl, 4096, 3)
    if not msg:
        for fd in fds:
            os.close(fd)
        return None
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) != 2 \
            or not msg.startswith(ASSIGN_TAG):
        raise SystemExit("bad session assignment")
    return msgspec.msgpack.decode(msg[len(ASSIGN_TAG):], type=Identity), (fds[0], fds[1])


class SessionPool:
    """Forked session processes waiting for a connection."""

    def __init__(self, target, size: int = limits.SESSION_POOL):
        self.target = target
        self.size = size
        self.ready: list[SessionHandle] = []
        self.active: list = []
        self._ctx = multiprocess.get_context("fork")

    def _spawn(self) -> SessionHandle:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = self._ctx.Process(target=self.target, args=(theirs,), daemon=False)
        proc.start()
        theirs.close()
        return SessionHandle(proc, ours)

    def fill(self, upto: int | None = None) -> None:
        """Fork sessions until ``upto`` (default: the pool's size) are ready."""
        while len(self.ready) < (self.size if upto is None else upto):
            self.ready.append(self._spawn())

    def take(self) -> SessionHandle:
        handle = self.ready.pop(0) if self.ready else self._spawn()
        self.active.append(handle.proc)
        return handle

    def reap(self) -> None:
        self.active = [p for p in self.active if p.exitcode is None]
        alive = []
        for handle in self.ready:
            if handle.proc.exitcode is None:
                alive.append(handle)
            else:
                log.warning("pooled session %d exited with %s", handle.proc.pid,
                            handle.proc.exitcode)
                handle.ctl.close()
        self.ready = alive

    def stop(self) -> None:
        for handle in self.ready:
            handle.ctl.close()
        for proc in [h.proc for h in self.ready] + self.active:
            if proc.exitcode is None:
                proc.terminate()
        for proc in [h.proc for h in self.ready] + self.active:
            proc.join(timeout=5)
        self.ready, self.active = [], []


def title(text: str) -> None:
    setproctitle(f"nixwarden {text}")
