"""A recursive Nix session process: one builder connection, restricted.

Started by a build's session (``build/recursive.py``) as a fresh program,
not a fork: SQLite keeps per-process state about open databases that a
forked copy of the build's session would inherit and corrupt.  The state
(store layout, the session's settings, the identity and the build's
allowed paths) arrives as one typed msgpack message (``RecursiveState``)
on ``--state-fd`` from that root process; nothing is unpickled (STYLE.md
1.7).  Nothing here is read from the builder or a worker except the RPC
frames, decoded as strictly as in any session.  Process: session.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from types import MappingProxyType

import msgspec

from nixwarden.supervisor.store.layout import StoreLayout
from nixwarden.supervisor.trust import Identity


class RecursiveState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    layout: StoreLayout
    settings: dict[str, bool | int | str | tuple[str, ...]]  # Settings.values
    overridden: frozenset[str]
    identity: Identity
    allowed: list[str]
    log_level: int


def spawn_state(layout, settings, identity, allowed: set[str]) -> bytes:
    """What the child needs, for ``--state-fd`` (written by the build's session)."""
    return msgspec.msgpack.encode(RecursiveState(
        layout, dict(settings.values), settings.overridden, identity, sorted(allowed),
        logging.getLogger().level))


def command(state_fd: int, rpc_fds: tuple[int, int], report_fd: int) -> list[str]:
    return [sys.executable, "-m", "nixwarden.supervisor.session.recursive_process",
            "--state-fd", str(state_fd), "--rpc-in", str(rpc_fds[0]),
            "--rpc-out", str(rpc_fds[1]), "--report-fd", str(report_fd)]


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 16):
        parts.append(chunk)
    os.close(fd)
    return b"".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nixwarden-recursive-session")
    for name in ("--state-fd", "--rpc-in", "--rpc-out", "--report-fd"):
        parser.add_argument(name, type=int, required=True)
    args = parser.parse_args(argv)
    state = msgspec.msgpack.decode(_read_all(args.state_fd), type=RecursiveState)
    layout, identity = state.layout, state.identity

    from nixwarden.supervisor import spawner
    from nixwarden.supervisor.config import Settings
    from nixwarden.supervisor.logs import RawFormatter
    from nixwarden.supervisor.session.process import serve_connection
    from nixwarden.supervisor.session.restricted import RESTRICTED_RULES, Restriction
    from nixwarden.supervisor.store.db import StoreDB

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RawFormatter(os.environ.get("IN_SYSTEMD") == "1"))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(state.log_level)
    spawner.title(f"session recursive uid={identity.uid}")
    settings = Settings(MappingProxyType(state.settings), state.overridden)
    db = StoreDB.open(layout, ensure_layout=False)
    return serve_connection(identity, settings, layout, db, (args.rpc_in, args.rpc_out),
                            rules=RESTRICTED_RULES,
                            restriction=Restriction(set(state.allowed), args.report_fd))


if __name__ == "__main__":
    sys.exit(main())
