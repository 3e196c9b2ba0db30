"""The worker zygote: receives handovers and forks one worker per connection.

Started by exec from the supervisor (``python -m nixwarden.worker``), it
drops its privileges (``containment.contain_zygote``) before any worker
exists, never opens the store, and never reads a client byte.  It keeps a
few workers forked and waiting so that no fork sits on a connection's
critical path, passes each handover to one of them, reaps them, and after
too many worker crashes exits with ``EXIT_REPLACE`` so the supervisor
execs a fresh zygote (a crash probe then learns nothing about the next
zygote's memory layout).  Process: worker zygote.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import socket

from setproctitle import setproctitle

from nixwarden.shared import limits
from nixwarden.shared.rpc import handover

log = logging.getLogger("nixwarden.zygote")

EXIT_REPLACE = 75
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT,
                 signal.SIGSYS, signal.SIGFPE}


class Zygote:
    def __init__(self, ctl: socket.socket, worker_main):
        self.ctl = ctl
        self.worker_main = worker_main
        self.ready: list[tuple[int, socket.socket]] = []
        self.busy: set[int] = set()
        self.crashes = 0

    def _fork_ready(self) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self.ctl.close()
                parent_end.close()
                for _, sock in self.ready:
                    sock.close()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                code = self.worker_main(child_end)
            except BaseException:  # a worker must never return into the zygote's loop
                log.exception("worker failed")
            finally:
                os._exit(code)
        child_end.close()
        self.ready.append((pid, parent_end))

    def _fill_pool(self) -> None:
        while len(self.ready) < limits.WORKER_POOL:
            self._fork_ready()

    def _dispatch(self) -> bool:
        """Pass one handover from the supervisor on; False at its end."""
        try:
            got = handover.recv_handover(self.ctl)
        except handover.BadHandover as exc:
            log.error("%s", exc)
            return True
        if got is None:
            return False
        assignment, fds = got
        if not self.ready:
            self._fork_ready()
        pid, sock = self.ready.pop(0)
        self.busy.add(pid)
        try:
            handover.send_handover(sock, assignment, fds)
        except OSError as exc:
            log.error("handing connection to worker %d failed: %s", pid, exc)
        finally:
            for fd in fds:
                os.close(fd)
            sock.close()
        return True

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.ready = [(p, s) for p, s in self.ready if p != pid]
            self.busy.discard(pid)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) in CRASH_SIGNALS:
                self.crashes += 1
                log.warning("worker %d crashed (signal %d)", pid, os.WTERMSIG(status))

    def _stop_workers(self) -> None:
        """The supervisor is stopping (our control socket ended): end every
        worker, busy ones too, or an idle client would keep its worker alive
        after the daemon is gone.  (Not on EXIT_REPLACE: a replaced zygote's
        busy workers finish their connections.)"""
        for pid in list(self.busy) + [p for p, _ in self.ready]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        setproctitle("nixwarden worker-zygote")
        gc.freeze()  # keep the collector from copying shared pages in every worker
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self._fill_pool()
        while True:
            if not self.ready:
                self._fork_ready()  # the next connection must not wait for a fork
            full = len(self.ready) >= limits.WORKER_POOL
            readable, _, _ = select.select([self.ctl, wake_r], [], [],
                                           None if full else limits.POOL_REFILL_IDLE)
            if not readable:
                self._fill_pool()  # forks happen while no connection is starting
                continue
            if wake_r in readable:
                while True:
                    try:
                        if not os.read(wake_r, 256):
                            break
                    except BlockingIOError:
                        break
                self._reap()
            if self.ctl in readable and not self._dispatch():
                self._stop_workers()
                return 0
            if self.crashes >= limits.ZYGOTE_MAX_CRASHES:
                log.error("%d worker crashes: asking for a fresh zygote", self.crashes)
                return EXIT_REPLACE
