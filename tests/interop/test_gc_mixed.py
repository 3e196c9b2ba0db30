"""GC across tools and crashes (issue 5, points 1, 2 and 6).

* A real ``nix-store --gc`` run directly on the store (as root,
  NIX_REMOTE=local) while nixwarden clients hold temporary roots on fresh
  and on dead paths — before the GC starts (the temproots files) and while
  it runs (paused with Nix's ``_NIX_TEST_GC_SYNC`` hook, so the roots go
  through its GC socket): those paths survive, the rest goes.
* The reverse: nixwarden's GC while real CppNix processes (local
  ``nix-build``s whose builders wait on a FIFO) hold temporary roots on the
  sources they just added: the sources survive and the builds finish.
* A nixwarden GC SIGKILLed at random points (the session serving it, or the
  whole daemon), repeated with a seeded RNG: the real ``nix-store --verify
  --check-contents`` finds the store consistent each time, every rooted
  path is valid and present, and a final GC clears what was left.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time

import pytest

from conftest import needs_nix, needs_root
from lib.addclient import AddClient
from lib.gcscen import (add_files_local, chains_stream, descendant_pids, import_local,
                        proc_title, symlink, write)
from lib.nixenv import NixEnv, new_root, start_nixwarden
from lib.samplestore import populate

pytestmark = [needs_nix, needs_root, pytest.mark.interop]


@pytest.fixture
def env():
    root = new_root("nwgcmix-")
    yield NixEnv(root)
    subprocess.run(["rm", "-rf", root])


def _valid(env, paths) -> set[str]:
    proc = env.run("nix-store", "--check-validity", "--print-invalid", *paths,
                   remote="local")
    invalid = set(proc.stdout.decode().split())
    return {p for p in paths if p not in invalid and os.path.lexists(p)}


def _verify_clean(env) -> None:
    proc = env.run("nix-store", "--verify", "--check-contents", remote="local", check=False)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err
    for bad in ("disappeared", "was modified", "error", "invalid", "warning"):
        assert bad not in err, err


def _gc_lock_held(env) -> bool:
    import fcntl
    fd = os.open(f"{env.root}/var/nix/gc.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_real_gc_respects_nixwarden_temp_roots(env):
    p = populate(env)
    daemon = start_nixwarden(env)
    try:
        holder = AddClient(env.socket_path)
        fresh = holder.add_text_to_store("fresh-before-gc", b"added through nixwarden\n")
        holder.add_temp_root(p["file"])  # a dead path, held by the client

        proc = env.run("nix-store", "--gc", remote="local")
        assert proc.returncode == 0
        assert _valid(env, [fresh, p["file"]]) == {fresh, p["file"]}
        assert not _valid(env, [p["dir"], p["unbuilt_drv"]])  # the rest is garbage
        assert holder.is_valid_path(fresh)

        # Now with the real GC paused after it took the lock and started its socket:
        # roots added meanwhile reach it through the socket.
        fifo = f"{env.root}/gc-sync"
        os.mkfifo(fifo)
        other = env.add_text("dead-during-gc.txt", "nobody roots this one\n")
        held = env.add_text("held-during-gc.txt", "a client roots this one meanwhile\n")
        gc_env = dict(env.env, NIX_REMOTE="local", _NIX_TEST_GC_SYNC=fifo)
        gc = subprocess.Popen(["nix-store", "--gc"], env=gc_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not (_gc_lock_held(env) and os.path.exists(f"{env.root}/var/nix/gc-socket/socket")):
            assert time.monotonic() < deadline and gc.poll() is None
            time.sleep(0.02)
        during = AddClient(env.socket_path)
        done: dict = {}

        def add_during():
            done["path"] = during.add_text_to_store("fresh-during-gc", b"during the GC\n")
            during.add_temp_root(held)
        t = threading.Thread(target=add_during)
        t.start()
        t.join(30)
        assert not t.is_alive(), "AddToStore blocked while the real GC held its lock"
        with open(fifo, "w") as f:
            f.write("go\n")
        out, err = gc.communicate(timeout=60)
        assert gc.returncode == 0, err.decode()
        assert _valid(env, [done["path"], held, fresh]) == {done["path"], held, fresh}
        assert not _valid(env, [other])
        assert during.is_valid_path(done["path"])

        during.close()
        holder.close()
        time.sleep(0.2)  # the sessions end and release their temproots files
        env.run("nix-store", "--gc", remote="local")
        assert not _valid(env, [fresh, done["path"], p["file"], held])
        _verify_clean(env)
    finally:
        daemon.stop()


def test_nixwarden_gc_respects_cppnix_temp_roots(env):
    # Plenty of garbage so that nixwarden's GC is still running while builds start.
    stream, chains = chains_stream(env.store_dir, 200, 5)
    import_local(env, stream)
    n = 4
    fifos = []
    for i in range(n):
        write(f"{env.root}/home/src{i}/data", f"source {i}\n")
        started, go = f"{env.root}/started{i}", f"{env.root}/go{i}"
        os.mkfifo(started)
        os.mkfifo(go)
        fifos.append((started, go))
    write(f"{env.root}/home/b.nix", """
{ i, started, go }: builtins.derivation {
  name = "slow-${toString i}"; system = builtins.currentSystem; builder = "/bin/sh";
  src = ./. + "/src${toString i}";
  args = [ "-c" "echo up > ${started}; read x < ${go}; read l < $src/data; echo $l > $out" ];
}
""")
    daemon = start_nixwarden(env)
    builds = []
    try:
        gc_log = open(f"{env.root}/gc.log", "w+b")
        gc = subprocess.Popen(["nix-store", "--gc"], env=env.env, stdout=gc_log,
                              stderr=subprocess.STDOUT)
        for i, (started, go) in enumerate(fifos):
            builds.append(subprocess.Popen(
                ["nix-build", "--no-out-link", f"{env.root}/home/b.nix",
                 "--arg", "i", str(i), "--argstr", "started", started, "--argstr", "go", go],
                env=dict(env.env, NIX_REMOTE="local"), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE))
            time.sleep(0.3)
        for (started, _), b in zip(fifos, builds):
            # every builder is up: its source was added and rooted
            assert _read_fifo(started, b) == "up"
        assert gc.wait(timeout=120) == 0, open(f"{env.root}/gc.log").read()
        # a second GC, certainly after the sources were added
        env.run("nix-store", "--gc")
        for _, go in fifos:
            with open(go, "w") as f:
                f.write("go\n")
        for i, b in enumerate(builds):
            out, err = b.communicate(timeout=60)
            assert b.returncode == 0, err.decode()
            with open(out.decode().strip()) as f:
                assert f.read() == f"source {i}\n"
        assert not _valid(env, [p for c in chains for p in c])
    finally:
        for b in builds:
            if b.poll() is None:
                b.kill()
                b.wait()
        daemon.stop()
    _verify_clean(env)


def _read_fifo(path: str, proc: subprocess.Popen, timeout: float = 60) -> str:
    """Read what a builder writes into a FIFO; fail (not hang) if its
    nix-build dies first."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while not data.endswith(b"\n"):
            try:
                data += os.read(fd, 100)
            except BlockingIOError:
                pass
            if proc.poll() is not None and not data:
                raise AssertionError(proc.communicate()[1].decode())
            assert time.monotonic() < deadline, "builder did not start"
            time.sleep(0.02)
    finally:
        os.close(fd)
    return data.decode().strip()


def _session_pids(daemon) -> list[int]:
    return [pid for pid in descendant_pids(daemon.pid)
            if proc_title(pid).startswith("nixwarden session uid=")]


def _kill_tree(daemon) -> None:
    pids = [daemon.pid] + descendant_pids(daemon.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    daemon.proc.wait()
    daemon.log.close()


def test_gc_killed_at_random_points(env):
    rng = random.Random(0x5EED)
    stream, chains = chains_stream(env.store_dir, 300, 5)
    import_local(env, stream)
    files = add_files_local(env, {f"f{i}": f"file {i}\n".encode() * (i % 7 + 1)
                                  for i in range(400)})
    rooted_chains = chains[::10]
    for i, chain in enumerate(rooted_chains):
        symlink(chain[-1], f"{env.root}/var/nix/gcroots/chain{i}")
    for f in files[::50]:
        symlink(f, f"{env.root}/var/nix/gcroots/{os.path.basename(f)}")
    live = [p for c in rooted_chains for p in c] + files[::50]
    assert _valid(env, live) == set(live)

    daemon = start_nixwarden(env)
    kills = []
    try:
        for round_ in range(5):
            gc = subprocess.Popen(["nix-store", "--gc"], env=env.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(rng.uniform(0.2, 1.5))
            whole = rng.random() < 0.4
            if whole:
                _kill_tree(daemon)
            else:
                sessions = _session_pids(daemon)
                for pid in sessions:
                    os.kill(pid, signal.SIGKILL)
            gc.communicate(timeout=60)
            kills.append((round_, "daemon" if whole else "session", gc.returncode))
            if whole:
                daemon = start_nixwarden(env)
            _verify_clean(env)
            assert _valid(env, live) == set(live), kills
        proc = env.run("nix-store", "--gc")
        assert proc.returncode == 0
    finally:
        daemon.stop()
    assert any(code != 0 for _, _, code in kills), f"no GC was interrupted: {kills}"
    _verify_clean(env)
    assert _valid(env, live) == set(live)
    leftovers = [n for n in os.listdir(env.store_dir)
                 if n.startswith(".") and n not in (".links",)]
    assert not leftovers
    all_paths = set(env.run("nix-store", "--query", "--requisites", *live,
                            remote="local").stdout.decode().split())
    assert {os.path.join(env.store_dir, n) for n in os.listdir(env.store_dir)
            if not n.startswith(".") and not n.endswith(".lock")} == all_paths
