"""Temp roots and path locks against the real nix-store 2.8 (spec §3).

* A path in our temp-roots file survives a real ``nix-store --gc``; after
  ``TempRoots.close`` it is collected.
* A root added *while* a real GC runs (held at the GC's test sync point
  ``_NIX_TEST_GC_SYNC``, after it has read the temp-roots files) reaches the
  GC over ``<state>/gc-socket/socket`` and is respected.
* Real Nix treats a dead process's temp-roots file as stale.
* A ``PathLock`` we hold blocks a real ``nix-store --add`` of that path.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from nixwarden.supervisor.store import locks
from nixwarden.supervisor.store.db import StoreDB
from nixwarden.supervisor.store.locks import TempRoots, lock_paths, read_temp_roots
from nixwarden.supervisor.store.pathinfo import PathInfo

from nixenv import make_nix_env, needs_nix, write_tree

pytestmark = needs_nix


@pytest.fixture
def nix(tmp_path):
    return make_nix_env(str(tmp_path))


def _garbage(nix, db, name: str) -> str:
    """A valid, unreferenced, unrooted path."""
    p = nix.store_path(name)
    write_tree(nix.layout.real_path(p), {"": name + "\n"})
    db.register_valid_paths([PathInfo(path=p, deriver=None,
                                      nar_hash="sha256:" + nix.nar_hash_hex(p),
                                      nar_size=nix.nar_size(p))])
    return p


def _gc(nix, **kw) -> None:
    nix.run("nix-store", "--gc", **kw)


def test_temp_root_survives_real_gc(nix):
    with StoreDB.open(nix.layout) as db:
        kept, lost = _garbage(nix, db, "kept"), _garbage(nix, db, "lost")
        roots = TempRoots(nix.layout)
        roots.add(kept)
        with open(roots.file_path, "rb") as f:
            assert f.read() == kept.encode() + b"\0"
        assert read_temp_roots(nix.layout) == {os.getpid(): {kept}}
        _gc(nix)
        assert db.is_valid(kept) and os.path.exists(nix.layout.real_path(kept))
        assert not db.is_valid(lost) and not os.path.exists(nix.layout.real_path(lost))
        roots.close()
        assert not os.path.exists(f"{nix.layout.temproots_dir}/{os.getpid()}")
        _gc(nix)
        assert not db.is_valid(kept) and not os.path.exists(nix.layout.real_path(kept))


def _start_held_gc(nix, fifo: str) -> subprocess.Popen:
    """Start a real GC and wait until it sits at its sync point."""
    os.mkfifo(fifo)
    env = dict(nix.env, _NIX_TEST_GC_SYNC=fifo)
    gc = subprocess.Popen(["nix-store", "--gc"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not os.path.exists(nix.layout.gc_socket_path):
        assert gc.poll() is None, gc.stderr.read()
        assert time.monotonic() < deadline, "GC did not start its roots server"
        time.sleep(0.01)
    with locks.gc_lock(nix.layout, exclusive=False, wait=False) as got:
        assert not got, "a running GC must hold gc.lock exclusively"
    return gc


def _release_gc(gc: subprocess.Popen, fifo: str) -> str:
    with open(fifo, "w") as f:  # blocks until the GC opens it for reading
        f.write("go")
    _, err = gc.communicate(timeout=60)
    assert gc.returncode == 0, err
    return err.decode()


def test_root_added_during_real_gc_uses_socket(nix, tmp_path):
    with StoreDB.open(nix.layout) as db:
        late, lost = _garbage(nix, db, "late"), _garbage(nix, db, "lost")
        roots = TempRoots(nix.layout)
        fifo = str(tmp_path / "gc-sync")
        gc = _start_held_gc(nix, fifo)
        try:
            done = threading.Event()
            threading.Thread(target=lambda: (roots.add(late), done.set()), daemon=True).start()
            # The GC has already read the temproots files, so only the
            # socket can tell it about this root; the ack comes at once.
            assert done.wait(10), "no ack from the GC's roots server"
            assert roots._sock is not None
        finally:
            _release_gc(gc, fifo)
        assert db.is_valid(late) and os.path.exists(nix.layout.real_path(late))
        assert not db.is_valid(lost)
        # After the GC, the next root goes to the file under the shared lock.
        other = _garbage(nix, db, "other")
        roots.add(other)
        assert roots._sock is None
        assert read_temp_roots(nix.layout)[os.getpid()] == {late, other}
        roots.close()


def test_real_gc_ignores_dead_process_roots(nix):
    with StoreDB.open(nix.layout) as db:
        p = _garbage(nix, db, "orphan")
        fake = f"{nix.layout.temproots_dir}/999999999"
        with open(fake, "wb") as f:
            f.write(p.encode() + b"\0")  # nobody holds its lock
        assert read_temp_roots(nix.layout) == {}
        proc = nix.run("nix-store", "--gc")
        assert b"removing stale temporary roots file" in proc.stderr
        assert not os.path.exists(fake) and not db.is_valid(p)


def test_our_path_lock_blocks_real_nix_add(nix, tmp_path):
    StoreDB.open(nix.layout).close()
    src = tmp_path / "hello.txt"
    src.write_text("hello\n")
    nar_hash = nix.out("nix-hash", "--type", "sha256", "--base32", str(src))
    target = nix.out("nix-store", "--print-fixed-path", "--recursive", "sha256",
                     nar_hash, "hello.txt")
    lock = lock_paths([nix.layout.real_path(target)])
    assert lock is not None
    adder = nix.popen("nix-store", "--add", str(src))
    time.sleep(1.0)
    assert adder.poll() is None, "nix-store --add did not wait for our lock"
    lock.release()
    out, err = adder.communicate(timeout=30)
    assert adder.returncode == 0, err
    assert out.decode().strip() == target
    assert not os.path.exists(nix.layout.real_path(target) + ".lock")

