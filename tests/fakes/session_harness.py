"""A real session process, started the way the supervisor starts one, for tests
that act as the worker (tests/security/test_hostile_worker.py).

Run as a program by the test (``python session_harness.py --rpc-fd N ...``)
with the store's environment (NIX_STORE_DIR, NIX_STATE_DIR, ...) and the
session's ends of the RPC pipes (``channel.open_pipes``) on the descriptors
``--rpc-in`` and ``--rpc-out``.  It does what
``supervisor.daemon`` does for one connection: settings from the command
line layer (``cli.parse_daemon_args``), locations, the store layout, a
``SessionPool`` fork running ``session_main``, and ``SessionHandle.assign``
with an ``Identity`` and the RPC descriptors.  It prints ``session <pid>``
once the session is assigned, waits for it, prints ``exit <code>`` and
exits.  The session's log lines go to this program's stderr, as in the
daemon.

The test holds the worker's ends of the pipes and plays a (hostile)
worker on them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rpc-in", type=int, required=True)
    parser.add_argument("--rpc-out", type=int, required=True)
    parser.add_argument("--uid", type=int, default=1000)
    parser.add_argument("--user", default="nwtest-a")
    parser.add_argument("--trusted", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="nixwarden[%(process)d] %(message)s")

    from nixwarden.supervisor import cli
    from nixwarden.supervisor.__main__ import store_layout
    from nixwarden.supervisor.locations import resolve_locations
    from nixwarden.supervisor.session.process import session_main
    from nixwarden.supervisor.spawner import SessionPool
    from nixwarden.supervisor.trust import Identity

    opts = cli.parse_daemon_args(["daemon"], os.environ)
    locations = resolve_locations(opts.settings, os.environ, os.geteuid(), stdio=False)
    layout = store_layout(locations)
    settings = opts.settings

    def target(ctl):
        session_main(ctl, layout, settings)

    pool = SessionPool(target, size=0)
    handle = pool.take()
    ident = Identity(pid=os.getpid(), uid=args.uid, gid=args.uid, user=args.user,
                     trusted=bool(args.trusted))
    handle.assign(ident, (args.rpc_in, args.rpc_out))
    os.close(args.rpc_in)
    os.close(args.rpc_out)
    print(f"session {handle.proc.pid}", flush=True)
    handle.proc.join()
    print(f"exit {handle.proc.exitcode}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
