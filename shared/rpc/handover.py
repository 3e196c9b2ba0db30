"""The handover of one client connection from the supervisor to a worker.

One SEQPACKET message carries an ``Assignment`` and exactly four
descriptors, in order: the client's read end, the client's write end (the
same socket twice in socket mode; stdin and stdout with ``--stdio``), and
the worker's read and write ends of its RPC channel to the session (two
pipes, ``channel.open_pipes``).  Only the supervisor
sends descriptors, and only this message; receivers check the tag, the
count and truncation and fail closed (STYLE.md 1.6).
"""

from __future__ import annotations

import os
import socket

import msgspec

HANDOVER_TAG = b"NWHO1"
HANDOVER_FDS = 4
MAX_ASSIGNMENT = 4096


class Assignment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a worker is told about its connection (for the handshake and titles)."""

    client_uid: int | None
    client_pid: int | None
    trusted: bool
    store_dir: str
    real_store_dir: str
    nix_version: str
    stdio: bool = False  # the client is the daemon's stdin/stdout


class BadHandover(Exception):
    """A handover message that is not exactly what the protocol says."""


def send_handover(sock: socket.socket, assignment: Assignment, fds: list[int]) -> None:
    payload = HANDOVER_TAG + msgspec.msgpack.encode(assignment)
    socket.send_fds(sock, [payload], fds)


def recv_handover(sock: socket.socket) -> tuple[Assignment, list[int]] | None:
    """Receive one handover; ``None`` on a clean end of the channel.

    Raises:
        BadHandover: wrong tag, wrong descriptor count, truncation or a
            malformed assignment (every received descriptor is closed).
    """
    msg, fds, flags, _ = socket.recv_fds(sock, MAX_ASSIGNMENT, HANDOVER_FDS + 1)
    if not msg and not fds:
        return None
    bad = (flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC)
           or len(fds) != HANDOVER_FDS or not msg.startswith(HANDOVER_TAG))
    try:
        if bad:
            raise BadHandover(f"bad handover: {len(fds)} fds, flags {flags:#x}")
        return msgspec.msgpack.decode(msg[len(HANDOVER_TAG):], type=Assignment), fds
    except (BadHandover, msgspec.DecodeError, msgspec.ValidationError) as exc:
        for fd in fds:
            os.close(fd)
        raise BadHandover(str(exc)) from None
