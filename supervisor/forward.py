"""``--stdio`` with a daemon store: splice the client's bytes to that daemon.

What nix-daemon does for an ssh-ng user whose store is the system daemon
(spec daemon-behaviour §7.1): no handshake of its own, bytes copied both
ways until the client closes stdin; the downstream daemon authenticates
this process (the SSH user).  Process: supervisor (``--stdio``), running
as the connecting user; it parses nothing.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys

from nixwarden.shared.fdio import write_all

CHUNK = 65536


def forward_stdio(socket_path: str) -> int:
    """Copy stdin to the daemon at ``socket_path`` and its answers to stdout."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError as exc:
        print(f"error: cannot connect to socket at '{socket_path}': {exc.strerror}",
              file=sys.stderr)
        return 1
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "client")
    sel.register(sock, selectors.EVENT_READ, "daemon")
    with sock:
        while True:
            for key, _ in sel.select():
                if key.data == "client":
                    data = os.read(0, CHUNK)
                    if not data:
                        return 0
                    sock.sendall(data)
                else:
                    data = sock.recv(CHUNK)
                    if not data:
                        print("error: unexpected EOF from daemon socket", file=sys.stderr)
                        return 1
                    write_all(1, data)
