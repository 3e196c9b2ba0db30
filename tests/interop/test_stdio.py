"""``nixwarden daemon --stdio``: one client on stdin/stdout (daemon-behaviour §7.5).

The client end is one side of a socketpair whose other side is the
daemon's stdin and stdout.  Where the real ``nix-daemon --stdio`` can do
the same thing, the two are compared.
"""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from conftest import needs_nix
from lib.nixenv import NixEnv, new_root, nixwarden_cmd
from lib.wclient import MAGIC_2, WClient

pytestmark = [needs_nix, pytest.mark.interop]

TRUST_OVERRIDE = ["--extra-experimental-features", "daemon-trust-override"]


@pytest.fixture(scope="module")
def store():
    root = new_root()
    env = NixEnv(root)
    path = env.add_text("stdio.txt", "over a pipe\n")
    yield env, path
    shutil.rmtree(root, ignore_errors=True)


class StdioDaemon:
    """A ``--stdio`` daemon whose stdin and stdout are ``self.sock``'s peer."""

    def __init__(self, env: NixEnv, cmd: list[str]):
        self.sock, theirs = socket.socketpair()
        # NIX_REMOTE=local: serve the store itself (not forward to a socket).
        self.proc = subprocess.Popen(cmd + ["--stdio"], stdin=theirs, stdout=theirs,
                                     stderr=subprocess.PIPE,
                                     env=dict(env.env, NIX_REMOTE="local"))
        theirs.close()

    def client(self, minor: int = 38) -> WClient:
        """A WClient on this daemon; a failed handshake reports its stderr."""
        try:
            return WClient(sock=self.sock, minor=minor)
        except (OSError, EOFError, AssertionError) as exc:
            status, err = self.finish()
            raise AssertionError(f"handshake failed ({exc!r}); daemon exit {status}:\n{err}")

    def finish(self, timeout: float = 20) -> tuple[int, str]:
        """Close our end; return the exit status and stderr."""
        self.sock.close()
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"--stdio daemon did not exit: {err!r}")
        return self.proc.returncode, err.decode(errors="replace")


def nixwarden(env, *args) -> StdioDaemon:
    return StdioDaemon(env, nixwarden_cmd() + list(args))


def nix_daemon(env, *args) -> StdioDaemon:
    return StdioDaemon(env, ["nix-daemon"] + list(args))


@pytest.mark.parametrize("minor", [21, 35, 38])
def test_handshake_and_queries(store, minor):
    env, path = store
    d = nixwarden(env)
    c = d.client(minor)
    assert c.server_version == 0x126
    assert c.trusted == (1 if minor >= 35 else None)  # trusted by default
    assert c.is_valid_path(path) is True
    assert c.query_path_info(path)["narSize"] == 128
    nar = env.run("nix-store", "--dump", path, remote="local").stdout
    assert c.nar_from_path(path, len(nar)) == nar
    status, err = d.finish()
    assert status == 0, err


def test_force_untrusted(store):
    env, path = store
    d = nixwarden(env, "--force-untrusted", *TRUST_OVERRIDE)
    c = d.client(38)
    assert c.trusted == 2
    assert c.is_valid_path(path) is True
    assert d.finish()[0] == 0


def test_force_untrusted_needs_the_experimental_feature(store):
    env, _ = store
    d = nixwarden(env, "--force-untrusted")
    status, err = d.finish()
    assert status == 1
    assert "daemon-trust-override" in err


STARTS = pytest.mark.parametrize("start", [nixwarden, nix_daemon],
                                 ids=["nixwarden", "nix-daemon"])

#: nixwarden's --stdio supervisor returns 0 whatever happened: the worker
#: that met the error exits 1, but the supervisor waits for the session
#: process only and nothing reports the worker's status back to it.


@STARTS
def test_stdin_closed_after_handshake_exits_0(store, start):
    env, path = store
    d = start(env)
    c = d.client()
    assert c.is_valid_path(path) is True
    status, err = d.finish()
    assert status == 0, err


def test_stdin_closed_before_handshake_like_nix_daemon(store):
    got = [start(store[0]).finish() for start in (nix_daemon, nixwarden)]
    assert got[0] == (1, "error: unexpected end-of-file\n")
    assert got[1][0] == 1 and got[1][1].splitlines()[-1] == "error: unexpected end-of-file"


def results_for_wrong_magic(env, start) -> tuple[int, bytes, str]:
    d = start(env)
    d.sock.sendall(WClient.u64(MAGIC_2))
    d.sock.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := d.sock.recv(4096):
        got += chunk
    status, err = d.finish()
    return status, got, err.splitlines()[-1] if err else ""


def test_wrong_magic_message(store):
    assert results_for_wrong_magic(store[0], nixwarden)[1:] == (b"", "error: protocol mismatch")


def test_wrong_magic_like_nix_daemon(store):
    want = results_for_wrong_magic(store[0], nix_daemon)
    got = results_for_wrong_magic(store[0], nixwarden)
    assert want == (1, b"", "error: protocol mismatch")
    assert got == want


def test_quiet_on_stderr_like_nix_daemon(store):
    env, path = store
    errs = []
    for start in (nix_daemon, nixwarden):
        d = start(env)
        assert d.client().is_valid_path(path) is True
        status, err = d.finish()
        errs.append((status, err))
    assert errs[1] == errs[0] == (0, "")
