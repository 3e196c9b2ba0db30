"""Failed additions lose nothing (issue 3, point 6; DESIGN.md §2 rule 6).

A wrong hash, a malformed or hostile NAR, a client that disconnects or is
killed mid-upload, a full disk: the error reaches the client where the
connection still exists, the temporary entry (``<hash>-nixwarden-tmp``)
is removed, nothing is registered, other connections carry on, and a
later identical addition succeeds.  Also: concurrent additions of the same
and of distinct paths.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import needs_nix, needs_root
from lib.addclient import AddClient
from lib.differential import path_infos
from lib.narlib import Exe, Link, input_path, nar, node, raw_dir, s
from lib.wclient import DaemonError

pytestmark = [needs_nix, pytest.mark.interop]

TREE = {"a": b"alpha\n", "b": {"c": Exe(b"#!/bin/sh\n"), "d": Link("../a")}, "e": b""}


def temp_entries(store_dir: str) -> list[str]:
    return [e for e in os.listdir(store_dir) if e.endswith("-nixwarden-tmp")]


def wait_no_temp(store_dir: str, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := temp_entries(store_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def assert_clean(env, before: dict, *also_invalid: str) -> None:
    assert wait_no_temp(env.store_dir) == []
    assert path_infos(env) == before
    for p in also_invalid:
        assert not os.path.lexists(p), p


# --- wrong claims and malformed NARs --------------------------------------------------

def test_wrong_hash_then_the_same_add_succeeds(nixenv, nixwarden):
    env = nixenv
    before = path_infos(env)
    data = nar(TREE)
    path = input_path(env.store_dir, "wrong-hash", "x")
    c = AddClient(env.socket_path)
    with pytest.raises(DaemonError, match="hash mismatch importing path"):
        c.add_to_store_nar(path, data, nar_hash=hashlib.sha256(b"no").hexdigest(),
                           dont_check_sigs=True)
    assert_clean(env, before, path)
    c.add_to_store_nar(path, data, dont_check_sigs=True)  # same connection
    assert c.query_path_info(path)["narSize"] == len(data)
    assert env.run("nix-store", "--dump", path).stdout == data


def _cuts(data: bytes):
    return range(0, len(data), 8)


def test_truncated_at_every_token_boundary(nixenv, nixwarden):
    env = nixenv
    before = path_infos(env)
    data = nar(TREE)
    path = input_path(env.store_dir, "truncated", "x")
    c = AddClient(env.socket_path)
    for cut in _cuts(data):
        with pytest.raises(DaemonError, match="bad archive"):
            c.add_to_store_nar(path, data[:cut], nar_hash=hashlib.sha256(data).hexdigest(),
                               nar_size=len(data), dont_check_sigs=True)
    assert_clean(env, before, path)
    c.add_to_store_nar(path, data, dont_check_sigs=True)
    assert c.is_valid_path(path)


def test_truncated_content_addressed_add_at_every_boundary(nixenv, nixwarden):
    env = nixenv
    before = path_infos(env)
    data = nar(TREE)
    c = AddClient(env.socket_path)
    for cut in _cuts(data):
        with pytest.raises(DaemonError, match="bad archive"):
            c.add_to_store("trunc", "fixed:r:sha256", data[:cut])
    assert_clean(env, before)
    assert c.add_to_store("trunc", "fixed:r:sha256", data)["narSize"] == len(data)


def _entry(name: bytes, sub: bytes) -> tuple[bytes, bytes]:
    return (name, sub)


HOSTILE = {
    "dotdot": raw_dir([(b"..", node(b"x"))]),
    "dot": raw_dir([(b".", node(b"x"))]),
    "empty-name": raw_dir([(b"", node(b"x"))]),
    "slash": raw_dir([(b"a/b", node(b"x"))]),
    "escape": raw_dir([(b"../../../../../../tmp/nwtest-escaped", node(b"x"))]),
    "nul": raw_dir([(b"a\0b", node(b"x"))]),
    "duplicate": raw_dir([(b"a", node(b"1")), (b"a", node(b"2"))]),
    "unsorted": raw_dir([(b"b", node(b"1")), (b"a", node(b"2"))]),
    "symlink-then-dir": raw_dir([(b"a", node(Link("/tmp"))), (b"a", node({"f": b"x"}))]),
    "symlink-then-file": raw_dir([(b"a", node(Link("/tmp/nwtest-escaped"))),
                                  (b"a", node(b"x"))]),
    "huge-length": s("(") + s("type") + s("regular") + s("contents")
    + (2**62).to_bytes(8, "little") + b"just a few bytes",
    "huge-name": raw_dir([(b"n" * 256, node(b"x"))]),
    "huge-target": s("(") + s("type") + s("symlink") + s("target") + s("t" * 4096) + s(")"),
    "huge-token": s("(") + s("type") + (2**40).to_bytes(8, "little"),
    "empty-target": s("(") + s("type") + s("symlink") + s("target") + s("") + s(")"),
    "bad-type": s("(") + s("type") + s("fifo") + s(")"),
    "nonzero-padding": s("(") + s("type") + s("regular") + s("contents")
    + (1).to_bytes(8, "little") + b"x\1\0\0\0\0\0\0" + s(")"),
    "trailing-bytes": node(b"x") + b"\0" * 8,
}


def _deep(depth: int) -> bytes:
    n = node(b"leaf")
    for _ in range(depth):
        n = raw_dir([(b"d", n)])
    return n


HOSTILE["too-deep"] = _deep(300)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("op", ["nar", "add"])
def test_hostile_nar_refused(nixenv, nixwarden, kind, op):
    env = nixenv
    before = path_infos(env)
    data = s("nix-archive-1") + HOSTILE[kind]
    c = AddClient(env.socket_path)
    path = input_path(env.store_dir, "hostile", kind)
    with pytest.raises(DaemonError):
        if op == "nar":
            c.add_to_store_nar(path, data, dont_check_sigs=True)
        else:
            c.add_to_store("hostile", "fixed:r:sha256", data)
    assert c.is_valid_path(path) is False  # still in sync
    assert_clean(env, before, path)
    assert not os.path.lexists("/tmp/nwtest-escaped")
    assert not os.path.lexists(os.path.join(os.path.dirname(env.store_dir), "nwtest-escaped"))


def test_deep_but_allowed_nesting_is_accepted(nixenv, nixwarden):
    c = AddClient(nixenv.socket_path)
    data = s("nix-archive-1") + _deep(200)
    info = c.add_to_store("deep", "fixed:r:sha256", data)
    assert nixenv.run("nix-store", "--dump", info["path"]).stdout == data


def test_symlinks_are_stored_not_followed(nixenv, nixwarden):
    """A symlink to /etc followed by an entry under the same name is a
    duplicate; a symlink alone is data: nothing outside the entry changes."""
    data = nar({"etc": Link("/etc"), "z": Link("../../../../../../tmp")})
    c = AddClient(nixenv.socket_path)
    info = c.add_to_store("links", "fixed:r:sha256", data)
    p = info["path"]
    assert os.readlink(os.path.join(p, "etc")) == "/etc"
    assert os.lstat(os.path.join(p, "etc")).st_mtime == 1
    assert nixenv.run("nix-store", "--dump", p).stdout == data


LEFTOVERS = {
    "full-directory": lambda p: (os.makedirs(os.path.join(p, "sub")),
                                 open(os.path.join(p, "sub", "old"), "w").close()),
    "empty-directory": os.mkdir,
    "file": lambda p: open(p, "w").close(),
    "symlink": lambda p: os.symlink("/etc", p),
}
ROOTS = {"directory": TREE, "file": b"new contents\n", "symlink": Link("somewhere")}


@pytest.mark.parametrize("leftover", sorted(LEFTOVERS))
@pytest.mark.parametrize("root", sorted(ROOTS))
def test_an_invalid_leftover_at_the_path_is_replaced(nixenv, nixwarden, leftover, root):
    """Whatever lies at a path that is not valid (a crashed add, a partial
    delete) is replaced by the added object, as nix-daemon does."""
    data = nar(ROOTS[root])
    path = input_path(nixenv.store_dir, f"leftover-{leftover}-{root}", "l")
    LEFTOVERS[leftover](path)
    c = AddClient(nixenv.socket_path)
    c.add_to_store_nar(path, data, dont_check_sigs=True)
    assert c.query_path_info(path)["narSize"] == len(data)
    assert nixenv.run("nix-store", "--dump", path).stdout == data
    assert wait_no_temp(nixenv.store_dir) == []


# --- disconnects -------------------------------------------------------------------

BIG = nar({"big": os.urandom(1024) * 8192, "small": b"x"})  # ~8 MiB


def _half_upload(env, path: str, fraction: float, data: bytes = BIG) -> AddClient:
    c = AddClient(env.socket_path)
    head = (c.u64(39) + c.s(path)
            + c.path_info_fields(nar_hash=hashlib.sha256(data).hexdigest(), nar_size=len(data))
            + c.u64(0) + c.u64(1))
    c.send(head)
    c.send_frames([data[:int(len(data) * fraction)]], 65536, end=False)
    return c


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.99])
def test_client_disconnects_mid_upload(nixenv, nixwarden, fraction):
    env = nixenv
    before = path_infos(env)
    path = input_path(env.store_dir, "disconnect", str(fraction))
    c = _half_upload(env, path, fraction)
    time.sleep(0.2)
    if fraction >= 0.5:  # the entry exists while the upload is in progress
        assert temp_entries(env.store_dir)
    c.close()
    assert_clean(env, before, path)
    c2 = AddClient(env.socket_path)
    assert c2.is_valid_path(path) is False
    c2.add_to_store_nar(path, BIG, dont_check_sigs=True)
    assert c2.query_path_info(path)["narSize"] == len(BIG)
    assert temp_entries(env.store_dir) == []


def test_client_killed_at_random_points(nixenv, nixwarden):
    """A separate process uploading is SIGKILLed at several points."""
    env = nixenv
    before = path_infos(env)
    path = input_path(env.store_dir, "killed", "k")
    bigfile = os.path.join(env.root, "big.nar")
    with open(bigfile, "wb") as f:
        f.write(BIG)
    script = (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from lib.addclient import AddClient\n"
        "import hashlib\n"
        "data = open(%r, 'rb').read()\n"
        "c = AddClient(%r)\n"
        "c.send(c.u64(39) + c.s(%r) + c.path_info_fields(nar_hash=hashlib.sha256(data)"
        ".hexdigest(), nar_size=len(data)) + c.u64(0) + c.u64(1))\n"
        "for i in range(0, len(data), 4096):\n"
        "    c.send(c.u64(len(data[i:i+4096])) + data[i:i+4096]); time.sleep(0.0005)\n"
        "time.sleep(60)\n"
    ) % (os.path.dirname(os.path.dirname(__file__)), bigfile, env.socket_path, path)
    import random
    rnd = random.Random(3)
    for _ in range(4):
        proc = subprocess.Popen([os.sys.executable, "-c", script])
        time.sleep(rnd.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_clean(env, before, path)
    c = AddClient(env.socket_path)
    c.add_to_store_nar(path, BIG, dont_check_sigs=True)
    assert c.is_valid_path(path)
    verify = env.run("nix-store", "--verify", "--check-contents", remote="local", check=False)
    assert verify.returncode == 0, verify.stderr


def test_other_connections_carry_on_during_a_stalled_upload(nixenv, nixwarden):
    env = nixenv
    stalled = _half_upload(env, input_path(env.store_dir, "stalled", "s"), 0.5)
    try:
        out = env.run("nix-store", "--add", os.path.join(env.conf_path))
        assert out.returncode == 0
        c = AddClient(env.socket_path)
        path = input_path(env.store_dir, "meanwhile", "m")
        c.add_to_store_nar(path, nar(b"meanwhile"), dont_check_sigs=True)
        assert c.is_valid_path(path)
    finally:
        stalled.close()
    assert wait_no_temp(env.store_dir) == []


# --- concurrency -------------------------------------------------------------------

def test_concurrent_adds_same_and_distinct(nixenv, nixwarden):
    env = nixenv
    home = os.path.join(env.root, "home")
    same = os.path.join(home, "same.txt")
    with open(same, "w") as f:
        f.write("the same for everybody\n" * 1000)
    distinct = []
    for i in range(20):
        p = os.path.join(home, f"distinct-{i}.txt")
        with open(p, "w") as f:
            f.write(f"file {i}\n" * 1000)
        distinct.append(p)
    procs = [subprocess.Popen(["nix-store", "--add", p], env=dict(env.env),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for p in [same] * 10 + distinct]
    outs = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _, _ in outs), [e for _, _, e in outs]
    same_paths = {o.strip() for _, o, _ in outs[:10]}
    assert len(same_paths) == 1
    assert len({o for _, o, _ in outs[10:]}) == 20
    infos = path_infos(env)
    assert len([p for p in infos if p.endswith("-same.txt")]) == 1
    assert temp_entries(env.store_dir) == []
    verify = env.run("nix-store", "--verify", "--check-contents", remote="local", check=False)
    assert verify.returncode == 0, verify.stderr


def test_concurrent_nar_uploads_of_one_path(nixenv, nixwarden):
    env = nixenv
    path = input_path(env.store_dir, "racy", "r")
    data = nar({"x": os.urandom(1 << 20)})
    errors = []

    def one():
        try:
            c = AddClient(env.socket_path)
            c.add_to_store_nar(path, data, dont_check_sigs=True, frame_size=4096)
            c.close()
        except Exception as exc:  # collected and asserted below
            errors.append(exc)
    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert AddClient(env.socket_path).query_path_info(path)["narSize"] == len(data)
    assert temp_entries(env.store_dir) == []
    assert env.run("nix-store", "--dump", path).stdout == data


# --- full disk ---------------------------------------------------------------------

@pytest.fixture
def small_store(nixenv):
    """The store directory on an 8 MiB tmpfs (root only; unmounted after)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs",
                        nixenv.store_dir], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode()}")
    try:
        yield nixenv
    finally:
        subprocess.run(["umount", "-l", nixenv.store_dir], check=False)


def test_full_disk(small_store):
    from lib.nixenv import start_nixwarden
    env = small_store
    base = env.add_text("before.txt", "before\n")
    daemon = start_nixwarden(env)
    try:
        before = path_infos(env)
        big = os.path.join(env.root, "home", "big.bin")
        with open(big, "wb") as f:
            f.write(os.urandom(20 << 20))
        r = env.run("nix-store", "--add", big, check=False)
        assert r.returncode != 0
        assert b"No space left on device" in r.stderr, r.stderr
        assert_clean(env, before)
        # a NAR upload too, on one connection that then carries on
        c = AddClient(env.socket_path)
        path = input_path(env.store_dir, "too-big", "b")
        data = nar(os.urandom(12 << 20))
        with pytest.raises(DaemonError, match="No space left on device"):
            c.add_to_store_nar(path, data, dont_check_sigs=True)
        assert_clean(env, before, path)
        assert c.is_valid_path(base)
        small = os.path.join(env.root, "home", "small.txt")
        with open(small, "w") as f:
            f.write("small\n")
        r = env.run("nix-store", "--add", small)
        assert r.returncode == 0
        assert temp_entries(env.store_dir) == []
    finally:
        daemon.stop()
    verify = env.run("nix-store", "--verify", "--check-contents", remote="local", check=False)
    assert verify.returncode == 0, verify.stderr
