"""Build-user locks and killing a build user's processes (spec §3.4, §8.5)."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys

import pytest

from lib.builds import ensure_build_users
from nixwarden.supervisor.build.buildusers import (
    BuildUserError, acquire_build_user, become_build_user, kill_user_processes)

GROUP = "nixbld"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _ensure_build_users(count: int = 3) -> None:
    """Create group nixbld with members nixbld1..N if absent (root only)."""
    ensure_build_users(count)


@pytest.fixture(scope="module")
def build_group():
    if os.geteuid() != 0:
        pytest.skip("needs root to create build users")
    _ensure_build_users()
    return grp.getgrnam(GROUP)


@pytest.fixture
def pool(tmp_path):
    return str(tmp_path / "userpool")


def test_two_locks_give_two_users(build_group, pool):
    a = acquire_build_user(GROUP, pool, exclude_uid=0)
    b = acquire_build_user(GROUP, pool, exclude_uid=0)
    try:
        assert a is not None and b is not None
        assert a.user.uid != b.user.uid
        assert a.user.name == build_group.gr_mem[0]
        assert a.user.gid == build_group.gr_gid
        assert build_group.gr_gid in a.user.supplementary_gids
        assert os.path.exists(f"{pool}/{a.user.uid}")
        assert oct(os.stat(f"{pool}/{a.user.uid}").st_mode & 0o777) == "0o600"
    finally:
        a.release()
        b.release()


def test_released_user_is_reused(build_group, pool):
    a = acquire_build_user(GROUP, pool, exclude_uid=0)
    first = a.user.uid
    a.release()
    assert not a.held
    a.release()  # idempotent
    with acquire_build_user(GROUP, pool, exclude_uid=0) as b:
        assert b.user.uid == first


def test_all_busy_gives_none(build_group, pool):
    held = []
    try:
        while (lock := acquire_build_user(GROUP, pool, exclude_uid=0)) is not None:
            held.append(lock)
        assert len(held) == len(build_group.gr_mem)
    finally:
        for lock in held:
            lock.release()


def test_other_process_cannot_take_held_user(build_group, pool):
    code = ("import sys; from nixwarden.supervisor.build.buildusers import acquire_build_user\n"
            "l = acquire_build_user(sys.argv[1], sys.argv[2], exclude_uid=0)\n"
            "print(l.user.uid if l else 'none')\n")
    with acquire_build_user(GROUP, pool, exclude_uid=0) as mine:
        out = subprocess.run([sys.executable, "-c", code, GROUP, pool], check=True,
                             capture_output=True, text=True).stdout.strip()
        assert out != "none" and int(out) != mine.user.uid
    out = subprocess.run([sys.executable, "-c", code, GROUP, pool], check=True,
                         capture_output=True, text=True).stdout.strip()
    assert int(out) == mine.user.uid


def test_own_uid_in_group_is_refused(build_group, pool):
    first_uid = pwd.getpwnam(build_group.gr_mem[0]).pw_uid
    with pytest.raises(BuildUserError, match="the Nix user should not be a member of 'nixbld'"):
        acquire_build_user(GROUP, pool, exclude_uid=first_uid)
    # the refused lock was released again
    with acquire_build_user(GROUP, pool, exclude_uid=0) as lock:
        assert lock.user.uid == first_uid


def test_missing_group_message(pool):
    with pytest.raises(BuildUserError) as e:
        acquire_build_user("nwnosuchgroup", pool, exclude_uid=0)
    assert str(e.value) == ("the group 'nwnosuchgroup' specified in 'build-users-group' "
                            "does not exist")


@needs_root
def test_empty_group_message(pool):
    name = "nwemptygrp"
    try:
        grp.getgrnam(name)
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True)
    try:
        with pytest.raises(BuildUserError) as e:
            acquire_build_user(name, pool, exclude_uid=0)
        assert str(e.value) == f"the build users group '{name}' has no members"
    finally:
        subprocess.run(["groupdel", name], check=False)


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_user_processes(build_group, pool):
    root_sleep = subprocess.Popen(["sleep", "60"])
    with acquire_build_user(GROUP, pool, exclude_uid=0) as lock:
        user = lock.user
        victim = subprocess.Popen(["sleep", "60"], user=user.uid, group=user.gid,
                                  extra_groups=[], start_new_session=True)
        try:
            assert _alive(victim.pid)
            kill_user_processes(user.uid)
            assert victim.wait(timeout=10) == -9
            assert _alive(root_sleep.pid)
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait()
            root_sleep.kill()
            root_sleep.wait()


def test_kill_refuses_root_and_self():
    with pytest.raises(ValueError):
        kill_user_processes(0)
    with pytest.raises(ValueError):
        kill_user_processes(os.getuid())


def test_become_build_user(build_group, pool):
    with acquire_build_user(GROUP, pool, exclude_uid=0) as lock:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                become_build_user(lock.user)
                ids = (os.getresuid(), os.getresgid(), sorted(os.getgroups()))
                os.write(w, repr(ids).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            got = f.read()
        os.waitpid(pid, 0)
    u = lock.user
    assert got == repr(((u.uid,) * 3, (u.gid,) * 3, sorted(u.supplementary_gids)))
