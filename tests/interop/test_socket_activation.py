"""Socket activation (daemon-behaviour §2.3): LISTEN_FDS honoured only when
LISTEN_PID is ours.

``systemd-socket-activate -l PATH CMD`` listens on PATH and, at the first
connection, starts CMD with the socket as fd 3 and LISTEN_FDS/LISTEN_PID
set (it passes on only the variables named with ``-E``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import needs_nix
from lib.nixenv import NixEnv, new_root, nixwarden_cmd

pytestmark = [needs_nix, pytest.mark.interop,
              pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                                 reason="needs systemd-socket-activate")]


@pytest.fixture
def env():
    root = new_root()
    yield NixEnv(root)
    shutil.rmtree(root, ignore_errors=True)


def test_nix_store_ping_through_an_activated_socket(env):
    path = env.add_text("activated.txt", "activated\n")
    sock = os.path.join(env.root, "activated.sock")
    daemon_env = dict(env.env)
    daemon_env.pop("NIX_REMOTE")
    cmd = ["systemd-socket-activate", "-l", sock]
    cmd += [f"-E{k}={v}" for k, v in daemon_env.items()]
    proc = subprocess.Popen(cmd + nixwarden_cmd(), env=daemon_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.02)
        ping = env.run("nix", "store", "ping", "--store", f"unix://{sock}", check=False)
        assert ping.returncode == 0, ping.stderr
        assert ping.stderr == f"Store URL: unix://{sock}\nVersion: 2.8.0\n".encode()
        query = env.run("nix-store", "--store", f"unix://{sock}", "-q", "--hash", path)
        local = env.run("nix-store", "-q", "--hash", path, remote="local")
        assert query.stdout == local.stdout
        assert proc.poll() is None  # the daemon keeps serving the inherited socket
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert b"accepted connection" in err


@pytest.mark.parametrize("listen", [{"LISTEN_PID": "1", "LISTEN_FDS": "1"},
                                    {"LISTEN_FDS": "1"}])
def test_listen_pid_mismatch_like_nix_daemon(env, listen):
    results = []
    daemon_env = dict(env.env, **listen)
    daemon_env.pop("NIX_REMOTE")
    for cmd in (["nix-daemon"], nixwarden_cmd()):
        proc = subprocess.run(cmd, env=daemon_env, capture_output=True,
                              timeout=30)
        results.append((proc.returncode, proc.stderr.decode().splitlines()[-1:]))
    assert results[0] == (1, ["error: unexpected systemd environment variables"])
    assert results[1] == results[0]
    assert not os.path.exists(env.socket_path)  # nothing was bound instead
