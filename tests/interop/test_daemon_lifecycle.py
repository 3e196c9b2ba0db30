"""Start-up and shutdown of the socket daemon (daemon-behaviour §2.2, DESIGN §4).

Stop signals end the daemon with status 0, remove the socket file and
leave none of its processes behind; start-up replaces a stale socket
file, creates the socket's directory, makes the socket 0666, warns about
unknown settings and refuses bad values as nix-daemon does.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time

import pytest

from conftest import needs_nix
from lib.nixenv import Daemon, NixEnv, new_root, nixwarden_cmd, start_nixwarden
from lib.wclient import WClient

pytestmark = [needs_nix, pytest.mark.interop]


@pytest.fixture
def env():
    root = new_root()
    yield NixEnv(root)
    shutil.rmtree(root, ignore_errors=True)


def descendants(pid: int) -> set[int]:
    """All live processes below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running, or a zombie nobody has reaped yet (still counts as left over)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return bool(f.read())
    except OSError:
        return False


def titles(pids) -> list[str]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" ").decode(errors="replace").strip())
        except OSError:
            pass
    return out


def pooled(daemon, kind: str) -> list[int]:
    """The daemon's processes waiting in its ``kind`` ("session", "worker") pool."""
    return [p for p in descendants(daemon.proc.pid)
            if titles([p]) == [f"nixwarden {kind} (ready)"]]


def wait_gone(pids, timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {p for p in pids if alive(p)}
        if not left:
            return left
        time.sleep(0.05)
    return left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_stop_signal_cleans_up(env, sig):
    daemon = start_nixwarden(env)
    env.run("nix", "store", "ping")
    kids = descendants(daemon.pid)
    assert any("nixwarden worker-zygote" in t for t in titles(kids)), titles(kids)
    assert daemon.stop(sig) == 0, daemon.output()
    assert not os.path.exists(env.socket_path)
    left = wait_gone(kids)
    assert not left, titles(left)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_stop_signal_with_a_client_connected(env, sig):
    """An open, idle connection does not keep the daemon's processes alive."""
    path = env.add_text("x.txt", "x")
    daemon = start_nixwarden(env)
    client = WClient(daemon.socket_path)
    assert client.is_valid_path(path) is True
    kids = descendants(daemon.pid)
    assert any(t.startswith("nixwarden worker uid=") for t in titles(kids)), titles(kids)
    try:
        assert daemon.stop(sig) == 0, daemon.output()
        assert not os.path.exists(env.socket_path)
        left = wait_gone(kids)
        assert not left, titles(left)
        client.sock.settimeout(10)
        assert client.sock.recv(1) == b""  # the client sees its connection end
    finally:
        client.close()


def test_stale_socket_file_is_replaced(env):
    os.makedirs(os.path.dirname(env.socket_path), exist_ok=True)
    with open(env.socket_path, "w") as f:
        f.write("stale")
    daemon = start_nixwarden(env)
    try:
        assert stat.S_ISSOCK(os.lstat(env.socket_path).st_mode)
        assert env.run("nix", "store", "ping").returncode == 0
    finally:
        daemon.stop()


def test_socket_mode_and_parent_directory(env):
    sock_dir = os.path.dirname(env.socket_path)
    shutil.rmtree(sock_dir, ignore_errors=True)
    daemon = start_nixwarden(env)
    try:
        assert os.path.isdir(sock_dir)
        assert stat.S_IMODE(os.lstat(env.socket_path).st_mode) == 0o666
        assert env.run("nix", "store", "ping").returncode == 0
    finally:
        daemon.stop()


def test_unknown_setting_warns_and_starts(env):
    with open(env.conf_path, "a") as f:
        f.write("foo = bar\n")
    daemon = Daemon(env, nixwarden_cmd()).wait_ready()
    try:
        assert env.run("nix", "store", "ping").returncode == 0
    finally:
        daemon.stop()
    assert "warning: unknown setting 'foo'" in daemon.output().splitlines()


@pytest.mark.parametrize("line,setting", [("max-jobs = lots", "max-jobs"),
                                          ("sandbox = maybe", "sandbox"),
                                          ("cores = -x", "cores")])
def test_invalid_value_is_fatal_like_nix_daemon(env, line, setting):
    with open(env.conf_path, "a") as f:
        f.write(line + "\n")
    daemon_env = dict(env.env)
    daemon_env.pop("NIX_REMOTE")
    results = []
    for cmd, name in ((["nix-daemon"], "nix-daemon"), (nixwarden_cmd(), "nixwarden daemon")):
        proc = subprocess.run(cmd, env=daemon_env, capture_output=True, timeout=30)
        lines = proc.stderr.decode().splitlines()
        assert lines[-1] == f"Try '{name} --help' for more information."
        results.append((proc.returncode, lines[-2]))
    assert results[0][0] == 1 and f"'{setting}'" in results[0][1]
    assert results[1] == results[0]
    assert not os.path.exists(env.socket_path)


def test_old_schema_store_upgraded_while_clients_connect(env):
    """A store at schema 9 (as an older Nix left it): the first clients of a
    fresh daemon all get answers and the store ends at schema 10.  (Pooled
    sessions used to open it early, each holding the big-lock shared while
    waiting for the exclusive one to upgrade: the first connections hung.)"""
    import socket
    import sqlite3
    import threading
    path = env.add_text("before-upgrade", "kept\n")
    db_dir = os.path.join(env.root, "var/nix/db")
    with sqlite3.connect(os.path.join(db_dir, "db.sqlite")) as conn:
        conn.execute("alter table ValidPaths drop column ca")
    with open(os.path.join(db_dir, "schema"), "w") as f:
        f.write("9")
    d = start_nixwarden(env)
    errors = []

    def client():
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(60)
            sock.connect(env.socket_path)
            c = WClient(sock=sock, minor=35)
            c.close()
        except Exception as exc:  # collected; asserted below
            errors.append(repr(exc))
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == [], d.output()
        r = env.run("nix-store", "-q", "--hash", path)
        assert r.stdout.startswith(b"sha256:")
        with open(os.path.join(db_dir, "schema")) as f:
            assert f.read() == "10"
    finally:
        d.stop()


def test_pools_are_refilled_after_connections(env):
    """Sessions and workers are forked ahead of connections: after a burst
    that uses up both pools, and after single connections, both are full
    again once the daemon is idle (the refill waits for a quiet moment)."""
    from nixwarden.shared import limits
    daemon = start_nixwarden(env)
    try:
        clients = [WClient(env.socket_path, minor=34) for _ in range(limits.SESSION_POOL + 2)]
        for c in clients:
            assert c.is_valid_path(env.store_dir + "/" + "0" * 32 + "-x") is False
            c.close()
        WClient(env.socket_path, minor=34).close()
        deadline = time.monotonic() + 10
        while (len(pooled(daemon, "session")), len(pooled(daemon, "worker"))) \
                != (limits.SESSION_POOL, limits.WORKER_POOL):
            assert time.monotonic() < deadline, titles(descendants(daemon.proc.pid))
            time.sleep(0.05)
    finally:
        daemon.stop()


def test_pooled_sessions_already_hold_the_substitution_and_signature_code(env):
    """The supervisor imports what sessions import on demand before it forks
    them (session.process.preload): a pooled session, before any connection,
    maps the ssl and cryptography extensions (substitution, signatures)."""
    daemon = start_nixwarden(env)
    try:
        deadline = time.monotonic() + 10
        while not (sessions := pooled(daemon, "session")):
            assert time.monotonic() < deadline, titles(descendants(daemon.proc.pid))
            time.sleep(0.05)
        with open(f"/proc/{sessions[0]}/maps") as f:
            maps = f.read()
        assert "/_ssl." in maps, "ssl (urllib3, substitution) not preloaded"
        assert "cryptography" in maps, "cryptography (signatures) not preloaded"
    finally:
        daemon.stop()
