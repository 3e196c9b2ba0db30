"""Store optimisation (spec §7) against the real ``nix-store --optimise`` 2.8.

Each test fills a scratch store with real Nix (``nix-store --add`` of
duplicated files, executables, symlinks, empty files), copies it, runs real
``nix-store --optimise`` on one twin and ``optimise_store`` on the other,
and compares ``.links`` names and contents, the hard-link structure, modes
and mtimes, the messages and the bytes saved.  Afterwards the store must
pass real ``nix-store --verify --check-contents``.
"""

from __future__ import annotations

import os
import random
import stat

import pytest

from nixwarden.shared.logtypes import ResultType
from nixwarden.supervisor.store.db import StoreDB
from nixwarden.supervisor.store.optimise import (OptimiseStats, auto_optimise,
                                                 freed_message, optimise_store)

from nixenv import make_nix_env, needs_nix
from twins import Lines, shape, snapshot, stderr_lines, swap_in

pytestmark = needs_nix

BIG = random.Random(7).randbytes(300 * 1024)


def _write(path: str, data: bytes | str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def _fill(nix, src: str) -> list[str]:
    """Sources with duplicates inside one path, across paths and at top level."""
    for d in ("d1", "d2", "d3/sub"):
        _write(f"{src}/{d}/hello", "hello\n")
        _write(f"{src}/{d}/big", BIG)
        _write(f"{src}/{d}/run", "#!/bin/sh\necho hi\n", 0o755)
        _write(f"{src}/{d}/empty", b"")
        os.symlink("a.txt", f"{src}/{d}/link")
    _write(f"{src}/d1/noexec-run", "#!/bin/sh\necho hi\n")   # not linked to run
    _write(f"{src}/d3/sub/deeper/big2", BIG)
    _write(f"{src}/top1", "hello\n")
    _write(f"{src}/top2", BIG)
    os.symlink("a.txt", f"{src}/toplink")
    names = ["d1", "d2", "d3", "top1", "top2", "toplink"]
    return nix.out("nix-store", "--add", *(f"{src}/{n}" for n in names)).split()


@pytest.fixture
def nix(tmp_path):
    return make_nix_env(str(tmp_path / "store-root"))


class Acts:
    """Records the activities ``optimise_store`` opens for the client."""

    def __init__(self):
        self.events: list[tuple] = []
        self._next = 1

    def start(self, level, activity_type, text="", fields=(), parent=0):
        self._next += 1
        self.events.append(("start", self._next, level, int(activity_type), text))
        return self._next

    def result(self, act, result_type, fields):
        self.events.append(("result", act, int(result_type), tuple(fields)))

    def stop(self, act):
        self.events.append(("stop", act))


def _ours(nix, **kw) -> tuple[OptimiseStats, Lines]:
    lines = Lines()
    with StoreDB.open(nix.layout) as db:
        stats = optimise_store(nix.layout, db, lines, **kw)
    return stats, lines


def _differential(nix, tmp_path):
    """Real Nix on one twin, ours on the other; returns both results."""
    twin = snapshot(nix.root)
    proc = nix.run("nix-store", "--optimise")
    theirs = shape(nix.layout.real_store_dir)
    swap_in(nix.root, twin)
    stats, lines = _ours(nix)
    return stderr_lines(proc), theirs, stats, lines


def test_links_and_structure_match_nix(nix, tmp_path):
    _fill(nix, str(tmp_path / "src"))
    nix_lines, theirs, stats, lines = _differential(nix, tmp_path)
    ours = shape(nix.layout.real_store_dir)
    assert ours == theirs
    assert lines.shown == nix_lines
    assert freed_message(stats) == nix_lines[-1]
    # Replaced (one of each kind stays): 4 of 5 big, 3 of 4 hello, 2 of 3
    # run, 2 of 3 empty, 3 of 4 symlinks.
    assert stats.files_linked == 14
    assert stats.bytes_freed == 4 * len(BIG) + 3 * 6 + 2 * 18 + 3 * 5
    links = sorted(os.listdir(nix.layout.links_dir))
    assert "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw" in links   # spec §7
    assert "183p8jhjfcpk6kac6hxwp4gzp9brkvkibylz27jfbvgd5kqcq2jy" in links
    assert "10afhdla3fy4d56mfb7b45i291h74jngwakp16wd3r36m37h0g4d" in links
    assert not [n for n in os.listdir(nix.layout.real_store_dir) if n.startswith(".tmp-link")]
    nix.run("nix-store", "--verify", "--check-contents")


def test_idempotent_and_agrees_with_nix_second_run(nix, tmp_path):
    _fill(nix, str(tmp_path / "src"))
    _ours(nix)
    before = shape(nix.layout.real_store_dir)
    stats, lines = _ours(nix)
    assert stats == OptimiseStats()
    assert shape(nix.layout.real_store_dir) == before
    # Real Nix finds nothing left to do on our result either.
    assert stderr_lines(nix.run("nix-store", "--optimise")) == lines.shown
    assert lines.shown == ["0.00 MiB freed by hard-linking 0 files"]
    assert shape(nix.layout.real_store_dir) == before


def test_after_nix_optimised_ours_does_nothing(nix, tmp_path):
    _fill(nix, str(tmp_path / "src"))
    nix.run("nix-store", "--optimise")
    before = shape(nix.layout.real_store_dir)
    stats, _ = _ours(nix)
    assert stats.files_linked == 0
    assert shape(nix.layout.real_store_dir) == before


def test_writable_file_skipped_with_nix_warning(nix, tmp_path):
    paths = _fill(nix, str(tmp_path / "src"))
    d2 = nix.layout.real_path(next(p for p in paths if p.endswith("-d2")))
    os.chmod(f"{d2}/hello", 0o644)
    nix_lines, theirs, stats, lines = _differential(nix, tmp_path)
    assert shape(nix.layout.real_store_dir) == theirs
    warning = f"warning: skipping suspicious writable file '{d2}/hello'"
    assert warning in lines.shown
    assert lines.shown == nix_lines
    assert os.lstat(f"{d2}/hello").st_nlink == 1
    assert stats.files_linked == 13


def test_activities_report_each_linked_file(nix, tmp_path):
    paths = _fill(nix, str(tmp_path / "src"))
    acts = Acts()
    roots: list[str] = []
    stats, _ = _ours(nix, acts=acts, add_temp_root=roots.append)
    assert roots == sorted(paths)
    linked = [e[3] for e in acts.events if e[0] == "result" and e[2] == ResultType.FILE_LINKED]
    assert len(linked) == stats.files_linked
    assert sum(size for size, _blocks in linked) == stats.bytes_freed
    progress = [e[3] for e in acts.events if e[0] == "result" and e[2] == ResultType.PROGRESS]
    assert progress == [(i, len(paths), 0, 0) for i in range(len(paths) + 1)]
    texts = [e[4] for e in acts.events if e[0] == "start"]
    assert texts == [""] + [f"optimising path '{p}'" for p in sorted(paths)]
    assert len([e for e in acts.events if e[0] == "stop"]) == len(paths) + 1


def test_corrupted_link_of_other_size_is_replaced(nix, tmp_path):
    paths = _fill(nix, str(tmp_path / "src"))
    _ours(nix)
    hello_link = f"{nix.layout.links_dir}/04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
    # Detach the link from the store files and give it another size.
    os.unlink(hello_link)
    with open(hello_link, "wb") as f:
        f.write(b"corrupt!\n")
    os.chmod(hello_link, 0o444)
    twin = snapshot(nix.root)
    proc = nix.run("nix-store", "--optimise")
    theirs = shape(nix.layout.real_store_dir)
    swap_in(nix.root, twin)
    stats, lines = _ours(nix)
    assert shape(nix.layout.real_store_dir) == theirs
    assert lines.shown == stderr_lines(proc)
    assert f"warning: removing corrupted link '{hello_link}'" in lines.shown
    nix.run("nix-store", "--verify", "--check-contents")


def test_auto_optimise_matches_nix_auto_optimise_store(nix, tmp_path):
    src = str(tmp_path / "src")
    _write(f"{src}/a/x", BIG)
    _write(f"{src}/a/y", BIG)
    _write(f"{src}/b/x", BIG)
    with open(nix.root + "/etc/nix.conf", "a") as f:
        f.write("auto-optimise-store = true\n")
    twin = snapshot(nix.root)
    nix.run("nix-store", "--add", f"{src}/a", f"{src}/b")
    theirs = shape(nix.layout.real_store_dir)
    swap_in(nix.root, twin)
    with open(nix.root + "/etc/nix.conf", "a") as f:
        f.write("auto-optimise-store = false\n")
    for path in nix.out("nix-store", "--add", f"{src}/a", f"{src}/b").split():
        auto_optimise(nix.layout, nix.layout.real_path(path))
    assert shape(nix.layout.real_store_dir) == theirs
    nix.run("nix-store", "--verify", "--check-contents")


def test_directory_restored_read_only(nix, tmp_path):
    paths = _fill(nix, str(tmp_path / "src"))
    _ours(nix)
    for path in paths:
        real = nix.layout.real_path(path)
        for root, dirs, _files in os.walk(real):
            for d in [root] + [os.path.join(root, x) for x in dirs]:
                st = os.lstat(d)
                assert stat.S_IMODE(st.st_mode) == 0o555 and st.st_mtime == 1, d
