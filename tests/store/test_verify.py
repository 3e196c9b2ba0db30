"""Store verification (spec §10) against the real ``nix-store --verify`` 2.8.

A scratch store filled by real Nix is damaged (a file's content changed,
a path's directory deleted, a hash zeroed in the database), copied, and
real ``nix-store --verify [--check-contents] [--repair]`` runs on one twin,
``verify_store`` on the other: the messages a client shows, the outcome
(errors remain or not) and the database afterwards must agree.
"""

from __future__ import annotations

import os
import shutil

import pytest

from nixwarden.shared.errors import StoreRefusal
from nixwarden.supervisor.store.db import StoreDB
from nixwarden.supervisor.store.verify import verify_store

from nixenv import make_nix_env, needs_nix
from twins import Lines, corrupt, db_rows, snapshot, sql, stderr_lines, swap_in

pytestmark = needs_nix

NOT_FIXED = "warning: not all store errors were fixed"
ZERO = "sha256:" + "0" * 64


@pytest.fixture
def nix(tmp_path):
    return make_nix_env(str(tmp_path / "store-root"))


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _drv(nix, tmp: str, name: str, dep: str) -> str:
    """A derivation (not built) whose input source is ``dep``."""
    expr = (f'derivation {{ name = "{name}"; system = "x86_64-linux"; builder = "/bin/sh";'
            f' args = [ "-c" "echo ${{builtins.storePath "{dep}"}} > $out" ]; }}')
    _write(f"{tmp}/{name}.nix", expr)
    return nix.out("nix-instantiate", f"{tmp}/{name}.nix")


def _fill(nix, tmp: str) -> dict[str, str]:
    """Named store paths; ``used`` is referenced by ``drv``, ``s1`` by ``x1``."""
    src = f"{tmp}/src"
    for name, files in {"used": {"": "hello\n"}, "gone": {"": "bye\n"},
                        "s1": {"": "chained\n"},
                        "dir": {"a": "hello\n", "b": "same\n"},
                        "other": {"a": "hello\n", "c": "other\n"},
                        "zero": {"z": "zeroed\n"}}.items():
        for rel, text in files.items():
            _write(f"{src}/{name}/{rel}" if rel else f"{src}/{name}", text)
    names = ["used", "gone", "s1", "dir", "other", "zero"]
    paths = dict(zip(names, nix.out("nix-store", "--add",
                                    *(f"{src}/{n}" for n in names)).split()))
    paths["drv"] = _drv(nix, tmp, "d", paths["used"])
    paths["x1"] = _drv(nix, tmp, "x1", paths["s1"])
    return paths


def _delete(nix, path: str) -> None:
    real = nix.layout.real_path(path)
    if os.path.isdir(real):
        for root, dirs, _ in os.walk(real):
            os.chmod(root, 0o755)
        shutil.rmtree(real)
    else:
        os.unlink(real)


def _differential(nix, *flags: str, repair_path=None):
    """Real nix-store --verify on one twin, verify_store on the other."""
    twin = snapshot(nix.root)
    proc = nix.run("nix-store", "--verify", *flags, check=False)
    nix_db = db_rows(nix.layout.db_path)
    nix_links = sorted(os.listdir(nix.layout.links_dir))
    swap_in(nix.root, twin)
    lines = Lines()
    with StoreDB.open(nix.layout) as db:
        errors = verify_store(nix.layout, db, check_contents="--check-contents" in flags,
                              repair="--repair" in flags, log=lines,
                              repair_path=repair_path)
    nix_lines = stderr_lines(proc)
    assert (proc.returncode == 1) == errors
    if errors:
        assert nix_lines[-1] == NOT_FIXED
        nix_lines = nix_lines[:-1]
    assert lines.shown == nix_lines
    assert db_rows(nix.layout.db_path) == nix_db
    assert sorted(os.listdir(nix.layout.links_dir)) == nix_links
    return errors, lines.shown


def test_clean_store(nix, tmp_path):
    _fill(nix, str(tmp_path))
    errors, shown = _differential(nix, "--check-contents")
    assert not errors
    assert shown == ["reading the Nix store...", "checking path existence...",
                     "checking link hashes...", "checking store hashes..."]


def test_missing_paths(nix, tmp_path):
    p = _fill(nix, str(tmp_path))
    for name in ("gone", "s1", "x1", "used"):
        _delete(nix, p[name])
    errors, shown = _differential(nix)
    assert errors
    assert f"path '{p['gone']}' disappeared, removing from database..." in shown
    assert f"path '{p['x1']}' disappeared, removing from database..." in shown
    assert f"path '{p['s1']}' disappeared, removing from database..." in shown
    assert f"path '{p['used']}' disappeared, but it still has valid referrers!" in shown


def test_missing_referenced_path_repair_impossible(nix, tmp_path):
    p = _fill(nix, str(tmp_path))
    _delete(nix, p["used"])
    errors, shown = _differential(nix, "--repair")
    assert errors
    assert f"warning: cannot repair path '{p['used']}'" in shown


def test_invalidated_store_passes_real_verify(nix, tmp_path):
    p = _fill(nix, str(tmp_path))
    for name in ("gone", "s1", "x1"):
        _delete(nix, p[name])
    lines = Lines()
    with StoreDB.open(nix.layout) as db:
        assert not verify_store(nix.layout, db, check_contents=True, repair=False, log=lines)
        assert not db.is_valid(p["gone"]) and not db.is_valid(p["x1"])
    nix.run("nix-store", "--verify", "--check-contents")


def _damage_contents(nix, p) -> None:
    """Optimise (so .links exist), corrupt a linked file, zero a DB hash."""
    nix.run("nix-store", "--optimise")
    corrupt(nix.layout.real_path(p["other"]) + "/c", b"changed\n")    # and its link
    corrupt(nix.layout.real_path(p["dir"]) + "/b", b"SAME\n")
    sql(nix.layout.db_path, "update ValidPaths set hash = ?, narSize = null where path = ?",
        ZERO, p["zero"])


def test_check_contents(nix, tmp_path):
    p = _fill(nix, str(tmp_path))
    _damage_contents(nix, p)
    errors, shown = _differential(nix, "--check-contents")
    assert errors
    assert any(line.startswith(f"path '{p['other']}' was modified! expected hash 'sha256:")
               for line in shown)
    assert any(line.startswith(f"path '{p['dir']}' was modified!") for line in shown)
    assert any(line.startswith(f"link '{nix.layout.links_dir}/") for line in shown)
    assert f"fixing missing hash on '{p['zero']}'" in shown
    assert any(line.startswith(f"updating size field on '{p['zero']}' to ") for line in shown)
    with StoreDB.open(nix.layout) as db:
        info = db.query_path_info(p["zero"])
    assert info.nar_hash == "sha256:" + nix.nar_hash_hex(nix.layout.real_path(p["zero"]))
    assert info.nar_size == nix.nar_size(nix.layout.real_path(p["zero"]))


def test_check_contents_repair_without_means(nix, tmp_path):
    p = _fill(nix, str(tmp_path))
    _damage_contents(nix, p)
    errors, shown = _differential(nix, "--check-contents", "--repair")
    assert errors
    assert f"error: cannot repair path '{p['other']}'" in shown
    assert any(line.startswith(f"removed link '{nix.layout.links_dir}/") for line in shown)


def test_repair_callback(nix, tmp_path):
    p = _fill(nix, str(tmp_path))
    other = nix.layout.real_path(p["other"])
    corrupt(other + "/c", b"changed\n")
    _delete(nix, p["used"])
    asked: list[str] = []

    def repair(path: str) -> bool:
        asked.append(path)
        if path == p["other"]:
            corrupt(other + "/c", b"other\n")
            return True
        raise StoreRefusal(f"cannot build '{path}'")

    lines = Lines()
    with StoreDB.open(nix.layout) as db:
        errors = verify_store(nix.layout, db, check_contents=True, repair=True, log=lines,
                              repair_path=repair)
    assert errors  # "used" could not be repaired
    assert asked == [p["used"], p["other"]]
    assert f"warning: cannot build '{p['used']}'" in lines.shown
    assert not [line for line in lines.shown if line.startswith("error:")]
    _write(nix.layout.real_path(p["used"]), "hello\n")
    os.chmod(nix.layout.real_path(p["used"]), 0o444)
    os.utime(nix.layout.real_path(p["used"]), (1, 1))
    nix.run("nix-store", "--verify", "--check-contents")


def test_missing_referrer_is_removed_first(nix, tmp_path):
    """A missing path sorting before its missing referrer: referrer goes first."""
    from nixwarden.supervisor.store.pathinfo import PathInfo
    _fill(nix, str(tmp_path))
    low = f"{nix.layout.store_dir}/{'0' * 32}-low"
    high = f"{nix.layout.store_dir}/{'z' * 32}-high"
    for path, text in ((low, "low\n"), (high, low)):
        _write(nix.layout.real_path(path), text)
    with StoreDB.open(nix.layout) as db:
        db.register_valid_paths([
            PathInfo(path=p, deriver=None,
                     nar_hash="sha256:" + nix.nar_hash_hex(nix.layout.real_path(p)),
                     nar_size=nix.nar_size(nix.layout.real_path(p)), references=refs)
            for p, refs in ((low, ()), (high, (low,)))])
    _delete(nix, low)
    _delete(nix, high)
    errors, shown = _differential(nix)
    assert not errors
    assert shown[2:] == [f"path '{high}' disappeared, removing from database...",
                         f"path '{low}' disappeared, removing from database..."]


def test_waits_for_gc_lock_as_nix(nix, tmp_path):
    """Held exclusively (a GC runs): both tell the client and wait."""
    import fcntl
    import threading
    import time
    _fill(nix, str(tmp_path))
    fd = os.open(nix.layout.gc_lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    proc = nix.popen("nix-store", "--verify")
    lines = Lines()
    done = threading.Event()

    def run():
        with StoreDB.open(nix.layout) as db:
            verify_store(nix.layout, db, check_contents=False, repair=False, log=lines)
        done.set()
    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1)
    assert not done.is_set()
    os.close(fd)
    thread.join(30)
    _out, err = proc.communicate(timeout=30)
    assert done.is_set()
    assert lines.shown == err.decode().splitlines()
    assert lines.shown[:2] == ["reading the Nix store...",
                               "waiting for the big garbage collector lock..."]
