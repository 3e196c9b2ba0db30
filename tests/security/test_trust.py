"""Who may connect and who is trusted, with real unprivileged users
(daemon-behaviour.md §3, DESIGN.md §1: identity fixed at accept time).

Users ``nwtest-a``, ``nwtest-b`` and ``nwtest-c`` (each with its own
primary group) and group ``nwtest-grp`` (listing ``nwtest-c`` in
/etc/group) are created if missing.  Clients run as those users either as
real Nix commands (``setpriv``) or as the independent worker-protocol
client, whose socket is connected with the user's effective ids (SO_PEERCRED
reports the connecting process's effective uid and gid).  Where the real
nix-daemon 2.8 can be compared, it is run on an identical store with the
same nix.conf.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import subprocess

import pytest

from conftest import needs_nix, needs_root
from lib.nixenv import NixEnv, new_root, nixwarden_cmd, start_nix_daemon, start_nixwarden
from lib.wclient import WClient

pytestmark = [needs_root, needs_nix, pytest.mark.root]

USERS = ("nwtest-a", "nwtest-b", "nwtest-c")
GROUP = "nwtest-grp"
TRUST_FEATURE = ["--extra-experimental-features", "daemon-trust-override"]
NOT_ALLOWED = "user 'nwtest-b' is not allowed to connect to the Nix daemon"
RESTRICTED = ("ignoring the client-specified setting 'sandbox', because it is a "
              "restricted setting and you are not a trusted user")
UNTRUSTED_SUBST = "ignoring untrusted substituter 'https://evil.example'"


def _ensure_users() -> None:
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", GROUP], check=True)
    for user in USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent",
                            "--shell", "/usr/sbin/nologin", "--user-group", user],
                           check=True)
    if "nwtest-c" not in grp.getgrnam(GROUP).gr_mem:
        subprocess.run(["usermod", "-a", "-G", GROUP, "nwtest-c"], check=True)


@pytest.fixture(scope="module", autouse=True)
def users():
    _ensure_users()


@contextlib.contextmanager
def _effective(user: str):
    pw = pwd.getpwnam(user)
    os.setegid(pw.pw_gid)
    os.seteuid(pw.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def connect_as(user: str | None, path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    if user is None:
        sock.connect(path)
    else:
        with _effective(user):
            sock.connect(path)
    return sock


def wclient_as(user: str | None, env, minor: int = 35, **kw) -> WClient:
    return WClient(sock=connect_as(user, env.socket_path), minor=minor, **kw)


def trust_flag(user: str | None, env) -> int:
    client = wclient_as(user, env)
    try:
        assert client.version == 35
        return client.trusted
    finally:
        client.close()


def closed_without_a_byte(user: str, env) -> bool:
    """Connect as ``user`` and read: the daemon must close without writing."""
    sock = connect_as(user, env.socket_path)
    try:
        sock.sendall(b"\x63\x78\x69\x6e\x00\x00\x00\x00")  # WORKER_MAGIC_1
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        data = b""
    sock.close()
    return data == b""


@pytest.fixture
def make_env():
    roots = []

    def make(conf: str = "") -> NixEnv:
        env = NixEnv(new_root(), extra_conf=conf)
        roots.append(env.root)
        return env
    yield make
    import shutil
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemons():
    started = []

    def start(env, *args, real=False):
        d = (start_nix_daemon if real else start_nixwarden)(env, *args)
        started.append(d)
        return d
    yield start
    for d in started:
        d.stop()
        # Captured, so pytest shows it only when the test failed.
        print(f"--- {' '.join(d.cmd)} ---\n{d.output()}")


# --- default configuration (trusted-users = root, allowed-users = *) ------------

def test_default_unprivileged_user_can_connect(make_env, daemons):
    env = make_env()
    daemons(env)
    r = env.run("nix", "store", "ping", user="nwtest-a")
    assert b"Store URL: daemon" in r.stdout + r.stderr
    path = env.add_text("hello", "hello\n")
    r = env.run("nix-store", "-q", "--hash", path, user="nwtest-a")
    assert r.stdout.startswith(b"sha256:")


def test_default_trust_flags(make_env, daemons):
    env = make_env()
    d = daemons(env)
    assert trust_flag("nwtest-a", env) == 2
    assert trust_flag(None, env) == 1
    log = d.output()
    assert any(l.endswith(", user nwtest-a") for l in log.splitlines()), log
    assert any(l.endswith("user root (trusted)") for l in log.splitlines()), log


def test_unprivileged_trust_flag_at_older_minor_is_absent(make_env, daemons):
    env = make_env()
    daemons(env)
    client = wclient_as("nwtest-a", env, minor=34)
    assert client.trusted is None
    assert client.is_valid_path(env.store_dir + "/" + "0" * 32 + "-x") is False
    client.close()


# --- trusted-users ---------------------------------------------------------------

def test_trusted_user_by_name(make_env, daemons):
    env = make_env("trusted-users = root nwtest-a\n")
    daemons(env)
    assert trust_flag("nwtest-a", env) == 1
    assert trust_flag("nwtest-b", env) == 2


def test_trusted_group_membership_from_group_database(make_env, daemons):
    env = make_env(f"trusted-users = @{GROUP}\n")
    daemons(env)
    assert trust_flag("nwtest-c", env) == 1      # listed in /etc/group
    assert trust_flag("nwtest-a", env) == 2
    assert trust_flag(None, env) == 2            # root is not in the list


def test_trusted_group_as_primary_group(make_env, daemons):
    env = make_env("trusted-users = @nwtest-a\n")
    daemons(env)
    assert trust_flag("nwtest-a", env) == 1
    assert trust_flag("nwtest-b", env) == 2


def test_trusted_wildcard_and_missing_group(make_env, daemons):
    env = make_env("trusted-users = @nwtest-no-such-group *\n")
    daemons(env)
    assert trust_flag("nwtest-b", env) == 1


# --- allowed-users -----------------------------------------------------------------

def test_allowed_users_refuses_others(make_env, daemons):
    env = make_env("allowed-users = nwtest-a\n")
    d = daemons(env)
    assert trust_flag("nwtest-a", env) == 2
    assert trust_flag(None, env) == 1            # trusted implies allowed
    assert closed_without_a_byte("nwtest-b", env)
    assert NOT_ALLOWED in d.output()
    assert trust_flag("nwtest-a", env) == 2      # the daemon carries on


def test_allowed_group(make_env, daemons):
    env = make_env(f"allowed-users = @{GROUP}\n")
    daemons(env)
    assert trust_flag("nwtest-c", env) == 2
    assert closed_without_a_byte("nwtest-b", env)


@pytest.mark.parametrize("cmd", [["nix", "store", "ping"], ["nix-store", "-q", "--hash", "P"]])
def test_refusal_matches_nix_daemon(make_env, daemons, cmd):
    """Differential: the same nix.conf refuses the same user with the same
    client-visible outcome (exit code and the error's first part)."""
    conf = "allowed-users = nwtest-a\n"
    results = {}
    for real in (False, True):
        env = make_env(conf)
        path = env.add_text("hello", "hello\n")
        d = daemons(env, real=real)
        argv = [path if a == "P" else a for a in cmd]
        refused = env.run(*argv, user="nwtest-b", check=False)
        allowed = env.run(*argv, user="nwtest-a", check=False)
        results[real] = (refused, allowed, d)
    ours, theirs = results[False], results[True]
    assert ours[0].returncode == theirs[0].returncode == 1
    for r in (ours[0], theirs[0]):
        assert b"error: cannot open connection to remote store 'daemon'" in r.stderr, r.stderr
    assert ours[1].returncode == theirs[1].returncode == 0
    assert ours[1].stdout.replace(ours[2].nixenv.store_dir.encode(), b"S") == \
        theirs[1].stdout.replace(theirs[2].nixenv.store_dir.encode(), b"S")
    for d in (ours[2], theirs[2]):
        assert NOT_ALLOWED in d.output()


# --- build-users-group -------------------------------------------------------------

def test_build_users_group_member_refused_even_if_trusted(make_env, daemons):
    env = make_env("trusted-users = root nwtest-a\nbuild-users-group = nwtest-a\n")
    d = daemons(env)
    assert closed_without_a_byte("nwtest-a", env)
    assert "user 'nwtest-a' is not allowed to connect to the Nix daemon" in d.output()
    assert trust_flag("nwtest-b", env) == 2
    assert trust_flag(None, env) == 1


def test_build_users_group_is_primary_group_only(make_env, daemons):
    """nwtest-c is only a listed member of nwtest-grp: not refused."""
    env = make_env(f"build-users-group = {GROUP}\n")
    daemons(env)
    assert trust_flag("nwtest-c", env) == 2


# --- force flags ---------------------------------------------------------------------

def test_force_flags_need_the_experimental_feature(make_env):
    env = make_env()
    for flag in ("--force-trusted", "--force-untrusted"):
        r = subprocess.run(
            nixwarden_cmd() + [flag],
            env={k: v for k, v in env.env.items() if k != "NIX_REMOTE"},
            capture_output=True, timeout=60)
        assert r.returncode == 1
        assert b"experimental Nix feature 'daemon-trust-override' is disabled" in r.stderr


def test_force_trusted(make_env, daemons):
    env = make_env("allowed-users = nwtest-a\nbuild-users-group = nwtest-c\n")
    daemons(env, *TRUST_FEATURE, "--force-trusted")
    assert trust_flag("nwtest-a", env) == 1
    assert trust_flag("nwtest-b", env) == 1      # allowed-users not applied
    assert trust_flag("nwtest-c", env) == 1      # nor the build-group rule


def test_force_untrusted(make_env, daemons):
    env = make_env("trusted-users = root nwtest-a\n")
    daemons(env, *TRUST_FEATURE, "--force-untrusted")
    assert trust_flag(None, env) == 2
    assert trust_flag("nwtest-a", env) == 2


def test_default_trust_restores_the_checks(make_env, daemons):
    env = make_env("allowed-users = nwtest-a\n")
    daemons(env, *TRUST_FEATURE, "--force-trusted", "--default-trust")
    assert trust_flag("nwtest-a", env) == 2
    assert closed_without_a_byte("nwtest-b", env)


# --- what an untrusted client may set ------------------------------------------------

def test_untrusted_restricted_setting_is_ignored_with_message(make_env, daemons):
    env = make_env("substituters = https://a.example/\n")
    daemons(env)
    client = wclient_as("nwtest-a", env, send_set_options=False)
    client.set_options([("sandbox", "false")], verbosity=6)
    assert any(RESTRICTED in line for line in client.logs), client.logs
    client.close()
    trusted = wclient_as(None, env, send_set_options=False)
    trusted.set_options([("sandbox", "false")], verbosity=6)
    assert not any("ignoring" in line for line in trusted.logs), trusted.logs
    trusted.close()


def test_untrusted_substituter_is_refused_with_warning(make_env, daemons):
    env = make_env("substituters = https://a.example/\n")
    daemons(env)
    client = wclient_as("nwtest-a", env, send_set_options=False)
    client.set_options([("substituters", "https://evil.example https://a.example")])
    assert any(UNTRUSTED_SUBST in line for line in client.logs), client.logs
    assert not any("https://a.example" in line for line in client.logs), client.logs
    client.close()


def _both(make_env, daemons, argv, user="nwtest-a"):
    out = {}
    for real in (False, True):
        env = make_env("substituters = https://a.example/\n")
        path = env.add_text("hello", "hello\n")
        daemons(env, real=real)
        r = env.run(*[path if a == "P" else a for a in argv], user=user, check=False)
        out["nix-daemon" if real else "nixwarden"] = r
    return out


def test_restricted_setting_message_visible_with_debug(make_env, daemons):
    both = _both(make_env, daemons, ["nix-store", "-q", "--hash", "P", "--option",
                                     "sandbox", "false", "--debug"])
    for name, r in both.items():
        assert r.returncode == 0, (name, r.stderr)
        assert RESTRICTED.encode() in r.stderr, (name, r.stderr)


def test_untrusted_substituter_warning_shown_by_nix_store(make_env, daemons):
    both = _both(make_env, daemons, ["nix-store", "-q", "--hash", "P", "--option",
                                     "substituters", "https://evil.example"])
    for name, r in both.items():
        assert r.returncode == 0, (name, r.stderr)
        assert b"warning: " + UNTRUSTED_SUBST.encode() in r.stderr, (name, r.stderr)


def test_restricted_setting_stderr_matches_nix_daemon(make_env, daemons):
    both = _both(make_env, daemons, ["nix-store", "-q", "--hash", "P", "--option",
                                     "sandbox", "false"])
    assert both["nixwarden"].stderr == both["nix-daemon"].stderr


def test_untrusted_substituter_stderr_matches_nix_daemon(make_env, daemons):
    both = _both(make_env, daemons, ["nix-store", "-q", "--hash", "P", "--option",
                                     "substituters", "https://evil.example"])
    assert both["nixwarden"].stderr == both["nix-daemon"].stderr
