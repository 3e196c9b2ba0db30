"""The hardened NAR restorer and the incoming-entry writer, on hostile input.

``supervisor/store/restore.py`` and ``incoming.py`` driven directly with NAR
byte strings generated here (tests/lib/narlib.py, written independently of
``shared.nar``), restored into a temporary directory: valid trees come out
byte-exact with canonical metadata; hostile ones are refused and nothing is
written outside the entry being built, nothing follows a symlink, and an
aborted entry is removed completely.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import sys
import tracemalloc

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lib.narlib import Exe, Link, nar, node, raw_dir, s  # noqa: E402
from nixwarden.shared import nar as narmod  # noqa: E402
from nixwarden.shared.errors import StoreRefusal  # noqa: E402
from nixwarden.shared.hashes import HashAlgo  # noqa: E402
from nixwarden.shared.storepath import ContentAddressMethod  # noqa: E402
from nixwarden.supervisor.store.incoming import Incoming  # noqa: E402
from nixwarden.supervisor.store.restore import Restorer, remove_entry, remove_path  # noqa: E402

TREE = {
    "a": b"alpha\n",
    "bin": {"run": Exe(b"#!/bin/sh\necho hi\n"), "empty": Exe(b"")},
    "d": {"deeper": {"x": b"x" * 100000}},
    "etc": Link("/etc"),
    "link": Link("a"),
    "up": Link("../../../../../../../../tmp"),
    "zero": b"",
}


@pytest.fixture
def area(tmp_path):
    """(parent fd, parent dir, canary dir outside it)."""
    parent = tmp_path / "store"
    parent.mkdir()
    canary = tmp_path / "canary"
    canary.mkdir()
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    yield fd, parent, canary
    os.close(fd)
    for root, dirs, _files in os.walk(tmp_path):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)


def restore(fd: int, data: bytes, name: str = "out", seed: int = 0) -> None:
    """Parse ``data`` in random-sized pieces and restore it as ``name``."""
    rnd = random.Random(seed)
    parser = narmod.NarParser()
    r = Restorer(fd, name)
    try:
        pos = 0
        while pos < len(data):
            n = rnd.randint(1, 97)
            for ev in parser.feed(data[pos:pos + n]):
                r.apply(ev)
            pos += n
        for ev in parser.feed(b""):
            r.apply(ev)
    except BaseException:
        r.close()
        raise


def read_tree(path: str):
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return Link(os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return {n: read_tree(os.path.join(path, n)) for n in os.listdir(path)}
    with open(path, "rb") as f:
        data = f.read()
    return Exe(data) if st.st_mode & 0o100 else data


def all_entries(path: str):
    yield path
    if os.path.isdir(path) and not os.path.islink(path):
        for n in os.listdir(path):
            yield from all_entries(os.path.join(path, n))


# --- valid archives ------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_tree_round_trips_with_canonical_metadata(area, seed):
    fd, parent, canary = area
    restore(fd, nar(TREE), seed=seed)
    out = os.path.join(parent, "out")
    assert read_tree(out) == TREE
    for p in all_entries(out):
        st = os.lstat(p)
        assert st.st_mtime == 1, p
        if stat.S_ISDIR(st.st_mode):
            assert stat.S_IMODE(st.st_mode) == 0o555, p
        elif stat.S_ISREG(st.st_mode):
            assert stat.S_IMODE(st.st_mode) in (0o444, 0o555), p
    assert stat.S_IMODE(os.lstat(os.path.join(out, "bin", "run")).st_mode) == 0o555
    assert stat.S_IMODE(os.lstat(os.path.join(out, "a")).st_mode) == 0o444
    assert os.listdir(canary) == []
    assert os.listdir(parent) == ["out"]
    # the daemon's own dumper gives back the same bytes
    assert b"".join(narmod.dump(out)) == nar(TREE)


@pytest.mark.parametrize("tree", [b"just a file", Exe(b"#!"), Link("/nowhere"), {}])
def test_single_node_roots(area, tree):
    fd, parent, _ = area
    restore(fd, nar(tree))
    assert read_tree(os.path.join(parent, "out")) == tree


# --- hostile archives ----------------------------------------------------------------

def _deep(depth: int) -> bytes:
    n = node(b"leaf")
    for _ in range(depth):
        n = raw_dir([(b"d", n)])
    return n


HOSTILE = {
    "dotdot": raw_dir([(b"..", node(b"x"))]),
    "dot": raw_dir([(b".", node(b"x"))]),
    "empty-name": raw_dir([(b"", node(b"x"))]),
    "slash": raw_dir([(b"a/b", node(b"x"))]),
    "traversal": raw_dir([(b"../canary/owned", node(b"x"))]),
    "absolute": raw_dir([(b"/tmp/owned", node(b"x"))]),
    "nul": raw_dir([(b"a\0b", node(b"x"))]),
    "duplicate-file": raw_dir([(b"a", node(b"1")), (b"a", node(b"2"))]),
    "unsorted": raw_dir([(b"b", node(b"1")), (b"a", node(b"2"))]),
    "symlink-then-dir": raw_dir([(b"a", node(Link("CANARY"))), (b"a", node({"f": b"x"}))]),
    "symlink-then-file": raw_dir([(b"a", node(Link("CANARY/f"))), (b"a", node(b"x"))]),
    "dir-then-dir": raw_dir([(b"a", node({"f": b"1"})), (b"a", node({"g": b"2"}))]),
    "huge-length": s("(") + s("type") + s("regular") + s("contents")
    + (2**62).to_bytes(8, "little") + b"a few bytes",
    "huge-name": raw_dir([(b"n" * 256, node(b"x"))]),
    "huge-target": s("(") + s("type") + s("symlink") + s("target") + s("t" * 4096) + s(")"),
    "huge-token": s("(") + s("type") + (2**40).to_bytes(8, "little"),
    "empty-target": s("(") + s("type") + s("symlink") + s("target") + s("") + s(")"),
    "nul-target": s("(") + s("type") + s("symlink") + s("target") + s("a\0b") + s(")"),
    "bad-type": s("(") + s("type") + s("fifo") + s(")"),
    "bad-executable": s("(") + s("type") + s("regular") + s("executable") + s("yes")
    + s("contents") + s("x") + s(")"),
    "nonzero-padding": s("(") + s("type") + s("regular") + s("contents")
    + (1).to_bytes(8, "little") + b"x\1\0\0\0\0\0\0" + s(")"),
    "trailing": node(b"x") + b"\0" * 8,
    "too-deep": _deep(300),
    "missing-close": s("(") + s("type") + s("regular") + s("contents") + s("x"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archive_refused_and_contained(area, kind):
    fd, parent, canary = area
    data = s("nix-archive-1") + HOSTILE[kind].replace(b"CANARY", str(canary).encode())
    with pytest.raises(narmod.NarError):
        restore(fd, data)
    assert os.listdir(canary) == []
    assert not os.path.lexists("/tmp/owned")
    assert set(os.listdir(parent)) <= {"out"}
    remove_entry(fd, "out")
    assert os.listdir(parent) == []


def test_bad_magic(area):
    fd, parent, _ = area
    with pytest.raises(narmod.NarError):
        restore(fd, s("nix-archive-2") + node(b"x"))
    assert os.listdir(parent) == []


SMALL = {"a": b"alpha\n", "b": {"c": Exe(b"#!"), "d": Link("../a")}, "e": b""}


def test_truncated_at_every_token(area):
    fd, parent, canary = area
    data = nar(SMALL)
    for cut in range(0, len(data), 8):
        with pytest.raises(narmod.NarError):
            restore(fd, data[:cut])
        remove_entry(fd, "out")
        assert os.listdir(parent) == [] and os.listdir(canary) == []


def test_huge_declared_length_is_never_allocated():
    parser = narmod.NarParser()
    head = s("nix-archive-1") + s("(") + s("type") + s("regular") + s("contents")
    tracemalloc.start()
    try:
        parser.feed(head + (2**62).to_bytes(8, "little") + b"x" * 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert parser.wanted() <= 2**62  # bounded by the declaration, read lazily
    with pytest.raises(narmod.NarError):
        parser.feed(b"")


# --- the restorer on its own: events that would write through a symlink ------------

def test_restorer_never_writes_through_a_symlink(area):
    """Even with events no parser would produce, nothing lands in the canary."""
    fd, parent, canary = area
    ev = narmod
    cases = [
        [ev.Directory(()), ev.Symlink(("a",), str(canary)), ev.Directory(("a",))],
        [ev.Directory(()), ev.Symlink(("a",), str(canary / "f")), ev.Regular(("a",), False, 1)],
        [ev.Directory(()), ev.Symlink(("a",), str(canary)), ev.Regular(("a", "f"), False, 1)],
        [ev.Directory(()), ev.Directory(("a",)), ev.Regular(("b", "f"), False, 1)],
    ]
    for events in cases:
        r = Restorer(fd, "out")
        with pytest.raises((OSError, narmod.NarError)):
            for e in events:
                r.apply(e)
                if isinstance(e, ev.Regular):
                    r.apply(ev.Contents(e.path, b"x"))
        r.close()
        remove_entry(fd, "out")
        assert os.listdir(canary) == []
        assert os.listdir(parent) == []


def test_restorer_does_not_overwrite_an_existing_entry(area):
    fd, parent, _ = area
    (parent / "out").write_bytes(b"existing")
    with pytest.raises(FileExistsError):
        restore(fd, nar(b"new"))
    assert (parent / "out").read_bytes() == b"existing"


def test_remove_entry_does_not_follow_symlinks(area):
    fd, parent, canary = area
    (canary / "keep").write_bytes(b"keep")
    os.symlink(canary, parent / "link")
    remove_entry(fd, "link")
    assert (canary / "keep").read_bytes() == b"keep"
    restore(fd, nar({"l": Link(str(canary)), "d": {"x": b"x"}}))
    remove_entry(fd, "out")
    assert os.listdir(parent) == [] and (canary / "keep").exists()


# --- Incoming: hashing while writing, abort ------------------------------------------

def feed_all(inc: Incoming, data: bytes, piece: int = 1000) -> None:
    for i in range(0, len(data), piece):
        inc.feed(data[i:i + piece])


def test_incoming_nar_hashes_while_writing(area):
    fd, parent, _ = area
    data = nar(TREE)
    inc = Incoming(fd, "x-nixwarden-tmp", nar_input=True, ca=None)
    feed_all(inc, data)
    got = inc.finish()
    assert got.nar_hash.digest == hashlib.sha256(data).digest()
    assert got.nar_size == len(data)
    assert read_tree(os.path.join(parent, "x-nixwarden-tmp")) == TREE


@pytest.mark.parametrize("algo", ["sha1", "sha256", "sha512", "md5"])
def test_incoming_flat_content_address(area, algo):
    fd, parent, _ = area
    content = b"flat content\n" * 1000
    inc = Incoming(fd, "f", nar_input=False, ca=ContentAddressMethod("flat", HashAlgo(algo)))
    feed_all(inc, content)
    got = inc.finish()
    assert got.ca_hash.digest == hashlib.new(algo, content).digest()
    assert got.nar_hash.digest == hashlib.sha256(nar(content)).digest()
    assert got.nar_size == len(nar(content))
    st = os.lstat(parent / "f")
    assert stat.S_IMODE(st.st_mode) == 0o444 and st.st_mtime == 1


def test_incoming_flat_from_nar_needs_a_regular_file(area):
    fd, parent, _ = area
    inc = Incoming(fd, "f", nar_input=True, ca=ContentAddressMethod("flat", HashAlgo("sha256")))
    feed_all(inc, nar({"a": b"x"}))
    with pytest.raises(StoreRefusal):
        inc.finish()
    inc.abort()
    assert os.listdir(parent) == []


def test_incoming_recursive_ca_is_the_nar_hash(area):
    fd, _, _ = area
    data = nar(TREE)
    inc = Incoming(fd, "r", nar_input=True, ca=ContentAddressMethod("nar", HashAlgo("sha512")))
    feed_all(inc, data)
    got = inc.finish()
    assert got.ca_hash.digest == hashlib.sha512(data).digest()


def test_incoming_abort_mid_stream_removes_everything(area):
    fd, parent, _ = area
    data = nar(TREE)
    inc = Incoming(fd, "t-nixwarden-tmp", nar_input=True, ca=None)
    feed_all(inc, data[:len(data) // 2])
    assert os.listdir(parent) == ["t-nixwarden-tmp"]
    inc.abort()
    assert os.listdir(parent) == []


def test_incoming_abort_after_finish_removes_read_only_tree(area):
    fd, parent, _ = area
    inc = Incoming(fd, "t", nar_input=True, ca=None)
    feed_all(inc, nar(TREE))
    inc.finish()
    inc.abort()
    assert os.listdir(parent) == []


def test_remove_entry_counts_freed_bytes_as_nix_and_follows_nothing(area):
    fd, parent, canary = area
    (canary / "kept").write_bytes(b"k" * 1000)
    out = parent / "out"
    (out / "d" / "e").mkdir(parents=True)
    (out / "one").write_bytes(b"1" * 100)  # a single link: counted
    (out / "d" / "two").write_bytes(b"2" * 200)
    os.link(out / "d" / "two", canary / "two-link")  # two links (as with .links): counted
    (out / "d" / "e" / "three").write_bytes(b"3" * 300)
    for name in ("x", "y"):
        os.link(out / "d" / "e" / "three", canary / name)  # three links: not counted
    os.symlink(canary, out / "d" / "to-canary")  # its own size, never followed
    os.chmod(out / "d" / "e", 0o555)
    expected = 100 + 200 + len(str(canary))
    assert remove_entry(fd, "out") == expected
    assert os.listdir(parent) == []
    assert sorted(os.listdir(canary)) == ["kept", "two-link", "x", "y"]
    assert remove_entry(fd, "out") == 0  # already gone


def test_remove_entry_of_a_tree_deeper_than_the_recursion_limit(area):
    fd, parent, _ = area
    os.mkdir("deep", dir_fd=fd)
    level = os.open("deep", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    for _ in range(sys.getrecursionlimit() + 100):
        os.mkdir("d", dir_fd=level)
        below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=level)
        os.close(level)
        level = below
    with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=level), "wb") as f:
        f.write(b"leaf")
    os.close(level)
    assert remove_entry(fd, "deep") == 4
    assert os.listdir(parent) == []


def test_remove_path_removes_the_last_component_only(tmp_path):
    (tmp_path / "kept").mkdir()
    os.symlink(tmp_path / "kept", tmp_path / "link")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f").write_bytes(b"abc")
    os.chmod(tmp_path / "tree" / "sub", 0o555)
    assert remove_path(str(tmp_path / "tree")) == 3
    assert remove_path(str(tmp_path / "link")) == len(str(tmp_path / "kept"))  # not followed
    assert remove_path(str(tmp_path / "missing")) == 0
    assert sorted(os.listdir(tmp_path)) == ["kept"]


def test_two_links_removed_at_once_count_the_file_once(area):
    """Two trees hard-linking the same files (plus a ``.links``-like third
    link), removed on two threads at once as the GC's trash threads do:
    each file is counted as freed exactly once, by whichever removal
    leaves it with only the third link."""
    import threading
    fd, parent, _ = area
    base = str(parent)
    os.mkdir(f"{base}/links")
    for tree in ("a", "b"):
        os.mkdir(f"{base}/{tree}")
    sizes = 0
    for i in range(2000):
        with open(f"{base}/links/{i}", "wb") as f:
            f.write(b"x" * (i % 7 + 1))
        sizes += i % 7 + 1
        for tree in ("a", "b"):
            os.link(f"{base}/links/{i}", f"{base}/{tree}/{i}")
    freed: dict[str, int] = {}
    threads = [threading.Thread(target=lambda t=t: freed.__setitem__(t, remove_entry(fd, t)))
               for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert freed["a"] + freed["b"] == sizes
    assert all(os.stat(f"{base}/links/{i}").st_nlink == 1 for i in range(2000))
