"""The ``nixwarden`` command line: ``nixwarden daemon [option…]``.

Runs in the supervisor process, once, before anything else.  Parses the
options of ``nix daemon`` / ``nix-daemon`` (daemon-behaviour.md §5) with one
``configargparse.ArgumentParser`` built by ``config.build_parser`` (which
also reads every configuration layer), and returns a frozen
``DaemonOptions``.  ``--help``, ``--version`` and errors are reported by
raising ``CliExit`` with the texts to print and the exit status, so that
this module never writes to a stream or exits by itself.

Messages follow Nix (§12): usage errors print ``error: …`` and
``Try 'nixwarden daemon --help' for more information.``, exit 1.

Trust: argv and the environment belong to whoever starts the daemon; the
force-trust flags change who is trusted, so they are gated behind the
``daemon-trust-override`` experimental feature exactly as in newer Nix.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Mapping

from nixwarden.shared.version import NIX_COMPAT_VERSION, NIXWARDEN_VERSION
from nixwarden.supervisor import config
from nixwarden.supervisor.config import ConfigError, ReadFile, Settings

PROGRAM = "nixwarden"
LOG_FORMATS = ("raw", "raw-with-logs", "internal-json", "bar", "bar-with-logs")
VERBOSITY_INFO, VERBOSITY_DEBUG, VERBOSITY_VOMIT = 3, 6, 7
TRUST_FEATURE = "daemon-trust-override"
PROCESS_OPS_FEATURE = "mounted-ssh-store"


@dataclass(frozen=True)
class DaemonOptions:
    """Everything ``nixwarden daemon`` was asked to do.

    ``verbosity`` uses Nix >= 2.4 numbering (0 error … 3 info … 7 vomit).
    ``trust_override`` is None (normal authentication), ``"trusted"`` or
    ``"untrusted"``.  ``warnings`` are texts to print as ``warning: <text>``.
    """

    settings: Settings
    stdio: bool = False
    trust_override: str | None = None
    process_ops: bool = False
    verbosity: int = VERBOSITY_INFO
    log_format: str = "raw"
    print_build_logs: bool = False
    offline: bool = False
    refresh: bool = False
    readonly_mode: bool = False
    warnings: list[str] = field(default_factory=list)

    def warning_lines(self) -> str:
        """The warnings as Nix prints them on stderr (``warning: …`` lines)."""
        return "".join(f"warning: {w}\n" for w in self.warnings)


class CliExit(Exception):
    """Stop before running: print ``stdout``/``stderr``, exit with ``status``."""

    def __init__(self, status: int, stdout: str = "", stderr: str = ""):
        super().__init__(stderr or stdout)
        self.status = status
        self.stdout = stdout
        self.stderr = stderr

    def emit(self, out, err) -> int:
        """Write the texts to the given streams; returns the exit status."""
        out.write(self.stdout)
        err.write(self.stderr)
        out.flush()
        err.flush()
        return self.status


class _FatalFlag(Exception):
    """A flag error that is not a usage error (no ``Try …`` line)."""


def _usage_exit(message: str, program: str) -> CliExit:
    return CliExit(1, stderr=f"error: {message}\n"
                   f"Try '{program} --help' for more information.\n")


def _error_exit(message: str) -> CliExit:
    return CliExit(1, stderr=f"error: {message}\n")


# ---------------------------------------------------------------------------
# Flag actions (all record into the namespace, in command-line order)
# ---------------------------------------------------------------------------

class _Store(argparse.Action):
    """Set ``dest`` to a fixed value; ``nargs=0``."""

    def __init__(self, option_strings, dest, value=True, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.value = value

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.value)


class _Trust(_Store):
    """``--force-trusted``/``--force-untrusted``/``--default-trust``: last wins."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.trust_override = self.value
        _note_feature(namespace, TRUST_FEATURE)


class _ProcessOps(_Store):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.process_ops = True
        _note_feature(namespace, PROCESS_OPS_FEATURE)


def _note_feature(namespace, feature: str) -> None:
    namespace.features_needed = list(namespace.features_needed) + [feature]


class _Verbosity(_Store):
    """``-v`` (+1, capped at vomit), ``--quiet`` (-1, floor error), ``--debug``."""

    def __call__(self, parser, namespace, values, option_string=None):
        level = namespace.verbosity
        if self.value == "debug":
            level = VERBOSITY_DEBUG
        else:
            level = min(VERBOSITY_VOMIT, max(0, level + self.value))
        namespace.verbosity = level


class _Early(_Store):
    """``--help``/``--version``: the first one seen wins, as Nix exits there."""

    def __call__(self, parser, namespace, values, option_string=None):
        if namespace.early is None:
            namespace.early = self.value
            namespace.early_at = len(namespace.assignments)


class _LogFormat(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if values not in LOG_FORMATS:
            raise _FatalFlag(f"option 'log-format' has an invalid value '{values}'")
        namespace.log_format = values


def _add_daemon_flags(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(stdio=False, trust_override=None, process_ops=False,
                        verbosity=VERBOSITY_INFO, log_format="raw",
                        print_build_logs=False, offline=False, refresh=False,
                        readonly_mode=False, early=None, early_at=0, features_needed=[],
                        ignored=None)
    add = parser.add_argument
    add("--daemon", action=_Store, dest="ignored")
    add("--stdio", action=_Store, dest="stdio")
    add("--force-trusted", action=_Trust, dest="trust_override", value="trusted")
    add("--force-untrusted", action=_Trust, dest="trust_override", value="untrusted")
    add("--default-trust", action=_Trust, dest="trust_override", value=None)
    add("--process-ops", action=_ProcessOps, dest="process_ops")
    add("-v", "--verbose", action=_Verbosity, dest="verbosity", value=1)
    add("--quiet", action=_Verbosity, dest="verbosity", value=-1)
    add("--debug", action=_Verbosity, dest="verbosity", value="debug")
    add("--log-format", action=_LogFormat, metavar="FORMAT")
    add("-L", "--print-build-logs", action=_Store, dest="print_build_logs")
    add("-Q", "--no-build-output", action=_Store, dest="log_format", value="raw")
    add("--offline", "--no-net", action=_Store, dest="offline")
    add("--refresh", action=_Store, dest="refresh")
    add("--readonly-mode", action=_Store, dest="readonly_mode")
    add("--no-gc-warning", action=_Store, dest="ignored")
    add("--help", action=_Early, dest="early", value="help")
    add("--version", action=_Early, dest="early", value="version")


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------

def parse_daemon_args(argv: list[str], environ: Mapping[str, str], *,
                      euid: int | None = None,
                      read_file: ReadFile = config.read_text_file) -> DaemonOptions:
    """Parse ``nixwarden`` arguments (``sys.argv[1:]``).

    Args:
        argv: e.g. ``["daemon", "--stdio"]``; ``["--version"]`` and
            ``["--help"]`` also work without the ``daemon`` word.
        environ: the environment (configuration layers, §6.1 and §9).
        euid: effective uid for uid-dependent defaults (default: ours).
        read_file: reads configuration files (replaced in tests).

    Returns:
        DaemonOptions.

    Raises:
        CliExit: for ``--help``, ``--version`` (status 0) and every error.
    """
    euid = os.geteuid() if euid is None else euid
    if argv and argv[0] == "daemon":
        return _parse_daemon(list(argv[1:]), environ, euid, read_file)
    return _parse_top_level(list(argv), environ, euid, read_file)


def _parse_top_level(argv, environ, euid, read_file) -> DaemonOptions:
    verbosity = VERBOSITY_INFO
    for index, arg in enumerate(argv):
        if arg == "daemon":
            return _parse_daemon(argv[:index] + argv[index + 1:], environ,
                                 euid, read_file)
        if arg in ("-v", "--verbose"):
            verbosity += 1
        elif arg == "--help":
            raise CliExit(0, stdout=help_text())
        elif arg == "--version":
            raise CliExit(0, stdout=version_text(verbosity, environ))
        elif arg == "--stdio":
            # ssh-ng:// clients run `<remote-program> --stdio`, as with
            # nix-daemon: the daemon word is implied.
            return _parse_daemon(list(argv), environ, euid, read_file)
        elif arg.startswith("-"):
            raise _usage_exit(f"unrecognised flag '{arg}'", PROGRAM)
        else:
            raise _usage_exit(f"'{arg}' is not a recognised command", PROGRAM)
    raise _usage_exit("no subcommand specified", PROGRAM)


def _parse_daemon(args, environ, euid, read_file) -> DaemonOptions:
    program = f"{PROGRAM} daemon"
    parser = config.build_parser(environ, read_file, prog=program)
    _add_daemon_flags(parser)
    try:
        namespace, rest = parser.parse_known_args(args, env_vars={})
    except argparse.ArgumentError as e:
        raise _usage_exit(e.message, program) from None
    except _FatalFlag as e:
        raise _error_exit(str(e)) from None
    except ConfigError as e:
        raise _config_exit(e, program) from None
    early = _early_action(namespace, rest, args)
    if early is None and rest:
        raise _usage_exit(_unknown_message(rest[0]), program)
    settings, warnings = _settings(namespace, environ, euid, early, program)
    if early == "help":
        raise CliExit(0, stdout=help_text())
    if early == "version":
        raise CliExit(0, stdout=version_text(namespace.verbosity, environ))
    _check_features(namespace.features_needed, settings)
    return _options(namespace, settings, warnings)


def _early_action(namespace, rest, args) -> str | None:
    """``--help``/``--version`` win unless an unknown argument came first."""
    if namespace.early is None:
        return None
    kind = namespace.early
    flag = f"--{kind}"
    if rest and args.index(rest[0]) < args.index(flag):
        return None
    return kind


def _unknown_message(arg: str) -> str:
    if arg.startswith("-") and arg != "-":
        return f"unrecognised flag '{arg}'"
    return f"unexpected argument '{arg}'"


def _config_exit(error: ConfigError, program: str) -> CliExit:
    if error.usage:
        return _usage_exit(error.message, program)
    return _error_exit(error.message)


def _settings(namespace, environ, euid, early, program):
    """Apply all assignments; with ``--help``/``--version``, as far as that flag.

    Nix handles flags in order and exits at ``--help``/``--version``, so
    only errors in the layers and in flags before it are reported then.
    """
    assignments = namespace.assignments
    if early is not None:
        assignments = assignments[:namespace.early_at]
    try:
        return config.settings_from_assignments(assignments, environ, euid)
    except ConfigError as e:
        raise _config_exit(e, program) from None


def _check_features(needed: list[str], settings: Settings) -> None:
    for feature in needed:
        if not settings.feature_enabled(feature):
            raise _error_exit(
                f"experimental Nix feature '{feature}' is disabled; add "
                f"'--extra-experimental-features {feature}' to enable it")


def _options(namespace, settings: Settings, warnings: list[str]) -> DaemonOptions:
    settings = settings.with_network_mode(offline=namespace.offline,
                                          refresh=namespace.refresh)
    return DaemonOptions(
        settings=settings, stdio=namespace.stdio,
        trust_override=namespace.trust_override,
        process_ops=namespace.process_ops, verbosity=namespace.verbosity,
        log_format=namespace.log_format,
        print_build_logs=namespace.print_build_logs,
        offline=namespace.offline, refresh=namespace.refresh,
        readonly_mode=namespace.readonly_mode, warnings=list(warnings))


# ---------------------------------------------------------------------------
# --version and --help
# ---------------------------------------------------------------------------

def version_text(verbosity: int, environ: Mapping[str, str]) -> str:
    """``nixwarden (Nix) 2.8.0``; above info level also Nix's detail lines."""
    lines = [f"{PROGRAM} (Nix) {NIX_COMPAT_VERSION}"]
    if verbosity > VERBOSITY_INFO:
        cdir = config.conf_dir(environ)
        lines += [
            f"nixwarden version: {NIXWARDEN_VERSION}",
            f"System type: {config.dynamic_defaults(environ, 0)['system']}",
            f"System configuration file: {cdir}/nix.conf",
            "User configuration files: "
            + ":".join(config.user_config_files(environ)),
            "Store directory: " + (environ.get("NIX_STORE_DIR")
                                   or environ.get("NIX_STORE") or "/nix/store"),
            "State directory: " + (environ.get("NIX_STATE_DIR") or "/nix/var/nix"),
        ]
    return "\n".join(lines) + "\n"


def help_text() -> str:
    """The ``nixwarden daemon --help`` manual."""
    return _HELP


_HELP = """\
Name
    nixwarden daemon - privilege-separated Nix daemon (drop-in for nix-daemon)

Synopsis
    nixwarden daemon [option...]
    nixwarden --version | --help

Description
    Runs a Nix daemon that performs store operations on behalf of Nix clients,
    speaking the Nix worker protocol like `nix daemon` / `nix-daemon` (Nix 2.8).
    It stays in the foreground; run it under a service manager.

    Privilege separation: a root supervisor owns the store, the database and
    the listening socket; each client connection is served by a worker
    process running as the unprivileged account named by the
    `nixwarden-worker-user` setting, which can only ask the supervisor for
    store operations its session permits.

    It serves queries, adding and exporting paths, builds (as build users
    from `build-users-group`; with `sandbox = true` inside bubblewrap;
    recursive Nix with the `recursive-nix` experimental feature), garbage
    collection, verification, optimisation, signing and substitution from
    binary caches, on a store CppNix tools can share.

Daemon options
    --stdio             Serve one client on standard input/output instead of a
                        Unix socket (trusted by default; a `daemon` store is
                        forwarded to).
    --force-trusted     Trust every client (needs the experimental feature
                        daemon-trust-override).
    --force-untrusted   Treat every client as untrusted (same feature).
    --default-trust     Use the normal trusted-users/allowed-users checks
                        (same feature). The last of the three trust flags wins.
    --process-ops       With --stdio, process operations locally even when
                        the store is a daemon (needs mounted-ssh-store).
    --daemon            Accepted and ignored (nix-daemon compatibility).

Common options
    --help              Show this text.
    --version           Print `nixwarden (Nix) <version>` (more with -v).
    -v, --verbose       Increase the logging verbosity (repeatable).
    --quiet             Decrease the logging verbosity.
    --debug             Set the logging verbosity to debug.
    --log-format FORMAT Format of the daemon's stderr: raw (default),
                        raw-with-logs, internal-json, bar, bar-with-logs.
    -L, --print-build-logs
                        Print full build logs on stderr.
    --offline           Disable substituters and consider all downloaded
                        files up to date.
    --refresh           Consider all previously downloaded files out of date.
    --option NAME VALUE Set the configuration setting NAME (overrides
                        nix.conf); a bad value is only a warning.
    --NAME VALUE, --NAME / --no-NAME, --extra-NAME VALUE
                        Set, enable/disable (Booleans) or append to (lists)
                        any setting, e.g. --store URL, --sandbox/--no-sandbox/
                        --relaxed-sandbox, --extra-experimental-features F.
    -j, --max-jobs N    Maximum number of parallel builds.
    -K, --keep-failed   Keep temporary directories of failed builds.
    -k, --keep-going    Keep going after a build fails.
    --fallback          Build from source if substitution fails.
    --cores N, --max-silent-time N, --timeout N
                        As the settings of the same names (K/M/G/T suffixes).
    --store URL         The store to serve (setting `store`).
    --readonly-mode, --no-gc-warning, -Q, --no-build-output
                        Accepted for nix-daemon compatibility.

Configuration
    Settings are read, lowest priority first, from built-in defaults,
    $NIX_CONF_DIR/nix.conf (default /etc/nix/nix.conf), the user files
    ($NIX_USER_CONF_FILES, else $XDG_CONFIG_HOME/nix/nix.conf and
    $XDG_CONFIG_DIRS/nix/nix.conf), $NIX_CONFIG and the command line, in
    nix.conf syntax (include, !include, extra-NAME). Unknown settings warn;
    a bad value in a file is an error.

    nixwarden settings:
      nixwarden-worker-user   account the worker processes run as
                              (default: nixwarden)

Socket path
    Unless --stdio is used the daemon listens on a Unix socket:
      1. $NIX_DAEMON_SOCKET_PATH, if set and not empty;
      2. otherwise daemon-socket/socket in the store's state directory
         ($NIX_STATE_DIR, default /nix/var/nix; R/nix/var/nix for a store
         `local?root=R`).
    Run as a non-root user without /nix and without NIX_STORE_DIR or
    NIX_STATE_DIR, the daemon uses a private chroot store in
    $XDG_DATA_HOME/nix/root (default ~/.local/share/nix/root) and prints what
    clients need, e.g.
      NIX_REMOTE=unix://$HOME/.local/share/nix/root/nix/var/nix/daemon-socket/socket
    A client reaches a daemon on a non-default socket with
    NIX_REMOTE=unix://<socket path>.

Systemd socket activation
    With LISTEN_FDS/LISTEN_PID set (a systemd .socket unit) the daemon accepts
    on the inherited sockets instead of binding its own, e.g.
      [Socket]
      ListenStream=/nix/var/nix/daemon-socket/socket

Environment
    NIX_CONF_DIR, NIX_USER_CONF_FILES, NIX_CONFIG, NIX_STORE_DIR, NIX_STATE_DIR,
    NIX_LOG_DIR, NIX_DAEMON_SOCKET_PATH, NIX_REMOTE (default `store`),
    XDG_CONFIG_HOME, XDG_CONFIG_DIRS, XDG_DATA_HOME, IN_SYSTEMD.

Examples
    nixwarden daemon
    nixwarden daemon --stdio
    nixwarden daemon --extra-experimental-features daemon-trust-override --force-untrusted
"""
