"""``nixwarden``: the command-line entry point.

``nixwarden daemon [option…]`` runs the daemon in the foreground, exactly
as ``nix daemon`` takes its options (``cli.py``).  Start-up: settings,
store locations, the store's directories and database, then socket or
``--stdio`` mode (``daemon.py``).  Process: supervisor.
"""

from __future__ import annotations

import logging
import os
import pwd
import subprocess
import sys

from nixwarden.supervisor import cli, listener, logs
from nixwarden.supervisor.daemon import Daemon
from nixwarden.shared.errors import StoreRefusal
from nixwarden.supervisor.locations import LocationError, resolve_locations
from nixwarden.supervisor.store.layout import StoreLayout

log = logging.getLogger("nixwarden")


def ensure_worker_user(name: str) -> None:
    """Create the unprivileged worker account if it is missing (root only)."""
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    log.info("creating the system account '%s' for protocol workers", name)
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", "--user-group", name], check=True)


def store_layout(locations) -> StoreLayout:
    """The store the daemon serves.  Like nix-daemon, nothing is created
    here: each connection's session opens (and if need be creates) it."""
    return StoreLayout(locations.store_dir, locations.real_store_dir,
                       locations.state_dir, locations.log_dir)


def run_daemon(opts) -> int:
    os.umask(0o022)  # as Nix does at start-up: store objects are world-readable
    level = logs.setup(opts.verbosity, opts.log_format, os.environ)
    for line in opts.warnings:
        log.warning("%s", line)
    locations = resolve_locations(opts.settings, os.environ, os.geteuid(), stdio=opts.stdio)
    if opts.stdio and locations.forward_socket:
        if opts.process_ops or opts.trust_override == "untrusted":
            print("error: processing operations locally on a daemon store is not supported "
                  "by nixwarden; use a local store", file=sys.stderr)
            return 1
        from nixwarden.supervisor.forward import forward_stdio
        return forward_stdio(locations.forward_socket)
    layout = store_layout(locations)
    worker_user = opts.settings.worker_user
    if os.geteuid() == 0:
        ensure_worker_user(worker_user)
    # nix-daemon --stdio prints nothing to its stderr (which an ssh-ng user
    # sees); the workers' start-up report is kept for verbose runs.
    worker_level = "WARNING" if opts.stdio and opts.verbosity <= 3 else level
    daemon = Daemon(opts, locations, layout, worker_user, worker_level)
    if opts.stdio:
        return daemon.serve_stdio()
    sockets = listener.activated_sockets(os.environ)
    bound = None
    if sockets is None:
        bound = locations.socket_path
        sockets = [listener.bind_socket(bound)]
        log.info("nixwarden listening on %s", bound)
        if locations.client_hint:
            log.warning("clients connect with: %s", locations.client_hint)
    return daemon.serve_socket(sockets, bound)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = cli.parse_daemon_args(argv, os.environ)
    except cli.CliExit as done:
        return done.emit(sys.stdout, sys.stderr)
    try:
        return run_daemon(opts)
    except (listener.ActivationError, LocationError, StoreRefusal) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
