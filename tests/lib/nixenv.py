"""Isolated Nix stores and daemons for the interop tests.

A ``NixEnv`` is a temporary store (store, state, log and conf directories
under one root) with the environment a real Nix client needs to use it,
either directly (``local``) or through a daemon's socket.  ``Daemon``
starts nixwarden or the real nix-daemon on such a store, waits for its
socket and stops it by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from lib.wclient import MAGIC_1

NIX_CONF = """\
build-users-group =
sandbox = false
substituters =
experimental-features = nix-command
"""


def nixwarden_cmd() -> list[str]:
    return [sys.executable, "-m", "nixwarden.supervisor", "daemon"]


@dataclass
class NixEnv:
    root: str
    extra_conf: str = ""
    env: dict = field(init=False)

    def __post_init__(self) -> None:
        for sub in ("store", "var/nix", "var/log/nix", "etc", "home"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(self.root, 0o755)
        with open(self.conf_path, "w") as f:
            f.write(NIX_CONF + self.extra_conf)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.path.join(self.root, "home"),
            "XDG_CONFIG_HOME": os.path.join(self.root, "home/.config"),
            "XDG_CACHE_HOME": os.path.join(self.root, "home/.cache"),
            "NIX_STORE_DIR": self.store_dir,
            "NIX_STATE_DIR": os.path.join(self.root, "var/nix"),
            "NIX_LOG_DIR": os.path.join(self.root, "var/log/nix"),
            "NIX_CONF_DIR": os.path.join(self.root, "etc"),
            "NIX_DAEMON_SOCKET_PATH": self.socket_path,
            "NIX_REMOTE": "daemon",
            "LANG": "C.UTF-8",
        }

    @property
    def store_dir(self) -> str:
        return os.path.join(self.root, "store")

    @property
    def socket_path(self) -> str:
        return os.path.join(self.root, "var/nix/daemon-socket/socket")

    @property
    def conf_path(self) -> str:
        return os.path.join(self.root, "etc/nix.conf")

    def run(self, *args, remote: str = "daemon", check: bool = True, input=None,
            user: str | None = None, env: dict | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a Nix client command against this store."""
        full_env = dict(self.env, NIX_REMOTE=remote, **(env or {}))
        cmd = list(args)
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                   "--"] + cmd
        proc = subprocess.run(cmd, env=full_env, capture_output=True, input=input,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{cmd} failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')}")
        return proc

    def add_text(self, name: str, text: str) -> str:
        """Add a file through the real Nix directly (no daemon); return its path."""
        src = os.path.join(self.root, "home", name)
        with open(src, "w") as f:
            f.write(text)
        return self.run("nix-store", "--add", src, remote="local").stdout.decode().strip()

    def clone(self, dest: str) -> "NixEnv":
        """An identical copy of this store under ``dest`` (for differential tests)."""
        shutil.copytree(self.root, dest, symlinks=True, dirs_exist_ok=True)
        other = NixEnv(dest, self.extra_conf)
        return other


class Daemon:
    """A daemon process serving one ``NixEnv``."""

    def __init__(self, nixenv: NixEnv, cmd: list[str], *, extra_env=None, args=(),
                 socket_path: str | None = None):
        self.nixenv = nixenv
        self.socket_path = socket_path or nixenv.socket_path
        self.cmd = list(cmd) + list(args)
        self.log_path = os.path.join(nixenv.root, f"daemon-{os.getpid()}-{time.time_ns()}.log")
        env = dict(nixenv.env, NIX_DAEMON_SOCKET_PATH=self.socket_path)
        env.update(extra_env or {})
        env.pop("NIX_REMOTE", None)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 30.0) -> "Daemon":
        """Wait until the socket accepts connections (a stale file left by
        an earlier daemon on the same store does not count)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if _accepts(self.socket_path):
                return self
            time.sleep(0.02)
        raise AssertionError(f"daemon did not start:\n{self.output()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def start_nixwarden(nixenv: NixEnv, *args, extra_env=None, socket_path=None) -> Daemon:
    """nixwarden on ``nixenv``'s store, at its socket or at ``socket_path``."""
    return Daemon(nixenv, nixwarden_cmd(), args=args, extra_env=extra_env,
                  socket_path=socket_path).wait_ready()


def start_nix_daemon(nixenv: NixEnv, *args, socket_path=None) -> Daemon:
    """The real nix-daemon on ``nixenv``'s store (both may serve one store at
    once, at different sockets, for queries)."""
    return Daemon(nixenv, ["nix-daemon"], args=args, socket_path=socket_path).wait_ready()


def _accepts(path: str) -> bool:
    """Whether ``path`` accepts a connection; then wait for the daemon's first
    handshake word, so the store it serves has been opened (and, if new,
    created) before any test connects: nix-daemon 2.8 opens the store in each
    connection's child, and two children creating one new store race on the
    gcroots/profiles link ("creating symlink ...: File exists")."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        s.settimeout(30)
        try:
            s.sendall(struct.pack("<Q", MAGIC_1))
            s.recv(8)
        except OSError:
            pass  # it accepted; what it answers is the tests' business
    return True


def new_root(prefix: str = "nw-") -> str:
    return tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("NIXWARDEN_TEST_TMP", "/tmp"))
