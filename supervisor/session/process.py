"""Start-up of a session process, from its fork to the end of its connection.

A pooled session opens the store database first (no per-client state yet),
then waits for the supervisor's assignment: the connection's identity and
its end of the RPC channel.  It then serves that one connection and exits;
its temporary GC roots end with it.  Process: session.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import stat
import socket
import sys

from nixwarden.shared.rpc.channel import Channel
from nixwarden.supervisor import spawner
from nixwarden.supervisor.session import loop
from nixwarden.supervisor.session.state import Session
from nixwarden.supervisor.store.adding import StoreWriter
from nixwarden.supervisor.store.db import NIX_SCHEMA_VERSION, StoreDB
from nixwarden.supervisor.store.locks import TempRoots

log = logging.getLogger("nixwarden.session")

#: Modules the session code imports inside functions (where a module-level
#: import would be circular, or only some requests need them): builds,
#: substitution (urllib3, ssl, the decompressors), GC, verify, optimise.
#: The supervisor imports them all before it forks its pooled sessions
#: (``preload``), so no connection spends its session's time importing
#: them (the substitution modules alone take ~85 ms) and their pages stay
#: shared.  ``tests/unit/test_preload.py`` checks that the list is complete.
SESSION_MODULES = (
    "nixwarden.shared.derivation",
    "nixwarden.shared.derivation_hash",
    "nixwarden.supervisor.build.buildlog",
    "nixwarden.supervisor.build.buildusers",
    "nixwarden.supervisor.build.builtins",
    "nixwarden.supervisor.build.ca",
    "nixwarden.supervisor.build.env",
    "nixwarden.supervisor.build.prepare",
    "nixwarden.supervisor.build.realise",
    "nixwarden.supervisor.build.refscan",
    "nixwarden.supervisor.build.sandbox",
    "nixwarden.supervisor.build.sandboxing",
    "nixwarden.supervisor.session.missing",
    "nixwarden.supervisor.session.restricted",
    "nixwarden.supervisor.store.drvoutputs",
    "nixwarden.supervisor.store.gc",
    "nixwarden.supervisor.store.gcroots",
    "nixwarden.supervisor.store.optimise",
    "nixwarden.supervisor.store.roots",
    "nixwarden.supervisor.store.substitute",
    "nixwarden.supervisor.store.verify",
)


def preload() -> None:
    """Import ``SESSION_MODULES`` (in the supervisor, before any fork)."""
    for name in SESSION_MODULES:
        importlib.import_module(name)


def _close_inherited(keep: set[int]) -> None:
    """Drop the supervisor's descriptors (listeners, zygote control, clients)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.close(devnull)
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _reset_signals() -> None:
    """Forget the supervisor's stop handlers and wake-up pipe.

    Inherited, they would make SIGTERM only set a flag in this copy of the
    supervisor (so ``terminate()`` could not end a session) and write to a
    descriptor ``_close_inherited`` is about to close.
    """
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)


def _db_identity(layout) -> tuple[int, int] | None:
    try:
        st = os.stat(layout.db_path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _schema_is_current(layout) -> bool:
    """Whether ``db/schema`` names the current version.  A pooled session
    opens the database early only then: creating or upgrading a schema is
    left to a session serving a client, since an idle pooled session holds
    the big-lock shared and would keep an upgrade (which needs it
    exclusive) waiting until the next connection."""
    try:
        return layout.read_schema_version() == NIX_SCHEMA_VERSION
    except ValueError:  # a corrupt schema file: reported to the client later
        return False


def _multi_user_store_dir(layout, settings) -> None:
    """As Nix 2.8's LocalStore constructor: with build users, running as
    root, the real store directory becomes root:<build-users-group> 01775,
    so builders running as build users can create their outputs in it
    (the sticky bit keeps them from removing anyone else's entries)."""
    group = settings.get("build-users-group")
    if os.geteuid() != 0 or not group:
        return
    import grp
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.error("warning: the group '%s' specified in 'build-users-group' does not exist",
                  group)
        return
    st = os.stat(layout.real_store_dir)
    if st.st_uid != 0 or st.st_gid != gid or stat.S_IMODE(st.st_mode) != 0o1775:
        os.chown(layout.real_store_dir, 0, gid)
        os.chmod(layout.real_store_dir, 0o1775)
    # Unlike Nix 2.8 (0755), the database directory is root's alone when
    # builds run as build users: an unsandboxed builder must not read the
    # store's metadata (issue: "secrets stay put").  Clients use the daemon.
    if stat.S_IMODE(os.stat(layout.db_dir).st_mode) != 0o700:
        os.chmod(layout.db_dir, 0o700)


def session_main(ctl: socket.socket, layout, settings, new_zygote=None) -> None:
    """Body of a pooled session process (the target of its fork).

    ``new_zygote()`` makes a (not yet started) ``spawner.ZygoteHandle`` like
    the daemon's; builds use it for recursive Nix connections.
    """
    _reset_signals()
    _close_inherited({ctl.fileno()})
    spawner.title("session (ready)")
    # A pooled session opens an existing database early but never creates
    # anything before it has a connection (CppNix opens the store per
    # connection; a store removed meanwhile must not be recreated by us).
    opened = _db_identity(layout) if _schema_is_current(layout) else None
    db = StoreDB.open(layout, ensure_layout=False) if opened else None
    got = spawner.receive_assignment(ctl)
    ctl.close()
    if got is None:
        if db is not None:
            db.close()
        sys.exit(0)
    if db is None or _db_identity(layout) != opened:
        if db is not None:
            db.close()
        db = StoreDB.open(layout, ensure_layout=True)
    identity, rpc_fds = got
    _multi_user_store_dir(layout, settings)
    spawner.title(f"session uid={identity.uid}")
    sys.exit(serve_connection(identity, settings, layout, db, rpc_fds,
                              new_zygote=new_zygote))


def serve_connection(identity, settings, layout, db, rpc_fds: tuple[int, int],
                     **session_fields) -> int:
    """Serve one connection's RPC channel (its session's ``(read, write)``
    descriptors) with a session over ``db``; return the exit code.  The
    database, the session's temporary roots and its caches end with it.
    ``session_fields``: further ``Session`` fields (rules, restriction...)."""
    roots = TempRoots(layout)
    session = Session(identity, settings, layout, db, roots, **session_fields)
    session.writer = StoreWriter(layout, db, roots, settings)
    try:
        code = loop.serve(session, Channel(*rpc_fds))
    finally:
        session.reset_substituters()
        session.writer.close()
        roots.close()
        db.close()
    log.debug("session for pid %s ended after %d requests", identity.pid, session.requests)
    return code
