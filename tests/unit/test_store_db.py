"""Unit tests of the local-store database and lock layer (no real Nix needed).

Covers StoreDB opening (layout, schema file, pragmas, refusal of newer or
corrupt schemas, upgrade 9 -> 10, the shared big-lock), the column
encodings of spec §2.4, registration rules of §4.3 (references valid or in
the batch, cycles, update semantics, rollback), invalidation (§5), the
queries of §4.5, path locks with the "d" protocol (§3.3) across processes,
and the temp-roots file (§3.5).
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import random
import stat
import threading
import time

import pytest

from nixwarden.shared.errors import StoreRefusal
from nixwarden.supervisor.store.db import StoreDB
from nixwarden.supervisor.store.layout import StoreLayout
from nixwarden.supervisor.store.locks import (PathLock, TempRoots, gc_lock, lock_paths,
                                              read_temp_roots)
from nixwarden.supervisor.store.pathinfo import PathInfo

NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
HASH = "sha256:" + "1c" * 32


@pytest.fixture
def layout(tmp_path):
    root = str(tmp_path)
    return StoreLayout(root + "/store", root + "/store", root + "/var/nix", root + "/var/log/nix")


@pytest.fixture
def db(layout):
    d = StoreDB.open(layout)
    yield d
    d.close()


def sp(layout, name, h=None):
    h = h or "".join(random.choice(NIX32) for _ in range(32))
    return f"{layout.store_dir}/{h}-{name}"


def info(path, refs=(), **kw):
    return PathInfo(path=path, deriver=kw.pop("deriver", None), nar_hash=kw.pop("nar_hash", HASH),
                    references=tuple(refs), nar_size=kw.pop("nar_size", 120), **kw)


def raw(db, path):
    return db.conn.execute("select hash, registrationTime, deriver, narSize, ultimate, sigs, ca"
                           " from ValidPaths where path = ?", (path,)).fetchone()


# -- opening -------------------------------------------------------------------------


def test_open_creates_layout_and_schema(layout, db):
    with open(layout.schema_path) as f:
        assert f.read() == "10"
    assert stat.S_IMODE(os.stat(layout.big_lock_path).st_mode) == 0o600
    for d in (layout.real_store_dir, layout.temproots_dir, layout.gcroots_dir + "/per-user",
              layout.profiles_dir + "/per-user", layout.db_dir, layout.links_dir):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755, d
    assert os.readlink(layout.gcroots_dir + "/profiles") == layout.profiles_dir
    c = db.conn
    assert c.execute("pragma foreign_keys").fetchone() == (1,)
    assert c.execute("pragma journal_mode").fetchone() == ("wal",)
    assert c.execute("pragma synchronous").fetchone() == (1,)
    assert c.execute("pragma wal_autocheckpoint").fetchone() == (40000,)
    assert c.execute("pragma busy_timeout").fetchone() == (3600000,)
    names = {r[0] for r in c.execute("select name from sqlite_master")}
    assert names == {"ValidPaths", "sqlite_sequence", "Refs", "IndexReferrer", "IndexReference",
                     "DeleteSelfRefs", "DerivationOutputs", "IndexDerivationOutputs",
                     "sqlite_autoindex_ValidPaths_1", "sqlite_autoindex_Refs_1",
                     "sqlite_autoindex_DerivationOutputs_1"}


def test_reopen_and_idempotent_layout(layout):
    p = sp(layout, "a")
    with StoreDB.open(layout) as d:
        d.register_valid_paths([info(p)])
    with StoreDB.open(layout) as d:
        assert d.is_valid(p)


def test_newer_or_corrupt_schema_refused(layout):
    StoreDB.open(layout).close()
    with open(layout.schema_path, "w") as f:
        f.write("11")
    with pytest.raises(StoreRefusal, match="current Nix store schema is version 11, "
                                           "but I only support 10"):
        StoreDB.open(layout)
    with open(layout.schema_path, "w") as f:
        f.write("ten")
    with pytest.raises(StoreRefusal, match="is corrupt"):
        StoreDB.open(layout)


def test_upgrade_from_schema_9(layout):
    with StoreDB.open(layout) as d:
        d.conn.execute("alter table ValidPaths drop column ca")
    with open(layout.schema_path, "w") as f:
        f.write("9")
    with StoreDB.open(layout) as d:
        cols = [r[1] for r in d.conn.execute("pragma table_info(ValidPaths)")]
        assert cols[-1] == "ca"
    with open(layout.schema_path) as f:
        assert f.read() == "10"


def _try_exclusive(path, q):
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        q.put(True)
    except BlockingIOError:
        q.put(False)


def test_big_lock_held_shared_while_open(layout):
    d = StoreDB.open(layout)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    for expect in (False, True):
        proc = ctx.Process(target=_try_exclusive, args=(layout.big_lock_path, q))
        proc.start()
        proc.join()
        assert q.get() is expect
        d.close()



def _open_and_report(layout, q):
    try:
        with StoreDB.open(layout) as d:
            q.put(d.conn.execute("select count(*) from ValidPaths").fetchone()[0])
    except BaseException as e:  # reported, so the parent's assertion shows it
        q.put(repr(e))


def test_new_store_created_while_others_hold_the_big_lock_shared(layout):
    """Several processes open one new store at once while another (like a
    pooled session) holds the big-lock shared: all of them finish, the
    schema is created once and whole.  (Creating under an exclusive lock
    waited forever for the holder.)"""
    layout.ensure_directories(as_root=os.getuid() == 0)
    holder = os.open(layout.big_lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_SH)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_open_and_report, args=(layout, q)) for _ in range(4)]
    try:
        for proc in procs:
            proc.start()
        results = [q.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.exitcode is None:
                proc.kill()
        os.close(holder)
    assert results == [0, 0, 0, 0]
    with open(layout.schema_path) as f:
        assert f.read() == "10"


def test_upgrade_waits_for_nobody_once_another_process_upgraded(layout):
    """A process that wants to upgrade schema 9 while another holds the
    big-lock shared sees the upgrade done by someone else and goes on,
    however long the other holds on (it used to wait for exclusive access)."""
    with StoreDB.open(layout) as d:
        d.conn.execute("alter table ValidPaths drop column ca")
    with open(layout.schema_path, "w") as f:
        f.write("9")
    holder = os.open(layout.big_lock_path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_SH)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_open_and_report, args=(layout, q))
    try:
        proc.start()
        time.sleep(0.5)  # it is now waiting for the holder
        import sqlite3
        with sqlite3.connect(layout.db_path) as conn:  # the holder upgrades
            conn.execute("alter table ValidPaths add column ca text")
        layout.write_schema_version(10)
        assert q.get(timeout=30) == 0
    finally:
        proc.join(timeout=5)
        if proc.exitcode is None:
            proc.kill()
        os.close(holder)

# -- registration and queries ------------------------------------------------------------


def test_column_encodings(layout, db):
    a, b = sp(layout, "a"), sp(layout, "b")
    drv = sp(layout, "b.drv")
    db.register_valid_paths([info(a, nar_size=0),
                             info(b, refs=[a, b], deriver=drv, ultimate=True,
                                  sigs=("k2:y", "k1:x"), ca="fixed:r:sha256:abc",
                                  registration_time=1234)])
    assert raw(db, a)[2:] == (None, None, None, None, None)
    assert raw(db, b) == (HASH, 1234, drv, 120, 1, "k1:x k2:y", "fixed:r:sha256:abc")
    got = db.query_path_info(b)
    assert got == PathInfo(b, drv, HASH, tuple(sorted([a, b])), 1234, 120, True,
                           ("k1:x", "k2:y"), "fixed:r:sha256:abc")
    assert db.query_path_info(a).nar_size == 0 and not db.query_path_info(a).ultimate
    assert abs(raw(db, a)[1] - time.time()) < 100
    assert db.query_referrers(a) == [b]
    assert db.query_referrers(b) == [b]
    assert db.query_references(b) == sorted([a, b])
    assert db.query_deriver(b) == drv and db.query_deriver(a) is None


def test_empty_strings_read_as_absent(layout, db):
    a = sp(layout, "a")
    db.conn.execute("insert into ValidPaths (path, hash, registrationTime, deriver, narSize,"
                    " ultimate, sigs, ca) values (?, ?, 5, '', NULL, 0, '', '')", (a, HASH))
    got = db.query_path_info(a)
    assert (got.deriver, got.nar_size, got.ultimate, got.sigs, got.ca) == (None, 0, False, (), None)


def test_reregistration_updates_but_keeps_id_deriver_time(layout, db):
    a = sp(layout, "a")
    drv = sp(layout, "a.drv")
    db.register_valid_paths([info(a, deriver=drv, registration_time=10)])
    (old_id,) = db.conn.execute("select id from ValidPaths where path = ?", (a,)).fetchone()
    db.register_valid_paths([info(a, nar_hash="sha256:" + "22" * 32, nar_size=7, ultimate=True,
                                  registration_time=99)])
    assert raw(db, a) == ("sha256:" + "22" * 32, 10, drv, 7, 1, None, None)
    assert db.conn.execute("select id from ValidPaths where path = ?", (a,)).fetchone() == (old_id,)


def test_invalid_reference_rolls_back_batch(layout, db):
    a, b, missing = sp(layout, "a"), sp(layout, "b"), sp(layout, "missing")
    with pytest.raises(StoreRefusal, match=f"path '{missing}' is not valid"):
        db.register_valid_paths([info(a), info(b, refs=[a, missing])])
    assert db.query_all_valid_paths() == []


def test_batch_order_does_not_matter_but_cycles_do(layout, db):
    a, b = sp(layout, "a"), sp(layout, "b")
    db.register_valid_paths([info(b, refs=[a]), info(a)])
    assert db.query_referrers(a) == [b]
    c, d = sp(layout, "c"), sp(layout, "d")
    with pytest.raises(StoreRefusal, match="cycle detected"):
        db.register_valid_paths([info(c, refs=[d]), info(d, refs=[c])])
    assert not db.valid_subset([c, d])


def test_invalidate(layout, db):
    a, b = sp(layout, "a"), sp(layout, "b")
    drv, out = sp(layout, "x.drv"), sp(layout, "x")
    db.register_valid_paths([info(a, refs=[a]), info(b, refs=[a, b]), info(drv, refs=[b])],
                            derivation_outputs={drv: {"out": out, "dev": out + "-dev"}})
    with pytest.raises(StoreRefusal, match=f"cannot delete path '{a}' because it is in use by '{b}'"):
        db.invalidate_path(a)
    db.invalidate_path(drv)
    assert db.conn.execute("select count(*) from DerivationOutputs").fetchone() == (0,)
    db.invalidate_path(b)  # self-reference is no obstacle
    db.invalidate_path(a)
    db.invalidate_path(a)  # not valid: no-op
    assert db.query_all_valid_paths() == []
    assert db.conn.execute("select count(*) from Refs").fetchone() == (0,)


def test_derivation_outputs_and_derivers(layout, db):
    drv, out = sp(layout, "x.drv"), sp(layout, "x")
    db.register_valid_paths([info(drv)], derivation_outputs={drv: {"out": out}})
    assert db.query_derivation_outputs(drv) == {"out": out}
    assert db.query_valid_derivers(out) == [drv]
    assert db.query_derivation_outputs(sp(layout, "nope.drv")) == {}
    with pytest.raises(StoreRefusal):
        db.register_valid_paths([], derivation_outputs={sp(layout, "y.drv"): {"out": out}})


def test_hash_part_lookup_checks_prefix(layout, db):
    a = sp(layout, "a", "1" * 32)
    db.register_valid_paths([info(a)])
    assert db.query_path_from_hash_part("1" * 32) == a
    assert db.query_path_from_hash_part("0" * 32) is None  # ">=" finds a, prefix differs
    assert db.query_path_from_hash_part("2" * 32) is None
    assert db.query_path_from_hash_part("1" * 32, "/other/store") is None
    with pytest.raises(ValueError):
        db.query_path_from_hash_part("abc")


def test_valid_subset_many(layout, db):
    paths = [sp(layout, f"p{i}") for i in range(1200)]
    db.register_valid_paths([info(p) for p in paths[::2]])
    assert db.valid_subset(paths) == set(paths[::2])
    assert db.query_all_valid_paths() == sorted(paths[::2])


def test_add_signatures(layout, db):
    a = sp(layout, "a")
    db.register_valid_paths([info(a, sigs=("k2:b",), ultimate=True)])
    db.add_signatures(a, ["k1:a", "k2:b"])
    assert raw(db, a)[4:6] == (1, "k1:a k2:b")
    with pytest.raises(StoreRefusal):
        db.add_signatures(sp(layout, "nope"), ["k:x"])


def test_transaction_rolls_back_everything(layout, db):
    a, b = sp(layout, "a"), sp(layout, "b")
    with pytest.raises(RuntimeError):
        with db.transaction():
            db.register_valid_paths([info(a)])
            db.register_valid_paths([info(b)])
            raise RuntimeError("boom")
    assert db.query_all_valid_paths() == []


def test_real_path_mapping():
    lay = StoreLayout.chroot("/r")
    assert lay.real_path("/nix/store/abc-x/y") == "/r/nix/store/abc-x/y"
    assert lay.state_dir == "/r/nix/var/nix"
    for bad in ("/nix/storeX/abc", "/nix/store/", "/etc/passwd"):
        with pytest.raises(ValueError):
            lay.real_path(bad)


# -- locks ----------------------------------------------------------------------------


def _hold_lock(path, q, hold):
    with PathLock([path]):
        q.put(("got", time.monotonic()))
        time.sleep(hold)
        q.put(("released", time.monotonic()))


def test_path_lock_serialises_processes(tmp_path):
    target = str(tmp_path / "p")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    first = ctx.Process(target=_hold_lock, args=(target, q, 0.5))
    first.start()
    assert q.get(timeout=10)[0] == "got"
    assert lock_paths([target], wait=False) is None
    second = ctx.Process(target=_hold_lock, args=(target, q, 0))
    second.start()
    events = [q.get(timeout=10) for _ in range(3)]
    first.join()
    second.join()
    assert [e[0] for e in events] == ["released", "got", "released"]
    assert events[1][1] >= events[0][1]
    assert not os.path.exists(target + ".lock")


def test_stale_lock_file_is_not_trusted(tmp_path):
    target = str(tmp_path / "p")
    holder = lock_paths([target])
    got: list[PathLock] = []
    waiter = threading.Thread(target=lambda: got.append(lock_paths([target])))
    waiter.start()
    time.sleep(0.2)  # the waiter now blocks on the file we are about to delete
    holder.release()  # unlink + "d"
    waiter.join(10)
    (fd, lock_file), = got[0]._held
    st, now = os.fstat(fd), os.stat(target + ".lock")
    assert st.st_size == 0 and (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev)
    got[0].release()


def test_lock_paths_without_wait_releases_partial(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    hold_b = lock_paths([b])
    assert lock_paths([a, b], wait=False) is None
    lock_a = lock_paths([a], wait=False)  # a was released again
    assert lock_a is not None
    lock_a.release()
    hold_b.release()


def test_gc_lock_modes(layout):
    layout.ensure_directories(as_root=False)
    with gc_lock(layout, exclusive=False) as shared:
        assert shared
        with gc_lock(layout, exclusive=False, wait=False) as again:
            assert again
        with gc_lock(layout, exclusive=True, wait=False) as excl:
            assert not excl


def test_temp_roots_file(layout):
    layout.ensure_directories(as_root=False)
    mine = f"{layout.temproots_dir}/{os.getpid()}"
    with open(mine, "w") as f:
        f.write("stale junk")  # left by a dead process with our pid
    roots = TempRoots(layout)
    p, q = sp(layout, "a"), sp(layout, "b")
    roots.add(p)
    roots.add(q)
    roots.add(p)
    with open(mine, "rb") as f:
        assert f.read() == (p + "\0" + q + "\0").encode()
    assert read_temp_roots(layout) == {os.getpid(): {p, q}}
    with pytest.raises(ValueError):
        roots.add(p + "\n")
    roots.close()
    assert not os.path.exists(mine)
    assert read_temp_roots(layout) == {}


def test_long_reference_chain_in_one_batch(layout, db):
    paths = [sp(layout, f"c{i}") for i in range(3000)]
    infos = [info(p, refs=[paths[i + 1]] if i + 1 < len(paths) else []) for i, p in enumerate(paths)]
    db.register_valid_paths(list(reversed(infos)))
    assert db.query_referrers(paths[-1]) == [paths[-2]]
    loop = [sp(layout, n) for n in ("x", "y", "z")]
    with pytest.raises(StoreRefusal, match="cycle detected"):
        db.register_valid_paths([info(loop[0], refs=[loop[1]]), info(loop[1], refs=[loop[2]]),
                                 info(loop[2], refs=[loop[0], loop[2]])])


def test_realisations_with_dependents(layout, db):
    dep, top = sp(layout, "dep"), sp(layout, "top")
    db.register_valid_paths([info(dep), info(top, [dep])])
    db.ensure_ca_schema()
    dep_id, top_id = "sha256:" + "a1" * 32, "sha256:" + "b2" * 32
    db.register_realisation(dep_id, "out", dep, ["k:sig"])
    db.register_realisation(top_id, "out", top, dependents=[(dep_id, "out", dep)])
    assert db.query_realisation(dep_id, "out") == (dep, ("k:sig",), ())
    assert db.query_realisation(top_id, "out") == (top, (), ((f"{dep_id}!out", dep),))
    # Registering again changes nothing (no duplicate rows).
    db.register_realisation(top_id, "out", top, dependents=[(dep_id, "out", dep)])
    assert db.conn.execute("select count(*) from RealisationsRefs").fetchone() == (1,)
    with pytest.raises(StoreRefusal, match="depends on the non existent"):
        db.register_realisation(top_id, "dev", top, dependents=[("sha256:" + "c3" * 32,
                                                                 "out", dep)])
    with pytest.raises(StoreRefusal, match="that doesn\u2019t point to"):
        db.register_realisation(top_id, "lib", top, dependents=[(dep_id, "out", top)])
    # A refused registration leaves nothing behind.
    assert db.query_realisation(top_id, "dev") is None
    assert db.query_realisation(top_id, "lib") is None


def test_closure_in_one_query(layout, db):
    chain = [sp(layout, f"c{i}") for i in range(300)]
    db.register_valid_paths([info(p, [chain[i - 1]] if i else [p]) for i, p in enumerate(chain)])
    other, missing = sp(layout, "other"), sp(layout, "missing")
    db.register_valid_paths([info(other)])
    visited = []
    got = db.closure([chain[-1], missing], visit=visited.append)
    assert got == set(chain) | {missing}  # an invalid root is kept, without references
    assert sorted(visited) == sorted(got)
    assert db.closure([chain[0]]) == {chain[0]}  # a self-reference ends the walk
    assert db.closure([]) == set()
