"""The daemon's listening sockets and peer credentials.

Binds the socket the way nix-daemon does (spec daemon-behaviour §2.2:
parent directories created, a stale file replaced, mode 0666, a large
backlog), or takes systemd-activated sockets (§2.3, LISTEN_FDS honoured
only when LISTEN_PID is ours).  Reads SO_PEERCRED for each accepted
connection.  Process: supervisor.

Trust: reads nothing from clients but the kernel's peer credentials.
"""

from __future__ import annotations

import os
import socket
import struct

from nixwarden.shared import limits
from nixwarden.supervisor.trust import PeerCred

SD_LISTEN_FDS_START = 3
_UCRED = struct.Struct("3i")


class ActivationError(Exception):
    pass


def activated_sockets(environ) -> list[socket.socket] | None:
    """Sockets handed over by systemd, or None when not socket-activated."""
    if "LISTEN_FDS" not in environ:
        return None
    if environ.get("LISTEN_PID") != str(os.getpid()):
        raise ActivationError("unexpected systemd environment variables")
    try:
        count = int(environ["LISTEN_FDS"])
    except ValueError:
        raise ActivationError("unexpected systemd environment variables") from None
    if count < 1:
        raise ActivationError("unexpected systemd environment variables")
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    socks = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) else ""
        if name and name not in ("nix-daemon.socket", "nixwarden.socket", "unknown"):
            continue
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return socks


def bind_socket(path: str) -> socket.socket:
    """Create the daemon socket at ``path`` (replacing a stale one)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if len(path.encode()) < 108:
        sock.bind(path)
    else:
        _bind_relative(sock, path)
    os.chmod(path, 0o666)
    sock.listen(limits.LISTEN_BACKLOG)
    return sock


def _bind_relative(sock: socket.socket, path: str) -> None:
    """Bind a path longer than sun_path from inside its directory."""
    saved = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.chdir(os.path.dirname(path))
        sock.bind(os.path.basename(path))
    finally:
        os.fchdir(saved)
        os.close(saved)


def peer_credentials(conn: socket.socket) -> PeerCred:
    """The connecting process's pid, uid and gid (unknown on failure)."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return PeerCred(None, None, None)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid, uid, gid)
