"""deploy/: the systemd units, the example nix.conf and install.sh.

install.sh is never run against the real /nix or /etc here.  The units are
checked with ``systemd-analyze verify`` and against the daemon's own
default socket path; install.sh with ``bash -n`` and shellcheck; and its
daemon-start logic runs for real on a chroot store (``NIXWARDEN_ROOT``),
with install.sh sourced so that only the tested functions run.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from lib.nixenv import new_root
from lib.wclient import WClient

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")
INSTALL_SH = os.path.join(DEPLOY, "install.sh")
VENV = os.path.dirname(os.path.dirname(sys.executable))
NIXWARDEN_BIN = os.path.join(os.path.dirname(sys.executable), "nixwarden")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str
    with open(os.path.join(DEPLOY, name)) as f:
        parser.read_file(f)
    return parser


def isolated_conf_env(conf_dir) -> dict[str, str]:
    """Only ``conf_dir``/nix.conf is read, whatever the machine has."""
    return {"NIX_CONF_DIR": str(conf_dir), "HOME": str(conf_dir),
            "XDG_CONFIG_HOME": os.path.join(conf_dir, "no-such-dir"),
            "XDG_CONFIG_DIRS": os.path.join(conf_dir, "no-such-dir")}


# --- unit files ------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path):
    # Verify copies whose ExecStart names this test's nixwarden when the
    # installed link /usr/local/bin/nixwarden is absent (verify checks that
    # the command exists).
    exec_path = "/usr/local/bin/nixwarden"
    for name in ("nixwarden.socket", "nixwarden.service"):
        with open(os.path.join(DEPLOY, name)) as f:
            text = f.read()
        if not os.access(exec_path, os.X_OK) and os.access(NIXWARDEN_BIN, os.X_OK):
            text = text.replace(f"ExecStart={exec_path} ", f"ExecStart={NIXWARDEN_BIN} ")
        (tmp_path / name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", "nixwarden.socket", "nixwarden.service"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "nixwarden" not in out, out  # no warning about our units


def test_socket_unit_listens_on_the_daemons_default_socket(tmp_path):
    from nixwarden.supervisor import cli
    from nixwarden.supervisor.locations import resolve_locations

    env = isolated_conf_env(tmp_path)
    opts = cli.parse_daemon_args(["daemon"], env, euid=0, read_file=lambda p: None)
    loc = resolve_locations(opts.settings, env, 0, path_writable=lambda p: True,
                            path_exists=lambda p: True)
    sock = read_unit("nixwarden.socket")["Socket"]
    assert sock["ListenStream"] == loc.socket_path == "/nix/var/nix/daemon-socket/socket"
    assert sock["SocketMode"] == "0666"


def test_service_unit_runs_the_installed_daemon():
    service = read_unit("nixwarden.service")["Service"]
    assert service["ExecStart"] == "/usr/local/bin/nixwarden daemon"
    assert service["KillMode"] == "mixed"
    assert service["LimitNOFILE"] == "1048576"
    # The link install.sh makes must be what ExecStart runs.
    with open(INSTALL_SH) as f:
        assert "bin_link=/usr/local/bin/nixwarden\n" in f.read()


def test_example_nix_conf_is_accepted_by_nixwarden(tmp_path):
    from nixwarden.supervisor import cli

    shutil.copy(os.path.join(DEPLOY, "nix.conf"), tmp_path / "nix.conf")
    env = isolated_conf_env(tmp_path)
    opts = cli.parse_daemon_args(["daemon"], env, euid=0)
    assert opts.warnings == []
    s = opts.settings
    assert s.build_users_group == "nixbld"
    assert list(s.trusted_users) == ["root"]
    assert list(s.allowed_users) == ["*"]
    assert s.worker_user == "nixwarden"


# --- install.sh, statically ----------------------------------------------------------


def test_install_sh_parses():
    subprocess.run(["bash", "-n", INSTALL_SH], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
def test_install_sh_passes_shellcheck():
    proc = subprocess.run(["shellcheck", INSTALL_SH], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_install_sh_refuses_non_root_and_unknown_arguments():
    proc = subprocess.run([INSTALL_SH, "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "unknown argument '--bogus'" in proc.stderr
    if os.geteuid() != 0:
        proc = subprocess.run([INSTALL_SH], capture_output=True, text=True)
        assert proc.returncode == 1 and "run me as root" in proc.stderr


# --- install.sh's daemon start, for real on a chroot store -------------------------------


class Installer:
    """Runs functions of a sourced install.sh with NIXWARDEN_ROOT=root."""

    def __init__(self, root: str):
        self.root = root
        self.env = dict(os.environ, NIXWARDEN_ROOT=root, NIXWARDEN_VENV=VENV,
                        NIXWARDEN_BIN=NIXWARDEN_BIN, NIXWARDEN_START_TIMEOUT="30")
        self.socket = os.path.join(root, "nix/var/nix/daemon-socket/socket")
        self.pid_file = os.path.join(root, "run/nixwarden.pid")
        self.started: set[int] = set()

    def call(self, *functions: str) -> subprocess.CompletedProcess:
        script = f'source "{INSTALL_SH}"; ' + "; ".join(functions)
        proc = subprocess.run(["bash", "-c", script], env=self.env, capture_output=True,
                              text=True, timeout=120)
        if os.path.exists(self.pid_file):
            self.started.add(self.pid())
        return proc

    def pid(self) -> int:
        with open(self.pid_file) as f:
            return int(f.read())

    def cleanup(self) -> None:
        for pid in self.started:
            if alive(pid) and is_nixwarden(pid):
                os.kill(pid, signal.SIGTERM)
        for pid in self.started:
            wait_gone(pid)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def is_nixwarden(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"nixwarden" in f.read()
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def installer():
    root = new_root("nw-install-")
    inst = Installer(root)
    yield inst
    inst.cleanup()
    shutil.rmtree(root, ignore_errors=True)


def handshake(path: str) -> WClient:
    client = WClient(path, minor=34)
    assert client.is_valid_path("/nix/store/00000000000000000000000000000000-x") is False
    return client


@needs_root
@pytest.mark.slow
def test_start_background_serves_restarts_and_stops(installer):
    proc = installer.call("install_nix_conf", "start_background")
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(DEPLOY, "nix.conf")) as want, \
            open(os.path.join(installer.root, "etc/nix/nix.conf")) as got:
        assert got.read() == want.read()
    first = installer.pid()
    assert alive(first)
    assert f"listening on {installer.socket}" in proc.stderr
    handshake(installer.socket).close()

    # A real client, with the hint install.sh prints.
    usage = installer.call("print_usage").stdout
    assert f"NIX_REMOTE=unix://{installer.socket}" in usage
    if shutil.which("nix"):
        ping = subprocess.run(
            ["nix", "--extra-experimental-features", "nix-command", "store", "ping"],
            env=dict(os.environ, NIX_REMOTE=f"unix://{installer.socket}"),
            capture_output=True, text=True, timeout=60)
        assert ping.returncode == 0, ping.stderr

    # Running again replaces the daemon it started, by the recorded pid.
    proc = installer.call("install_nix_conf", "start_background")
    assert proc.returncode == 0, proc.stderr
    assert "keeping the existing" in proc.stderr
    assert f"started earlier (pid {first})" in proc.stderr
    second = installer.pid()
    assert second != first and alive(second)
    assert wait_gone(first)
    handshake(installer.socket).close()

    proc = installer.call("stop_recorded_daemon")
    assert proc.returncode == 0, proc.stderr
    assert wait_gone(second)
    assert not os.path.exists(installer.pid_file)
    assert not os.path.exists(installer.socket)  # the daemon removes its socket


@needs_root
@pytest.mark.slow
def test_start_background_refuses_a_daemon_it_did_not_start(installer):
    os.makedirs(os.path.dirname(installer.socket))
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(installer.socket)
    other.listen(1)
    try:
        proc = installer.call("install_nix_conf", "start_background")
    finally:
        other.close()
    assert proc.returncode == 1
    assert "another daemon is serving" in proc.stderr
    assert not os.path.exists(installer.pid_file)


@needs_root
@pytest.mark.slow
def test_start_background_replaces_a_stale_socket_and_ignores_a_foreign_pid(installer):
    os.makedirs(os.path.dirname(installer.socket))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(installer.socket)
    stale.close()  # the file stays; nobody listens
    # A pid file naming a process that is not nixwarden: must not be killed.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        os.makedirs(os.path.dirname(installer.pid_file))
        with open(installer.pid_file, "w") as f:
            f.write(str(bystander.pid))
        proc = installer.call("install_nix_conf", "start_background")
        assert proc.returncode == 0, proc.stderr
        assert bystander.poll() is None
        assert installer.pid() != bystander.pid
        handshake(installer.socket).close()
    finally:
        bystander.kill()
        bystander.wait()
