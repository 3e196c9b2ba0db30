"""The collector against temporary roots announced after its walk.

A store filled by real Nix holds ``src`` and a derivation ``drv`` that
refers to it, plus unrelated garbage.  The walk from ``src`` finds both
dead; a client then announces one of them on the GC socket, either just
before the collector deletes that walk's paths or while it is deleting
them.  Before: the announced path and what it refers to are kept, the
run ends without error (no "in use" refusal), the other garbage is gone.
While: the announcement waits until the paths are deleted, as a CppNix
client expects (it then sees the path invalid).
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from nixwarden.supervisor.store import gc
from nixwarden.supervisor.store.db import StoreDB

from nixenv import make_nix_env, needs_nix

pytestmark = needs_nix


@pytest.fixture
def store(tmp_path):
    nix = make_nix_env(str(tmp_path / "root"))
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    (src_dir / "src").write_text("source\n")
    (src_dir / "other").write_text("other garbage\n")
    src, other = nix.out("nix-store", "--add", str(src_dir / "src"),
                         str(src_dir / "other")).split()
    (tmp_path / "d.nix").write_text(
        'derivation { name = "d"; system = "x86_64-linux"; builder = "/bin/sh";'
        f' args = [ "-c" "echo ${{builtins.storePath "{src}"}} > $out" ]; }}')
    drv = nix.out("nix-instantiate", str(tmp_path / "d.nix"))
    db = StoreDB.open(nix.layout)
    yield nix, db, {"src": src, "drv": drv, "other": other}
    db.close()


def _announce(socket_path: str, path: str) -> None:
    """What a CppNix client does to add a temporary root while a GC runs."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(socket_path)
        s.sendall(path.encode() + b"\n")
        assert s.recv(1) == b"1"


def _present(nix, db, path: str) -> bool:
    valid, exists = db.is_valid(path), os.path.lexists(nix.layout.real_path(path))
    assert valid == exists, path
    return valid


@pytest.mark.parametrize("max_freed", [gc.NO_LIMIT, 10**9], ids=["no-limit", "limit"])
@pytest.mark.parametrize("announced", ["src", "drv"])
def test_root_announced_after_the_walk_keeps_the_walk(store, announced, max_freed):
    nix, db, paths = store
    target = paths[announced]

    class Racing(gc.Collector):
        def _delete_paths(self, batch):
            if target in batch and not self.server.is_temp_root(os.path.basename(target)[:32]):
                _announce(self.server.path, target)
            return super()._delete_paths(batch)

    lines: list[str] = []
    collector = Racing(nix.layout, db, keep_outputs=False, keep_derivations=False,
                       log=lines.append)
    deleted, _ = collector.collect(gc.DELETE_DEAD, [], max_freed)

    assert paths["other"] in deleted and not _present(nix, db, paths["other"])
    assert _present(nix, db, target) and target not in deleted
    assert _present(nix, db, paths["src"])  # what the announced path refers to
    # (src's referrer drv may go first when a walk starts from it: no loss)


def test_root_announced_during_deletion_waits_until_it_is_gone(store):
    nix, db, paths = store
    target = paths["drv"]
    announced = threading.Event()
    waiter: list[threading.Thread] = []

    class Racing(gc.Collector):
        def _delete_entry(self, name):
            if name == os.path.basename(target) and not waiter:
                thread = threading.Thread(target=lambda: (_announce(self.server.path, target),
                                                          announced.set()))
                thread.start()
                waiter.append(thread)
                assert not announced.wait(0.3), "announcement answered mid-deletion"
            return super()._delete_entry(name)

    deleted, _ = Racing(nix.layout, db, keep_outputs=False, keep_derivations=False,
                        log=[].append).collect(gc.DELETE_DEAD, [], gc.NO_LIMIT)
    waiter[0].join(10)
    assert announced.is_set()
    assert target in deleted and paths["src"] in deleted
    assert not _present(nix, db, target) and not _present(nix, db, paths["src"])
