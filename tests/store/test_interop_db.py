"""StoreDB against the real nix-store 2.8, on one shared scratch store.

Forward: paths registered by StoreDB are accepted by ``nix-store --verify
--check-contents`` and queried identically by ``nix-store -q``.  Reverse:
a store created and filled by real Nix (``--add``, ``nix-instantiate``, a
build) reads back through StoreDB exactly as ``nix path-info --json``
reports it.  Both directions also run while the other side has the
database open.
"""

from __future__ import annotations

import json
import os

import pytest

from nixwarden.shared.errors import StoreRefusal
from nixwarden.supervisor.store.db import StoreDB
from nixwarden.supervisor.store.pathinfo import PathInfo

from nixenv import make_nix_env, needs_nix, sri_to_hex, write_tree

pytestmark = needs_nix

DRV_NIX = ('derivation { name = "x"; system = "x86_64-linux"; builder = "/bin/sh";'
           ' args = [ "-c" "echo hi > $out" ]; }')


@pytest.fixture
def nix(tmp_path):
    return make_nix_env(str(tmp_path))


def _info(nix, path, references=(), **kw) -> PathInfo:
    real = nix.layout.real_path(path)
    return PathInfo(path=path, deriver=kw.pop("deriver", None),
                    nar_hash="sha256:" + nix.nar_hash_hex(real),
                    references=tuple(references), nar_size=nix.nar_size(real), **kw)


def _populate(nix, db):
    """Register a file, a dir referring to it and itself, and a fake drv."""
    a, b, out, drv = (nix.store_path(n) for n in ("a", "b", "out", "x.drv"))
    write_tree(nix.layout.real_path(a), {"": "hello\n"})
    write_tree(nix.layout.real_path(b), {"ref": a, "self": b})
    write_tree(nix.layout.real_path(out), {"": "built\n"})
    write_tree(nix.layout.real_path(drv), {"": "Derive([])"})
    infos = [
        _info(nix, a),
        _info(nix, b, references=[a, b], sigs=("k2:sig2", "k1:sig1")),
        _info(nix, drv),
        _info(nix, out, deriver=drv, ultimate=True),
    ]
    db.register_valid_paths(infos, derivation_outputs={drv: {"out": out}})
    return a, b, out, drv


def test_fresh_schema_identical_to_nix(nix, tmp_path):
    StoreDB.open(nix.layout).close()
    other = make_nix_env(str(tmp_path / "real"))
    other.run("nix-store", "--init")
    with open(other.layout.schema_path) as f:
        assert f.read() == "10"

    def master(layout):
        with StoreDB.open(layout, ensure_layout=False) as db:
            return sorted(db.conn.execute("select type, name, tbl_name, sql from sqlite_master"))
    assert master(nix.layout) == master(other.layout)


def test_nix_accepts_our_registrations(nix):
    with StoreDB.open(nix.layout) as db:
        a, b, out, drv = _populate(nix, db)
        # Real Nix opens the database while we hold it open too.
        proc = nix.run("nix-store", "--verify", "--check-contents")
        assert b"modified" not in proc.stderr and b"error" not in proc.stderr
        nix.run("nix-store", "--check-validity", a, b, out, drv)
        assert nix.lines("nix-store", "-q", "--references", b) == sorted([a, b])
        assert nix.lines("nix-store", "-q", "--referrers", a) == [b]
        assert nix.lines("nix-store", "-q", "--requisites", b) == sorted([a, b])
        assert nix.out("nix-store", "-q", "--deriver", out) == drv
        assert nix.out("nix-store", "-q", "--size", b) == str(nix.nar_size(b))
        for p in (a, b, out):
            want = nix.out("nix-hash", "--type", "sha256", "--base32", p)
            assert nix.out("nix-store", "-q", "--hash", p) == "sha256:" + want
        meta = json.loads(nix.out("nix", "--extra-experimental-features", "nix-command",
                                  "path-info", "--json", b, out))
        by_path = {m["path"]: m for m in meta}
        assert by_path[b]["signatures"] == ["k1:sig1", "k2:sig2"]
        assert by_path[out]["ultimate"] is True
        assert by_path[out]["deriver"] == drv


def test_we_see_nix_changes_while_open(nix, tmp_path):
    with StoreDB.open(nix.layout) as db:
        a, b, out, drv = _populate(nix, db)
        src = tmp_path / "new.txt"
        src.write_text("new\n")
        added = nix.out("nix-store", "--add", str(src))
        assert db.is_valid(added)
        assert db.query_path_info(added).ca.startswith("fixed:r:sha256:")
        # Real Nix deletes an unreferenced path of ours: the DB rows go.
        nix.run("nix-store", "--delete", out)
        assert not db.is_valid(out)
        assert db.query_valid_derivers(out) == [drv]  # output rows stay with the drv
        # ... and refuses to delete a referenced one, as we do.
        assert nix.run("nix-store", "--delete", a, check=False).returncode != 0
        with pytest.raises(StoreRefusal, match="in use by"):
            db.invalidate_path(a)
        db.invalidate_path(b)
        nix.run("nix-store", "--delete", a)
        assert db.query_all_valid_paths() == sorted([added, drv])


def test_we_read_what_nix_wrote(nix, tmp_path):
    src = tmp_path / "hello.txt"
    src.write_text("hello\n")
    added = nix.out("nix-store", "--add", str(src))
    (tmp_path / "d.nix").write_text(DRV_NIX)
    drv = os.readlink(nix.out("nix-instantiate", "--add-root", str(tmp_path / "drvroot"),
                              str(tmp_path / "d.nix")))
    out = os.readlink(nix.out("nix-store", "-r", "--add-root", str(tmp_path / "outroot"), drv))
    meta = json.loads(nix.out("nix", "--extra-experimental-features", "nix-command",
                              "path-info", "--json", "--all"))
    with StoreDB.open(nix.layout) as db:
        assert db.query_all_valid_paths() == sorted(m["path"] for m in meta)
        for m in meta:
            info = db.query_path_info(m["path"])
            assert info.nar_hash == "sha256:" + sri_to_hex(m["narHash"])
            assert info.nar_size == m["narSize"]
            assert list(info.references) == sorted(m["references"])
            assert info.deriver == m.get("deriver")
            assert info.registration_time == m["registrationTime"]
            assert info.ultimate == m.get("ultimate", False)
            assert list(info.sigs) == sorted(m.get("signatures", []))
            assert info.ca == m.get("ca")
        assert db.query_derivation_outputs(drv) == {"out": out}
        assert db.query_valid_derivers(out) == [drv]
        assert db.query_deriver(out) == drv
        hash_part = os.path.basename(added)[:32]
        assert db.query_path_from_hash_part(hash_part) == added
        assert db.query_path_from_hash_part("0" * 32) is None
        # Our writes to Nix's database are again visible to Nix.
        db.add_signatures(added, ["test-key:abc"])
    got = json.loads(nix.out("nix", "--extra-experimental-features", "nix-command",
                             "path-info", "--json", added))
    assert got[0]["signatures"] == ["test-key:abc"]


def test_tolerates_newer_nix_tables(nix):
    with StoreDB.open(nix.layout) as db:  # play a newer Nix (spec §2.2)
        db.conn.executescript(
            "create table if not exists SchemaMigrations (migration text primary key not null);"
            "insert into SchemaMigrations values ('20220326-ca-derivations');"
            "drop index IndexReferrer;")
    with StoreDB.open(nix.layout) as db:
        a, b, out, drv = _populate(nix, db)
        assert db.query_referrers(a) == [b]
    nix.run("nix-store", "--verify", "--check-contents")


def test_nix_verify_detects_a_wrong_hash(nix):
    """Guards the positive test above: --check-contents really checks."""
    with StoreDB.open(nix.layout) as db:
        p = nix.store_path("bad")
        write_tree(nix.layout.real_path(p), {"": "content\n"})
        db.register_valid_paths([PathInfo(path=p, deriver=None, nar_hash="sha256:" + "ab" * 32,
                                          nar_size=nix.nar_size(p))])
    proc = nix.run("nix-store", "--verify", "--check-contents", check=False)
    assert proc.returncode != 0 and b"modified" in proc.stderr


def test_tolerates_ca_tables_from_real_nix(nix, tmp_path):
    nix.env["NIX_CONFIG"] = "experimental-features = ca-derivations nix-command"
    src = tmp_path / "f.txt"
    src.write_text("ca\n")
    added = nix.out("nix-store", "--add", str(src))
    with open(nix.layout.db_dir + "/ca-schema") as f:
        assert f.read() == "3"
    with StoreDB.open(nix.layout) as db:
        names = {r[0] for r in db.conn.execute("select name from sqlite_master")}
        assert "Realisations" in names
        a, b, out, drv = _populate(nix, db)
        db.invalidate_path(added)
        assert not db.is_valid(added)
    nix.run("nix-store", "--verify", "--check-contents")
    assert nix.run("nix-store", "--check-validity", added, check=False).returncode != 0
