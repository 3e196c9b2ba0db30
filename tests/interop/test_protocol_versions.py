"""Worker-protocol versions 1.21-1.38 against nixwarden, with tests/lib/wclient.

Handshake fields per version (spec worker-protocol §3.2), the Nix 2.23
"version twice" quirk (§3.5), version-gated request and reply formats
(QueryPathInfo §2.11, errors §4.3, QueryValidPaths §5.27,
QuerySubstitutablePathInfos §5.26), trust as seen by an untrusted user and
SetOptions overrides from one (compared with the real nix-daemon), and the
connections the daemon must refuse.

Not testable here: the QueryPathInfo forms before 1.16/1.17, because
nixwarden refuses clients older than 1.21 (MIN_CLIENT_VERSION).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct

import pytest

from conftest import needs_nix, needs_root
from lib.nixenv import NixEnv, new_root, start_nixwarden
from lib.samplestore import populate
from lib.wclient import MAGIC_1, MAGIC_2, DaemonError, WClient

pytestmark = [needs_nix, pytest.mark.interop]

MINORS = [21, 32, 33, 34, 35, 37, 38]
SERVER_VERSION = 0x126


@pytest.fixture(scope="module")
def store():
    root = new_root()
    env = NixEnv(root)
    paths = populate(env)
    daemon = start_nixwarden(env)
    yield env, paths
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


def expected_info(env, path: str) -> dict:
    """Path info of ``path`` as the real Nix reads it from the store directly."""
    drv = ["--derivation"] if path.endswith(".drv") else []  # else: its outputs
    info = json.loads(env.run("nix", "path-info", "--json", *drv, path,
                              remote="local").stdout)[0]
    assert info["path"] == path
    nar = env.run("nix-store", "--dump", path, remote="local").stdout
    return {"deriver": info.get("deriver", ""), "narHash": hashlib.sha256(nar).hexdigest(),
            "references": sorted(info["references"]), "narSize": info["narSize"],
            "registrationTime": info["registrationTime"], "ca": info.get("ca", ""),
            "ultimate": info.get("ultimate", False)}


def check_info(got: dict, want: dict) -> None:
    got = dict(got, references=sorted(got["references"]))
    assert got.pop("sigs") == []
    assert got == want


# --- handshake -----------------------------------------------------------------

@pytest.mark.parametrize("minor", MINORS)
def test_handshake_fields_per_version(store, minor):
    env, paths = store
    c = WClient(env.socket_path, minor)
    assert c.server_version == SERVER_VERSION
    assert c.version == minor
    # wclient reads the version string only from 1.33 and the trust flag only
    # from 1.35; reaching STDERR_LAST in step proves neither came earlier.
    assert c.daemon_version == ("2.8.0" if minor >= 33 else None)
    assert c.trusted == (1 if minor >= 35 else None)
    if minor >= 38:
        assert c.server_features == []
    assert c.is_valid_path(paths["file"]) is True
    assert c.is_valid_path(paths["invalid"]) is False
    c.close()


def test_feature_exchange_with_client_features(store):
    env, paths = store
    c = WClient(env.socket_path, 38, features=["some-future-feature", "another"])
    assert c.server_features == []
    assert c.is_valid_path(paths["dir"]) is True


def test_client_newer_than_server_gets_server_version(store):
    env, paths = store
    c = WClient(env.socket_path, 0x40)
    assert c.version == 38 and c.server_features == []
    assert c.is_valid_path(paths["file"]) is True


def test_nix_2_23_sends_its_version_twice(store):
    """Nix 2.23 speaks 1.37 (a 1.38 client has no such quirk)."""
    env, paths = store
    c = WClient(env.socket_path, 37, version_twice=True)
    assert c.daemon_version == "2.8.0" and c.trusted == 1
    assert c.is_valid_path(paths["top_out"]) is True
    assert c.query_path_info(paths["top_out"])["narSize"] > 0


# --- version-gated formats ------------------------------------------------------

@pytest.mark.parametrize("minor", MINORS)
def test_query_path_info(store, minor):
    env, paths = store
    c = WClient(env.socket_path, minor)
    for key in ("file", "dir", "top_drv", "top_out", "top_dev"):
        check_info(c.query_path_info(paths[key]), expected_info(env, paths[key]))
    assert c.query_path_info(paths["invalid"]) is None  # >= 1.17: a flag, no error
    assert c.is_valid_path(paths["file"]) is True


@pytest.mark.parametrize("minor", [21, 25, 26, 38])
def test_error_format(store, minor):
    env, paths = store
    c = WClient(env.socket_path, minor)
    c.exit_status = None
    with pytest.raises(DaemonError) as err:
        c.op(4, c.s(paths["invalid"]))  # QueryPathHash
    assert str(err.value) == f"path '{paths['invalid']}' is not valid"
    assert c.exit_status == (1 if minor < 26 else None)
    assert c.is_valid_path(paths["file"]) is True  # the session goes on


@pytest.mark.parametrize("minor", [21, 26, 27, 38])
@pytest.mark.parametrize("substitute", [False, True])
def test_query_valid_paths(store, minor, substitute):
    env, paths = store
    c = WClient(env.socket_path, minor)
    asked = [paths["invalid"], paths["file"], paths["top_dev"]]
    got = c.query_valid_paths(asked, substitute)
    assert sorted(got) == sorted([paths["file"], paths["top_dev"]])
    assert c.is_valid_path(paths["file"]) is True


@pytest.mark.parametrize("minor", [21, 22, 38])
def test_query_substitutable_path_infos_is_empty(store, minor):
    env, paths = store
    c = WClient(env.socket_path, minor)
    assert c.query_substitutable_path_infos([paths["invalid"], paths["file"]]) == 0
    assert c.query_substitutable_path_infos([]) == 0
    assert c.is_valid_path(paths["file"]) is True


# --- untrusted users ------------------------------------------------------------

def as_user(user, fn):
    """Run ``fn()`` in a child process with ``user``'s uid/gid; return its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            out = {"ok": fn()}
        except BaseException as exc:  # report everything to the parent
            out = {"error": repr(exc)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data)
    assert "error" not in out, out["error"]
    return out["ok"]


@needs_root
@pytest.mark.parametrize("minor", [34, 35, 38])
def test_untrusted_user_trust_flag(store, test_user, minor):
    env, paths = store

    def client():
        c = WClient(env.socket_path, minor)
        return [c.trusted, c.is_valid_path(paths["file"])]
    assert as_user(test_user, client) == [2 if minor >= 35 else None, True]


OVERRIDES = [("sandbox", "false"), ("timeout", "7"), ("builders", ""),
             ("substituters", "https://untrusted.example.org"), ("no-such-setting", "1")]


def set_options_logs(nixenv) -> list[str]:
    """The log lines a client gets for SetOptions with OVERRIDES; checks sync."""
    c = WClient(nixenv.socket_path, 38, send_set_options=False)
    c.set_options(OVERRIDES)
    logs = list(c.logs)
    assert c.is_valid_path(nixenv.store_dir + "/" + "0" * 32 + "-x") is False
    return logs


@needs_root
def test_set_options_overrides_from_untrusted_user_like_nix_daemon(store, test_user,
                                                                   nix_daemon_factory):
    env, _ = store
    root = new_root()
    try:
        other = NixEnv(root)  # the messages name no store path: any store will do
        nix_daemon_factory(other)
        want = as_user(test_user, lambda: set_options_logs(other))
        got = as_user(test_user, lambda: set_options_logs(env))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert any("untrusted.example.org" in line for line in want)
    assert got == want


def test_set_options_overrides_from_trusted_user_are_silent(store):
    env, _ = store
    assert set_options_logs(env) == []


# --- refused connections --------------------------------------------------------

def raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def read_to_eof(s: socket.socket) -> bytes:
    """All bytes until the daemon closes (a reset, when it left our bytes
    unread, counts as a close)."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.mark.parametrize("version", [0x114, 0x10A, 0x00, 0x226])
def test_unsupported_client_version_is_dropped(store, version):
    """Below 1.21 (or not major 1): the server hello, then nothing but EOF."""
    env, paths = store
    s = raw_connect(env.socket_path)
    s.sendall(struct.pack("<Q", MAGIC_1))
    assert struct.unpack("<QQ", s.recv(16, socket.MSG_WAITALL)) == (MAGIC_2, SERVER_VERSION)
    s.sendall(struct.pack("<QQQ", version, 0, 0))
    assert read_to_eof(s) == b""
    assert WClient(env.socket_path).is_valid_path(paths["file"]) is True


@pytest.mark.parametrize("hello", [struct.pack("<Q", MAGIC_2), b"GET / HTTP/1.1\r\n\r\n",
                                   struct.pack("<Q", MAGIC_1 + (1 << 32))])
def test_wrong_magic_is_dropped_like_nix_daemon(store, nix_daemon_factory, hello):
    env, paths = store
    root = new_root()
    try:
        other = NixEnv(root)
        nix_daemon_factory(other)
        answers = []
        for path in (other.socket_path, env.socket_path):
            s = raw_connect(path)
            s.sendall(hello)
            answers.append(read_to_eof(s))
        assert answers[1] == answers[0] == b""
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert WClient(env.socket_path).is_valid_path(paths["file"]) is True
