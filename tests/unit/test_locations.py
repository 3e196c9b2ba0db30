"""Tests for supervisor/locations.py (DESIGN.md §3, daemon-behaviour.md §2.1, §9)."""

import pytest

from nixwarden.supervisor.config import Settings
from nixwarden.supervisor.locations import (
    LocationError, Locations, parse_store_uri, resolve_locations)


def settings(store="auto"):
    return Settings.defaults({}, 0).with_values({"store": store})


def resolve(store="auto", environ=None, euid=0, writable=(), exists=(), **kw):
    return resolve_locations(settings(store), environ or {}, euid,
                             path_writable=lambda p: p in writable,
                             path_exists=lambda p: p in exists, **kw)


DEFAULT = Locations("/nix/store", "/nix/store", "/nix/var/nix", "/nix/var/log/nix",
                    "/nix/var/nix/daemon-socket/socket", False, None)


def test_root_defaults():
    assert resolve(writable={"/nix/var/nix"}) == DEFAULT
    assert resolve("local") == DEFAULT
    assert resolve("") == resolve("auto", writable={"/nix/var/nix"})


def test_environment_variables():
    env = {"NIX_STORE_DIR": "/s/store", "NIX_STATE_DIR": "/s/state/",
           "NIX_LOG_DIR": "/s/log", "NIX_DAEMON_SOCKET_PATH": "/run/nw.sock"}
    loc = resolve("local", env)
    assert (loc.store_dir, loc.real_store_dir, loc.state_dir, loc.log_dir,
            loc.socket_path) == ("/s/store", "/s/store", "/s/state", "/s/log",
                                 "/run/nw.sock")
    assert loc.client_hint == "NIX_STORE_DIR=/s/store NIX_REMOTE=unix:///run/nw.sock"


def test_nix_store_is_an_alias_and_empty_means_unset():
    assert resolve("local", {"NIX_STORE": "/o/store"}).store_dir == "/o/store"
    empty = {k: "" for k in ("NIX_STORE_DIR", "NIX_STATE_DIR", "NIX_LOG_DIR",
                             "NIX_DAEMON_SOCKET_PATH")}
    assert resolve("local", empty) == DEFAULT


def test_state_dir_moves_the_socket():
    loc = resolve("local", {"NIX_STATE_DIR": "/st"})
    assert loc.socket_path == "/st/daemon-socket/socket"
    assert loc.client_hint == "NIX_REMOTE=unix:///st/daemon-socket/socket"


def test_relative_paths_are_refused():
    with pytest.raises(LocationError):
        resolve("local", {"NIX_STATE_DIR": "rel"})


def test_local_root():
    loc = resolve("local?root=/r")
    assert (loc.store_dir, loc.real_store_dir, loc.state_dir, loc.log_dir,
            loc.socket_path) == ("/nix/store", "/r/nix/store", "/r/nix/var/nix",
                                 "/r/nix/var/log/nix", "/r/nix/var/nix/daemon-socket/socket")
    assert not loc.private_store
    assert loc.client_hint == "NIX_REMOTE=unix:///r/nix/var/nix/daemon-socket/socket"
    assert resolve("/r") == loc


def test_local_explicit_parameters():
    loc = resolve("local?store=/ls&state=/lst&log=/ll&real=/lr%2Fx")
    assert (loc.store_dir, loc.real_store_dir, loc.state_dir, loc.log_dir) == (
        "/ls", "/lr/x", "/lst", "/ll")
    loc = resolve("local?root=/r&store=/other/store")
    assert (loc.store_dir, loc.real_store_dir) == ("/other/store", "/r/other/store")


def test_parse_store_uri():
    assert parse_store_uri("local?root=/a%20b&x") == ("local", {"root": "/a b", "x": ""})
    assert parse_store_uri("daemon") == ("daemon", {})


def test_private_store_for_non_root_without_nix():
    loc = resolve(euid=1000, environ={"HOME": "/home/u"})
    root = "/home/u/.local/share/nix/root"
    assert loc.private_store
    assert (loc.store_dir, loc.real_store_dir, loc.state_dir, loc.log_dir) == (
        "/nix/store", f"{root}/nix/store", f"{root}/nix/var/nix", f"{root}/nix/var/log/nix")
    assert loc.socket_path == f"{root}/nix/var/nix/daemon-socket/socket"
    assert loc.client_hint == f"NIX_REMOTE=unix://{root}/nix/var/nix/daemon-socket/socket"


def test_private_store_uses_xdg_data_home():
    loc = resolve(euid=1000, environ={"HOME": "/home/u", "XDG_DATA_HOME": "/xdg"})
    assert loc.real_store_dir == "/xdg/nix/root/nix/store"


@pytest.mark.parametrize("environ,euid,writable,store", [
    ({"HOME": "/h"}, 0, (), "auto"),                                  # root
    ({"HOME": "/h", "NIX_STATE_DIR": "/st"}, 1000, (), "auto"),       # configured
    ({"HOME": "/h", "NIX_STORE_DIR": "/s"}, 1000, (), "auto"),
    ({"HOME": "/h"}, 1000, {"/nix/var/nix"}, "auto"),                 # /nix usable
    ({"HOME": "/h"}, 1000, (), "local"),                              # explicit
])
def test_no_private_store(environ, euid, writable, store):
    assert not resolve(store, environ, euid, writable=writable).private_store


def test_daemon_store_would_talk_to_itself():
    for store in ("daemon", "unix:///x/sock"):
        with pytest.raises(LocationError, match="talk to itself"):
            resolve(store)
    with pytest.raises(LocationError, match="talk to itself"):
        resolve("auto", euid=1000, exists={"/nix/var/nix/daemon-socket/socket"})


def test_daemon_store_is_forwarded_in_stdio_mode():
    assert resolve("daemon", stdio=True).forward_socket == "/nix/var/nix/daemon-socket/socket"
    assert resolve("unix:///x/sock", stdio=True).forward_socket == "/x/sock"
    loc = resolve("daemon", {"NIX_DAEMON_SOCKET_PATH": "/run/s"}, stdio=True)
    assert loc.forward_socket == "/run/s"


@pytest.mark.parametrize("store", ["ssh-ng://host", "https://cache.nixos.org", "file:///x"])
def test_other_store_types_are_refused(store):
    with pytest.raises(LocationError, match="not supported"):
        resolve(store)


def test_store_from_nix_remote_default():
    s = Settings.defaults({"NIX_REMOTE": "local?root=/nr"}, 0)
    assert resolve_locations(s, {}, 0).real_store_dir == "/nr/nix/store"
