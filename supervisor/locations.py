"""Where the store, its state, its logs and the daemon socket live.

Runs in the supervisor at start-up, before any socket is bound or store
opened.  Follows DESIGN.md §3 and daemon-behaviour.md §2.1 and §9:
``NIX_STORE_DIR`` (or ``NIX_STORE``), ``NIX_STATE_DIR``, ``NIX_LOG_DIR`` and
``NIX_DAEMON_SOCKET_PATH`` (each empty = unset), then the ``store`` setting:

* ``auto`` (or empty): the local store if the state directory is writable;
  else, when the daemon socket exists, the store is another daemon; else a
  non-root user with neither ``NIX_STORE_DIR`` nor ``NIX_STATE_DIR`` gets a
  private chroot store in ``$XDG_DATA_HOME/nix/root`` (as CppNix does for
  users without ``/nix``); else the local store.
* ``local``, ``local?root=R&store=S&state=T&log=L&real=D``, or an absolute
  path ``/x`` (= ``local?root=/x``).
* ``daemon`` or ``unix://PATH``: another daemon.  Serving a socket on top
  of it would make the daemon talk to itself, so this is an error in socket
  mode; with ``--stdio`` the connection is forwarded (§7).

The socket is ``$NIX_DAEMON_SOCKET_PATH`` or ``<state>/daemon-socket/socket``
of the store's own state directory (the newer-Nix rule, §2.1).  When a
client with the stock defaults would not find the daemon, ``client_hint``
is the exact environment it needs.

Trust: the inputs are the daemon's own environment and configuration
(root's); they are validated (absolute paths, known store types), never
taken from clients.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.parse import unquote

DEFAULT_STORE_DIR = "/nix/store"
DEFAULT_STATE_DIR = "/nix/var/nix"
DEFAULT_LOG_DIR = "/nix/var/log/nix"
SOCKET_SUFFIX = "daemon-socket/socket"
DEFAULT_SOCKET = f"{DEFAULT_STATE_DIR}/{SOCKET_SUFFIX}"
LOCAL_PARAMS = ("root", "store", "state", "log", "real")


class LocationError(Exception):
    """The configured locations cannot be served; the message says why."""


@dataclass(frozen=True, slots=True)
class Locations:
    """Resolved locations of the store the daemon serves.

    ``store_dir`` is the logical store directory (what clients see);
    ``real_store_dir`` is where the files are (differs for chroot stores).
    ``forward_socket`` is set only in ``--stdio`` mode when the configured
    store is another daemon: the session is forwarded there.
    """

    store_dir: str
    real_store_dir: str
    state_dir: str
    log_dir: str
    socket_path: str
    private_store: bool = False
    client_hint: str | None = None
    forward_socket: str | None = None


@dataclass(frozen=True, slots=True)
class _Env:
    store_dir: str
    state_dir: str
    log_dir: str
    socket_override: str | None
    dirs_from_env: bool


def _env_path(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = environ.get(name)
        if value:
            return _absolute(value, name)
    return None


def _absolute(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise LocationError(f"{what} must be an absolute path, not '{path}'")
    return "/" + "/".join(p for p in posixpath.normpath(path).split("/") if p)


def _read_env(environ: Mapping[str, str]) -> _Env:
    store = _env_path(environ, "NIX_STORE_DIR", "NIX_STORE")
    state = _env_path(environ, "NIX_STATE_DIR")
    return _Env(
        store_dir=store or DEFAULT_STORE_DIR,
        state_dir=state or DEFAULT_STATE_DIR,
        log_dir=_env_path(environ, "NIX_LOG_DIR") or DEFAULT_LOG_DIR,
        socket_override=_env_path(environ, "NIX_DAEMON_SOCKET_PATH"),
        dirs_from_env=store is not None or state is not None)


def parse_store_uri(uri: str) -> tuple[str, dict[str, str]]:
    """Split a store URI into its base and percent-decoded query parameters."""
    base, _, query = uri.partition("?")
    params: dict[str, str] = {}
    for pair in query.split("&") if query else ():
        key, _, value = pair.partition("=")
        params[unquote(key)] = unquote(value)
    return base, params


def _writable(path: str) -> bool:
    return os.access(path, os.R_OK | os.W_OK)


def resolve_locations(settings, environ: Mapping[str, str], euid: int, *,
                      stdio: bool = False,
                      path_writable: Callable[[str], bool] = _writable,
                      path_exists: Callable[[str], bool] = os.path.exists,
                      ) -> Locations:
    """Resolve where the daemon's store and socket are.

    Args:
        settings: ``config.Settings`` (only ``store`` is read).
        environ: the daemon's environment.
        euid: the daemon's effective uid.
        stdio: ``--stdio`` mode (a daemon store is forwarded to, not an error).
        path_writable, path_exists: file-system probes (replaced in tests).

    Returns:
        Locations.

    Raises:
        LocationError: unsupported store type, relative paths, or a store
            that is this daemon itself.
    """
    env = _read_env(environ)
    base, params = parse_store_uri(settings.store)
    if base in ("", "auto"):
        return _resolve_auto(env, params, environ, euid, stdio,
                             path_writable, path_exists)
    if base == "local":
        return _local(env, params)
    if base.startswith("/") and "://" not in base:
        return _local(env, {**params, "root": base})
    if base == "daemon" or base.startswith("unix://"):
        target = base[len("unix://"):] if base.startswith("unix://") else None
        return _daemon_store(env, settings.store, target or _socket(env, env.state_dir),
                             stdio)
    raise LocationError(
        f"nixwarden serves only a local store; the store '{settings.store}' "
        "(setting 'store' or NIX_REMOTE) is not supported")


def _resolve_auto(env, params, environ, euid, stdio, path_writable, path_exists):
    state = params.get("state") or env.state_dir
    if path_writable(state):
        return _local(env, params)
    if path_exists(_socket(env, state)):
        return _daemon_store(env, "auto", _socket(env, state), stdio)
    if euid != 0 and not env.dirs_from_env and not params:
        root = posixpath.join(_data_home(environ), "nix", "root")
        return _local(env, {"root": root}, private=True)
    return _local(env, params)


def _data_home(environ: Mapping[str, str]) -> str:
    if environ.get("XDG_DATA_HOME"):
        return _absolute(environ["XDG_DATA_HOME"], "XDG_DATA_HOME")
    home = environ.get("HOME")
    if not home:
        raise LocationError("cannot place a private store: HOME is not set")
    return posixpath.join(_absolute(home, "HOME"), ".local", "share")


def _socket(env: _Env, state_dir: str) -> str:
    return env.socket_override or f"{state_dir}/{SOCKET_SUFFIX}"


def _local(env: _Env, params: Mapping[str, str], *, private: bool = False) -> Locations:
    root = _absolute(params["root"], "store root") if params.get("root") else None
    store_dir = _absolute(params["store"], "store") if params.get("store") else env.store_dir
    state = params.get("state") or (f"{root}/nix/var/nix" if root else env.state_dir)
    log = params.get("log") or (f"{root}/nix/var/log/nix" if root else env.log_dir)
    real = params.get("real") or (f"{root}{store_dir}" if root else store_dir)
    state, log, real = (_absolute(state, "state"), _absolute(log, "log"),
                        _absolute(real, "real"))
    socket = _socket(env, state)
    return Locations(store_dir, real, state, log, socket, private,
                     _client_hint(socket, store_dir))


def _client_hint(socket: str, store_dir: str) -> str | None:
    """What a client with stock defaults must set to reach this daemon."""
    parts = []
    if store_dir != DEFAULT_STORE_DIR:
        parts.append(f"NIX_STORE_DIR={store_dir}")
    if socket != DEFAULT_SOCKET:
        parts.append(f"NIX_REMOTE=unix://{socket}")
    return " ".join(parts) or None


def _daemon_store(env: _Env, uri: str, target: str, stdio: bool) -> Locations:
    if not stdio:
        raise LocationError(
            f"the store '{uri}' is the daemon at '{target}': a daemon serving "
            "it would talk to itself; set 'store = local' (or NIX_REMOTE=local) "
            "or make the state directory writable")
    socket = _socket(env, env.state_dir)
    return Locations(env.store_dir, env.store_dir, env.state_dir, env.log_dir,
                     socket, False, None, forward_socket=_absolute(target, "socket"))
