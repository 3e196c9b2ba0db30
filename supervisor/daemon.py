"""The supervisor's run loops: socket mode and ``--stdio`` mode.

Socket mode accepts connections, decides identity and trust
(``trust.decide``), takes a pooled session, makes the RPC channel, and
hands the client's descriptor and the worker's channel end to the zygote.
Signal handlers only write to a wake-up pipe; the loop does the work
(gunicorn's arbiter).  SIGTERM, SIGINT and SIGHUP stop the daemon: the
socket file is removed and children are ended.  Process: supervisor.

Trust: the supervisor reads no client bytes; it sees peer credentials and
its own settings only.
"""

from __future__ import annotations

import gc
import logging
import os
import selectors
import signal
import socket

from nixwarden.shared import limits
from nixwarden.shared.rpc.channel import open_pipes
from nixwarden.shared.rpc.handover import Assignment
from nixwarden.shared.version import NIX_COMPAT_VERSION
from nixwarden.supervisor import listener, spawner, trust
from nixwarden.supervisor.session.process import preload, session_main

log = logging.getLogger("nixwarden")


class Daemon:
    def __init__(self, opts, locations, layout, worker_user: str, log_level: str):
        self.opts = opts
        self.settings = opts.settings
        self.locations = locations
        self.layout = layout
        self.zygote = spawner.ZygoteHandle(worker_user, log_level)
        self.pool = spawner.SessionPool(self._session_target)
        self.stopping = False

    def _session_target(self, ctl):
        session_main(ctl, self.layout, self.settings, self._new_zygote)

    def _new_zygote(self) -> spawner.ZygoteHandle:
        """A zygote like the daemon's, for a build's recursive Nix connections."""
        return spawner.ZygoteHandle(self.zygote.user, self.zygote.log_level)

    def _assignment(self, ident: trust.Identity) -> Assignment:
        return Assignment(ident.uid, ident.pid, ident.trusted, self.layout.store_dir,
                          self.layout.real_store_dir, NIX_COMPAT_VERSION,
                          stdio=bool(self.opts.stdio))

    def _start_connection(self, ident: trust.Identity, client_in: int, client_out: int):
        """Give the connection a session and a worker; None if that failed
        (the client then sees its connection closed; the daemon carries on)."""
        session_ends, worker_ends = open_pipes()
        try:
            session = self._assign_session(ident, session_ends)
            if session is None:
                return None
            try:
                self.zygote.handover(self._assignment(ident),
                                     [client_in, client_out, *worker_ends])
            except OSError as exc:
                log.error("cannot hand the connection to a worker: %s", exc)
            return session
        finally:
            for fd in (*session_ends, *worker_ends):
                os.close(fd)

    def _assign_session(self, ident: trust.Identity, rpc_fds: tuple[int, int]):
        """A pooled session that took the assignment (a dead one is replaced)."""
        for _ in range(3):
            session = self.pool.take()
            try:
                session.assign(ident, rpc_fds)
                return session
            except OSError as exc:
                log.warning("session %d could not take a connection: %s", session.proc.pid, exc)
        log.error("no session process could serve the connection")
        return None

    # --- socket mode -------------------------------------------------------------

    def serve_socket(self, sockets: list[socket.socket], bound_path: str | None) -> int:
        spawner.title("supervisor")
        preload()
        # Objects that exist now are shared with every forked session; keep
        # the cyclic collector from touching (and so copying) their pages.
        gc.freeze()
        self.zygote.start()
        self.pool.fill()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        sel = selectors.DefaultSelector()
        for sock in sockets:
            sel.register(sock, selectors.EVENT_READ, "listen")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        try:
            return self._loop(sel, wake_r)
        finally:
            self._shutdown(sockets, bound_path)

    def _on_stop(self, signum, frame) -> None:
        self.stopping = True

    def _loop(self, sel, wake_r: int) -> int:
        while not self.stopping:
            if not self.pool.ready:
                self.pool.fill(1)  # the next connection must not wait for a fork
            full = len(self.pool.ready) >= self.pool.size
            events = sel.select(timeout=None if full else limits.POOL_REFILL_IDLE)
            if not events:
                self.pool.fill()  # forks happen while no client is waiting
            for key, _ in events:
                if key.data == "wake":
                    _drain(wake_r)
                    self.pool.reap()
                    if not self.zygote.check():
                        log.error("the worker zygote keeps exiting; stopping")
                        return 1
                elif not self.stopping:
                    self._accept(key.fileobj)
        return 0

    def _accept(self, lsock: socket.socket) -> None:
        try:
            conn, _ = lsock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # e.g. out of descriptors: this client waits, others go on
            log.error("accepting a connection: %s", exc)
            return
        with conn:
            try:
                ident = self._identify(conn)
            except trust.Refused as exc:
                log.error("error processing connection: %s", exc)
                return
            self._start_connection(ident, conn.fileno(), conn.fileno())
            # Logged once the worker has the connection: the line is not on
            # the client's critical path.
            log.info("accepted connection from pid %s, user %s%s",
                     ident.pid if ident.pid is not None else "<unknown>",
                     ident.user or "<unknown>", " (trusted)" if ident.trusted else "")

    def _identify(self, conn: socket.socket) -> trust.Identity:
        force = self.opts.trust_override
        cred = listener.peer_credentials(conn)  # for the log even when forced
        s = self.settings
        return trust.decide(cred, trusted_users=s.trusted_users,
                            allowed_users=s.allowed_users,
                            build_users_group=s.build_users_group, force=force)

    def _shutdown(self, sockets, bound_path: str | None) -> None:
        for sock in sockets:
            sock.close()
        if bound_path:
            try:
                os.unlink(bound_path)
            except FileNotFoundError:
                pass
        self.pool.stop()
        self.zygote.stop()

    # --- stdio mode ----------------------------------------------------------------

    def serve_stdio(self) -> int:
        """Serve exactly one client on stdin/stdout (spec daemon-behaviour §7.5)."""
        spawner.title("supervisor --stdio")
        uid, gid = os.getuid(), os.getgid()
        trusted = self.opts.trust_override != "untrusted"
        ident = trust.Identity(None, uid, gid, trust.user_name(uid), trusted)
        self.zygote.start()
        session = self._start_connection(ident, 0, 1)
        if session is None:
            self.zygote.stop()
            return 1
        session.proc.join()
        self.zygote.stop()
        return 1 if session.proc.exitcode else 0


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 512):
                return
        except BlockingIOError:
            return
