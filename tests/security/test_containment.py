"""Workers are contained (DESIGN.md §2 rules 1-2, STYLE.md 1.8).

While a client holds a connection open, the worker serving it is found
through /proc (a descendant of the daemon titled ``nixwarden worker
uid=<uid>``) and checked from the outside: ids all equal to the worker
account, no groups, no_new_privs, a seccomp filter, not dumpable, only its
own descriptors, no database handle, its own network namespace.  The
session serving the same connection runs as root.

The second half applies ``nixwarden.worker.containment`` in a separate
process, the way the zygote and a worker do, and checks from the inside
that writing, sockets, exec and regaining root all fail while reading works.
"""

from __future__ import annotations

import json
import os
import pathlib
import pwd
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import needs_nix, needs_root
from lib.nixenv import new_root
from lib.wclient import WClient
from lib.procs import children as _children, descendants as _descendants, title as _title

pytestmark = [needs_root, pytest.mark.root]

WORKER_USER = "nixwarden"








def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _fds(pid: int) -> dict[int, str]:
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{pid}/fd")}


def _find(daemon_pid: int, title: str, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in _descendants(daemon_pid) if _title(p) == title]
        if len(found) == 1:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no single process titled {title!r}: "
                         f"{[(p, _title(p)) for p in _descendants(daemon_pid)]}")


@pytest.fixture
def held(nixenv, nixwarden):
    """A connection held open by root, and the processes serving it."""
    client = WClient(nixenv.socket_path, 35)
    worker = _find(nixwarden.proc.pid, "nixwarden worker uid=0")
    session = _find(nixwarden.proc.pid, "nixwarden session uid=0")
    yield client, worker, session
    client.close()


@needs_nix
def test_worker_runs_as_the_worker_account(held):
    _, worker, _ = held
    pw = pwd.getpwnam(WORKER_USER)
    st = _status(worker)
    assert st["Uid"].split() == [str(pw.pw_uid)] * 4
    assert st["Gid"].split() == [str(pw.pw_gid)] * 4
    assert st["Groups"].strip() == ""
    assert st["CapEff"] == st["CapPrm"] == "0000000000000000"
    assert st["NoNewPrivs"].strip() == "1"
    assert st["Seccomp"].strip() == "2"


@needs_nix
def test_worker_is_not_dumpable(held):
    """Non-dumpable processes have their /proc files owned by root, not by
    their own uid; so workers of the same account cannot trace one another."""
    _, worker, _ = held
    for name in ("status", "mem", "environ", "fd"):
        assert os.stat(f"/proc/{worker}/{name}").st_uid == 0, name


@needs_nix
def test_worker_holds_only_its_descriptors(held, nixenv):
    client, worker, session = held
    fds = _fds(worker)
    assert not any("db.sqlite" in t or t.endswith("/big-lock") for t in fds.values()), fds
    # stdin and stdout on /dev/null, stderr (the daemon's log), the client
    # socket twice (read and write ends), and the RPC channel's two pipes:
    # nothing else.
    assert fds.get(0) == fds.get(1) == "/dev/null" and 2 in fds, fds
    rest = {fd: t for fd, t in fds.items() if fd > 2}
    assert len(rest) == 4, fds
    sockets = [t for t in rest.values() if t.startswith("socket:")]
    assert len(sockets) == 2 and len(set(sockets)) == 1, "the client socket, twice"
    pipes = {t for t in rest.values() if t.startswith("pipe:")}
    assert len(pipes) == 2, "one pipe each way"
    # The session holds the other ends of exactly those two pipes, and no
    # socket of the worker's.
    session_fds = set(_fds(session).values())
    assert pipes <= session_fds
    assert sockets[0] not in session_fds


@needs_nix
def test_worker_has_its_own_network_namespace(held, nixwarden):
    _, worker, session = held
    supervisor_ns = os.readlink(f"/proc/{nixwarden.proc.pid}/ns/net")
    assert os.readlink(f"/proc/{worker}/ns/net") != supervisor_ns
    assert os.readlink(f"/proc/{worker}/ns/ipc") != os.readlink(
        f"/proc/{nixwarden.proc.pid}/ns/ipc")
    assert os.readlink(f"/proc/{session}/ns/net") == supervisor_ns


@needs_nix
def test_session_runs_as_root_and_owns_the_database(held):
    _, _, session = held
    st = _status(session)
    assert st["Uid"].split() == ["0"] * 4
    assert any(t.endswith("/db.sqlite") for t in _fds(session).values())


@needs_nix
def test_zygote_is_contained_too(held, nixwarden):
    zygote = _find(nixwarden.proc.pid, "nixwarden worker-zygote")
    pw = pwd.getpwnam(WORKER_USER)
    st = _status(zygote)
    assert st["Uid"].split() == [str(pw.pw_uid)] * 4
    assert st["Groups"].strip() == ""
    assert st["NoNewPrivs"].strip() == "1"
    assert os.stat(f"/proc/{zygote}/status").st_uid == 0
    assert not any("db.sqlite" in t for t in _fds(zygote).values())


@needs_nix
def test_privsep_check_equivalent(held, nixwarden):
    """What an audit checks, in one place: every process serving the held
    connection's client bytes is unprivileged, no_new_privs, not dumpable and
    has no handle on the store database."""
    daemon = nixwarden.proc.pid
    client_sock = os.readlink(f"/proc/self/fd/{held[0].sock.fileno()}")
    serving = []
    for pid in _descendants(daemon):
        try:
            targets = _fds(pid).values()
        except (PermissionError, FileNotFoundError):
            continue
        if any(t.startswith("socket:") for t in targets) and _title(pid).startswith(
                "nixwarden worker uid="):
            serving.append(pid)
    assert serving, client_sock
    for pid in serving:
        st = _status(pid)
        assert "0" not in st["Uid"].split()
        assert st["NoNewPrivs"].strip() == "1"
        assert os.stat(f"/proc/{pid}/status").st_uid == 0
        assert not any("db.sqlite" in t for t in _fds(pid).values())


# --- containment layers applied in a throw-away process ------------------------

PROBE = textwrap.dedent("""
    import errno, json, os, socket, sys
    from nixwarden.worker import containment

    readable, writable_dir = sys.argv[1], sys.argv[2]
    containment.contain_zygote(sys.argv[3])
    out = os.dup(1)
    containment.contain_worker({2, out})

    def attempt(fn):
        try:
            fn()
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc.errno))
        return "ok"

    def read():
        with open(readable) as f:
            assert f.read() == "readable\\n"

    results = {
        "read": attempt(read),
        "write_existing": attempt(lambda: os.open(os.path.join(writable_dir, "w"), os.O_WRONLY)),
        "rdwr_existing": attempt(lambda: os.open(os.path.join(writable_dir, "w"), os.O_RDWR)),
        "create": attempt(lambda: os.open(os.path.join(writable_dir, "new"),
                                          os.O_RDONLY | os.O_CREAT, 0o644)),
        "truncate": attempt(lambda: os.open(os.path.join(writable_dir, "w"),
                                            os.O_RDONLY | os.O_TRUNC)),
        "mkdir": attempt(lambda: os.mkdir(os.path.join(writable_dir, "d"))),
        "unlink": attempt(lambda: os.unlink(os.path.join(writable_dir, "w"))),
        "socket_unix": attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)),
        "socket_inet": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
        "socketpair": attempt(lambda: socket.socketpair()),
        "execve": attempt(lambda: os.execv("/bin/true", ["true"])),
        "setuid0": attempt(lambda: os.setuid(0)),
        "setgid0": attempt(lambda: os.setgid(0)),
        "fork": attempt(lambda: os._exit(0) if os.fork() == 0 else None),
        "uid": os.getresuid(),
        "groups": os.getgroups(),
        "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
    }
    os.write(out, json.dumps(results).encode())
""")


@pytest.fixture
def probe_files():
    """A world-readable file, and a directory and file the worker account
    could write by permissions: only the filter may refuse the writes.
    (Under /tmp directly: pytest's tmp_path is not traversable by others.)"""
    pw = pwd.getpwnam(WORKER_USER)
    root = new_root("nw-contain-")
    os.chmod(root, 0o755)
    tmp_path = pathlib.Path(root)
    readable = tmp_path / "readable"
    readable.write_text("readable\n")
    os.chmod(readable, 0o644)
    wdir = tmp_path / "writable"
    wdir.mkdir()
    os.chown(wdir, pw.pw_uid, pw.pw_gid)
    os.chmod(wdir, 0o777)
    (wdir / "w").write_text("w\n")
    os.chown(wdir / "w", pw.pw_uid, pw.pw_gid)
    os.chmod(wdir / "w", 0o666)
    yield readable, wdir
    shutil.rmtree(root, ignore_errors=True)


def test_containment_layers_from_inside(probe_files):
    readable, wdir = probe_files
    proc = subprocess.run([sys.executable, "-c", PROBE, str(readable), str(wdir), WORKER_USER],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    res = json.loads(proc.stdout)
    pw = pwd.getpwnam(WORKER_USER)
    assert res["read"] == "ok"
    for name in ("write_existing", "rdwr_existing", "create", "truncate", "mkdir",
                 "unlink", "socket_unix", "socket_inet", "socketpair", "execve",
                 "setuid0", "setgid0"):
        assert res[name] == "EPERM", (name, res)
    assert res["fork"] in ("EAGAIN", "EPERM"), res
    assert res["uid"] == [pw.pw_uid] * 3
    assert res["groups"] == []
    # Nothing beyond stdin/stdout on /dev/null, stderr, the report descriptor
    # and listdir's own.
    assert len(res["fds"]) <= 5 and {0, 1, 2} <= set(res["fds"]), res
    assert (wdir / "w").read_text() == "w\n"
    assert sorted(os.listdir(wdir)) == ["w"]


def test_containment_layers_are_logged(probe_files):
    readable, wdir = probe_files
    script = ("import logging, sys\n"
              "logging.basicConfig(level='INFO', stream=sys.stderr, format='%(message)s')\n"
              + PROBE)
    proc = subprocess.run([sys.executable, "-c", script, str(readable), str(wdir),
                           WORKER_USER], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    err = proc.stderr.decode()
    for layer in ("namespaces", "uid/gid", "no_new_privs", "not-dumpable"):
        lines = [l for l in err.splitlines() if f"containment layer {layer}" in l]
        assert len(lines) == 1 and "inactive" not in lines[0], err


def test_drop_to_unknown_user_fails_closed():
    script = ("from nixwarden.worker import containment\n"
              "containment.contain_zygote('nwtest-no-such-user')\n"
              "print('still running')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 70  # containment.EXIT_DROP_FAILED
    assert b"still running" not in proc.stdout
