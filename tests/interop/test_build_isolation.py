"""Build isolation through nixwarden with real nix-build (issue 4, point 7).

Root only; build users nixbld1..4 in group nixbld (created when missing).

* Unsandboxed (``sandbox = false``) with build users, each builder's own
  ``/usr/bin/id -u`` is its build user, so two builds that provably overlap
  (each waits for the other's start file in a world-writable rendezvous
  directory) must report two different nixbld uids.
* Sandboxed, every builder is uid 1000 inside its user namespace, so the
  uids are sampled from outside instead: the test walks the daemon's
  descendants in /proc while two builds sleep and collects the real uids of
  the processes running as nixbld members.
* An "attacker" build runs next to a "victim" build (unsandboxed, so the
  file system is shared and only permissions protect): it must not read
  the victim's build directory (0700, owned by the victim's build user),
  the daemon's database or a ``secret-key-files`` key, nor modify or delete
  a valid store path; each attempt's outcome goes into its output, which
  the test inspects.  (Like Nix, a build user can create *new* entries in
  the 1775 store directory; they are unregistered garbage, so that is not
  tested.  In the sandbox even that stays in the build's private store,
  see test_build_sandbox.py.)
"""

from __future__ import annotations

import grp
import os
import shutil
import threading
import time

import pytest

from lib.builds import descendants, ensure_build_users, proc_uid, write_expr
from lib.nixenv import NixEnv, new_root, start_nixwarden

pytestmark = [
    pytest.mark.interop, pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (build users)"),
    pytest.mark.skipif(shutil.which("nix-build") is None, reason="needs the real Nix"),
]

WAIT = 20  # seconds a builder waits for its partner before giving up

EXPR = r"""
let
  # wait (up to @WAIT@ s) until file $1 exists; dash and busybox sh both have these
  waitFor = ''
    waitfor() { i=0; while [ ! -e "$1" ] && [ $i -lt @WAIT@0 ]; do @SLEEP@ 0.1; i=$((i+1)); done; }
  '';
  secretIn = "@ROOT@/etc/secret-key";
in rec {
  input = mk "input" "echo input > $out" {};

  # two builds that only finish once both have started
  u1 = mk "u1" (waitFor + ''
    echo started > @SHARED@/u1; waitfor @SHARED@/u2
    { @ID@ -u; [ -e @SHARED@/u2 ] && echo overlapped; } > $out
  '') {};
  u2 = mk "u2" (waitFor + ''
    echo started > @SHARED@/u2; waitfor @SHARED@/u1
    { @ID@ -u; [ -e @SHARED@/u1 ] && echo overlapped; } > $out
  '') {};

  # long sleepers, to be observed from outside
  s1 = mk "s1" "@SLEEP@ 3; echo s1 > $out" {};
  s2 = mk "s2" "@SLEEP@ 3; echo s2 > $out" {};

  victim = mk "victim" (waitFor + ''
    echo "the victim's secret" > secret
    echo "$NIX_BUILD_TOP" > @SHARED@/victim-dir
    waitfor @SHARED@/attacker-done
    echo victim > $out
  '') {};

  attacker2 = mk "attacker2" "echo \"database $(@CAT@ @ROOT@/var/nix/db/db.sqlite > /dev/null 2>&1 && echo ALLOWED || echo denied)\" > $out" {};

  attacker = mk "attacker" (waitFor + ''
    try() { if "$@" > /dev/null 2>&1; then echo ALLOWED; else echo denied; fi; }
    waitfor @SHARED@/victim-dir
    read dir < @SHARED@/victim-dir
    {
      echo "victim dir $(try @LS@ "$dir")"
      echo "victim secret $(try @CAT@ "$dir/secret")"
      echo "database $(try @CAT@ @ROOT@/var/nix/db/db.sqlite)"
      echo "signing key $(try @CAT@ ${secretIn})"
      echo "write input $(try @SH@ -c 'echo x >> ${input}')"
      echo "delete input $(try @RM@ -f ${input})"
      echo "chmod input $(try @CHMOD@ 0777 ${input})"
      echo "write log dir $(try @SH@ -c 'echo x > @ROOT@/var/log/nix/drvs/x')"
    } > $out
    echo done > @SHARED@/attacker-done
  '') {};
}
"""


def _world(conf: str, tools: dict):
    uids = ensure_build_users()
    root = new_root("nw-isolation-")
    shared = f"{root}/shared"
    os.makedirs(shared)
    os.chmod(shared, 0o1777)
    env = NixEnv(root, conf + f"secret-key-files = {root}/etc/secret-key\n")
    # a throw-away store: a local nix-store would set up (chown/chmod) the real one
    env.run("nix-store", "--generate-binary-cache-key", "test-key-1", f"{root}/etc/secret-key",
            f"{root}/etc/public-key", remote="local",
            env={"NIX_STORE_DIR": f"{root}/keys/store", "NIX_STATE_DIR": f"{root}/keys/var"})
    assert os.stat(env.store_dir).st_mode & 0o7777 == 0o755  # as NixEnv made it
    os.chmod(f"{root}/etc/secret-key", 0o600)
    text = EXPR.replace("@WAIT@", str(WAIT)).replace("@ROOT@", root).replace("@SHARED@", shared)
    for name, path in tools.items():
        text = text.replace(f"@{name}@", path)
    expr = write_expr(f"{root}/home/i.nix", text)
    daemon = start_nixwarden(env)
    return env, expr, daemon, uids, root


# Unsandboxed builders name host tools by absolute path; inside the sandbox
# busybox's shell runs its applets by name.
HOST_TOOLS = {"ID": "/usr/bin/id", "SLEEP": "/bin/sleep", "LS": "/bin/ls", "CAT": "/bin/cat",
              "SH": "/bin/sh", "RM": "/bin/rm", "CHMOD": "/bin/chmod"}
SANDBOX_TOOLS = {"ID": "id", "SLEEP": "sleep", "LS": "ls", "CAT": "cat", "SH": "/bin/sh",
                 "RM": "rm", "CHMOD": "chmod"}


@pytest.fixture(scope="module")
def plain():
    env, expr, daemon, uids, root = _world("build-users-group = nixbld\nsandbox = false\n",
                                           HOST_TOOLS)
    yield env, expr, daemon, uids
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def sandboxed():
    if not os.path.exists("/usr/bin/bwrap") or not os.path.exists("/bin/busybox"):
        pytest.skip("needs bubblewrap and busybox-static")
    env, expr, daemon, uids, root = _world("build-users-group = nixbld\nsandbox = true\n",
                                           SANDBOX_TOOLS)
    yield env, expr, daemon, uids
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


def _build(env, *attrs, jobs=2):
    args = ["nix-build", *attrs, "--no-out-link", "-j", str(jobs)]
    proc = env.run(*args, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    outs = []
    for path in proc.stdout.decode().split():
        with open(path) as f:
            outs.append(f.read())
    return outs


def test_store_dir_is_made_multi_user(plain):
    """As nix-daemon's LocalStore does: root:nixbld 01775 once a client connects."""
    env, expr, _, _ = plain
    env.run("nix", "store", "ping")
    st = os.stat(env.store_dir)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, grp.getgrnam("nixbld").gr_gid,
                                                           0o1775)


def test_concurrent_builds_use_different_build_users(plain):
    env, expr, _, uids = plain
    a, b = _build(env, expr, "-A", "u1", "-A", "u2")
    (uid_a, seen_a), (uid_b, seen_b) = a.split(), b.split()
    assert seen_a == seen_b == "overlapped"  # the two builds ran at the same time
    assert int(uid_a) in uids and int(uid_b) in uids
    assert uid_a != uid_b


def test_sandboxed_concurrent_builds_use_different_build_users(sandboxed):
    env, expr, daemon, uids = sandboxed
    seen: set[int] = set()
    most = 0
    stop = threading.Event()

    def sample():
        nonlocal most
        while not stop.is_set():
            now = {proc_uid(p) for p in descendants(daemon.pid)} & set(uids)
            seen.update(now)
            most = max(most, len(now))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        outs = _build(env, expr, "-A", "s1", "-A", "s2")
    finally:
        stop.set()
        sampler.join()
    assert outs == ["s1\n", "s2\n"]
    assert most >= 2, f"never saw two build users at once (saw {sorted(seen)})"


def test_build_cannot_reach_other_builds_or_daemon_secrets(plain):
    env, expr, _, _ = plain
    victim, attacker = _build(env, expr, "-A", "victim", "-A", "attacker")
    assert victim == "victim\n"
    results = dict(line.rsplit(" ", 1) for line in attacker.splitlines())
    results.pop("database")  # test_build_cannot_read_the_database
    assert results == {
        "victim dir": "denied",
        "victim secret": "denied",
        "signing key": "denied",
        "write input": "denied",
        "delete input": "denied",
        "chmod input": "denied",
        "write log dir": "denied",
    }
    # the input is intact
    env.run("nix-store", "--verify", "--check-contents", remote="local")


def test_build_cannot_read_the_database(plain):
    env, expr, _, _ = plain
    outs = _build(env, expr, "-A", "attacker2")
    assert outs == ["database denied\n"]
