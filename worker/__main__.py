"""Entry point of the worker zygote: ``python -m nixwarden.worker``.

The supervisor execs this with the zygote's control socket on a known
descriptor.  Everything a worker will need is imported first (so that no
import has to read the interpreter's files after the privilege drop, when
they may no longer be readable); then the zygote drops privileges and
serves handovers.  Process: worker zygote and, after fork, workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

# Imported before the privilege drop on purpose (see the docstring).
from setproctitle import setproctitle

from nixwarden.shared.errors import ClientProtocolError, WorkerViolation
from nixwarden.shared.rpc import handover
from nixwarden.shared.rpc.channel import Channel, ChannelClosed
from nixwarden.worker import containment, seccomp, server, zygote  # noqa: F401
from nixwarden.worker.connection import ClientConnection
from nixwarden.worker.ops import register_all
from nixwarden.worker.store_client import StoreClient

register_all()
log = logging.getLogger("nixwarden.worker")

EXIT_BAD_HANDOVER = 73
EXIT_PROTOCOL = 1


def worker_main(sock: socket.socket) -> int:
    """A forked worker: contain, wait for one handover, serve, exit.

    The containment is applied while the worker waits in the pool (it holds
    nothing but its handover socket then), so none of it sits on a
    connection's critical path; the handover brings only the client's and
    the RPC channel's descriptors, and the handover socket is closed before
    the first client byte.
    """
    setproctitle("nixwarden worker (ready)")
    containment.contain_worker({2, sock.fileno()})
    try:
        got = handover.recv_handover(sock)
    except handover.BadHandover as exc:
        log.error("%s", exc)
        return EXIT_BAD_HANDOVER
    if got is None:
        return 0
    assignment, (client_in, client_out, rpc_in, rpc_out) = got
    sock.close()
    setproctitle(f"nixwarden worker uid={assignment.client_uid}")
    rpc = Channel(rpc_in, rpc_out)
    return serve_client(assignment, client_in, client_out, rpc)


def serve_client(assignment, client_in: int, client_out: int, rpc: Channel) -> int:
    info = server.ServerInfo(assignment.nix_version, assignment.trusted,
                             assignment.store_dir, assignment.real_store_dir)
    conn = ClientConnection(client_in, client_out)
    store = StoreClient(rpc)
    try:
        server.serve(conn, store, info, eof_is_error=assignment.stdio)
    except ClientProtocolError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        store.goodbye(EXIT_PROTOCOL)
        return EXIT_PROTOCOL
    except (ChannelClosed, WorkerViolation) as exc:
        log.error("session channel failed: %s", exc)
        return EXIT_PROTOCOL
    except (BrokenPipeError, ConnectionResetError):
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nixwarden-worker-zygote")
    parser.add_argument("--ctl-fd", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="nixwarden[%(process)d] %(message)s")
    ctl = socket.socket(fileno=args.ctl_fd)
    containment.contain_zygote(args.user)
    return zygote.Zygote(ctl, worker_main).run()


if __name__ == "__main__":
    sys.exit(main())
