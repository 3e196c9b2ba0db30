"""NAR writer and reader: spec/store-formats.md §8 vectors, comparison with
the real ``nix-store --dump``, hostile archives, and the garbage invariant."""

import hashlib
import os
import random
import shutil
import stat
import subprocess
import tracemalloc

import pytest

from nixwarden.shared import limits
from nixwarden.shared.errors import ClientProtocolError
from nixwarden.shared.hashes import HashAlgo
from nixwarden.shared.nar import (
    Contents, ContentsEnd, Directory, End, NarDumpError, NarError, NarParser,
    Regular, Symlink, dump, dump_fd, nar_hash_of_path, nar_of_bytes, parse_nar)

NIX_STORE = "/usr/bin/nix-store"


# --- helpers: our own NAR builder for hostile inputs ---------------------------

def s(data: bytes) -> bytes:
    """Spec §8.1 str(): length, bytes, zero padding."""
    return len(data).to_bytes(8, "little") + data + bytes(-len(data) % 8)


def toks(*items: bytes) -> bytes:
    return b"".join(s(t) for t in items)


def reg(contents: bytes = b"", executable: bool = False) -> list[bytes]:
    marker = [b"executable", b""] if executable else []
    return [b"(", b"type", b"regular", *marker, b"contents", contents, b")"]


def entry(name: bytes, node: list[bytes]) -> list[bytes]:
    return [b"entry", b"(", b"name", name, b"node", *node, b")"]


def dir_node(*entries: list[bytes]) -> list[bytes]:
    return [b"(", b"type", b"directory", *[t for e in entries for t in e], b")"]


def nar(node: list[bytes]) -> bytes:
    return toks(b"nix-archive-1", *node)


def merged(events):
    """Join adjacent Contents events (chunking depends on how bytes arrive)."""
    out = []
    for ev in events:
        if isinstance(ev, Contents) and out and isinstance(out[-1], Contents):
            out[-1] = Contents(ev.path, bytes(out[-1].data) + bytes(ev.data))
        else:
            out.append(ev)
    return out


def feed_bytewise(data: bytes):
    p = NarParser()
    events = []
    for i in range(len(data)):
        events += p.feed(data[i:i + 1])
    events += p.feed(b"")
    return events


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dumped(path) -> bytes:
    return b"".join(dump(path))


# --- writer: spec §8.4 vectors --------------------------------------------------

HI_HEX = ("0d00000000000000 6e69782d61726368 6976652d31000000 0100000000000000 2800000000000000"
          " 0400000000000000 7479706500000000 0700000000000000 726567756c617200"
          " 0800000000000000 636f6e74656e7473 0200000000000000 6869000000000000"
          " 0100000000000000 2900000000000000")


def test_regular_file_vector():
    data = nar_of_bytes(b"hi")
    assert data == bytes.fromhex(HI_HEX.replace(" ", ""))
    assert sha(data) == "2252d4b78c94e8c7ace4e3317b78bdfe64bc8e3970a64eb6d2f7c2a443c0c3fc"


def test_executable_vector():
    data = nar_of_bytes(b"hi", executable=True)
    assert len(data) == 152
    assert sha(data) == "b881d2326aa0a4f89797e8619d8a9d6c6dfa630ee6a274a58edaf355f2c4d9b0"


def test_hello_and_empty_vectors():
    assert sha(nar_of_bytes(b"hello\n")) == (
        "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13")
    assert len(nar_of_bytes(b"")) == 112


def test_dump_symlink_vector(tmp_path):
    os.symlink("/target", tmp_path / "l")
    data = dumped(tmp_path / "l")
    assert len(data) == 120
    assert sha(data) == "f0354c661ecd8be3792780312361f09aef4869a89c8465deeb5fcc3b87818bbb"


def test_dump_directory_vector(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "f").write_bytes(b"hi")
    os.symlink("f", root / "l")
    (root / "sub").mkdir()
    data = dumped(root)
    assert len(data) == 648
    assert sha(data) == "d9556cc74f5d3c8657b83a4173b18654502bab1a082778679421a93085e867d3"


def make_tree(root):
    """The spec's `tree` (§8.4), 1080 bytes."""
    root.mkdir()
    (root / "a.txt").write_bytes(b"hello\n")
    os.chmod(root / "a.txt", 0o644)
    os.symlink("a.txt", root / "link")
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "sub").mkdir()
    (root / "sub" / "b").write_bytes(b"x")


def test_dump_tree_vector(tmp_path):
    make_tree(tmp_path / "tree")
    h, size = nar_hash_of_path(tmp_path / "tree")
    assert size == 1080
    assert h.algo is HashAlgo.SHA256
    assert h.to_base16() == "07b36b1edec4b34f31feece357fc932f5a4592e0559720364d2e586306abe3c2"
    assert h.to_nix32() == "1hp3mc366n1f9lv215smw294anigjgy5gqzczqqlzcy4vqg6pcq7"


def test_dump_sorts_bytewise(tmp_path):
    root = tmp_path / "sorting"
    root.mkdir()
    for name in ["B", "Z10", "Z9", "a", "a-b", "a.b", "a_b", "ab", "\u00e9"]:
        (root / name).write_bytes(name.encode())
    data = dumped(root)
    assert len(data) == 1824
    assert sha(data) == "c29a504e187a3ce45970190def940afe2b54a7989c0337d07d418e38fd8831f4"


def test_dump_streams_in_chunks(tmp_path):
    f = tmp_path / "big"
    f.write_bytes(bytes(range(256)) * 40)
    pieces = list(dump(f, chunk_size=1000))
    assert max(len(p) for p in pieces) <= 1000 + 64
    assert b"".join(pieces) == nar_of_bytes(bytes(range(256)) * 40)


def test_dump_fd(tmp_path):
    make_tree(tmp_path / "tree")
    fd = os.open(tmp_path / "tree", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert b"".join(dump_fd(fd)) == dumped(tmp_path / "tree")
    finally:
        os.close(fd)
    fd = os.open(tmp_path / "tree" / "run.sh", os.O_RDONLY)
    try:
        assert b"".join(dump_fd(fd)) == nar_of_bytes(b"#!/bin/sh\necho hi\n", executable=True)
    finally:
        os.close(fd)


def test_executable_means_owner_x_bit(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o655)
    assert dumped(f) == nar_of_bytes(b"x")
    os.chmod(f, 0o744)
    assert dumped(f) == nar_of_bytes(b"x", executable=True)


def test_dump_rejects_fifo(tmp_path):
    os.mkfifo(tmp_path / "p")
    with pytest.raises(NarDumpError, match="unsupported type"):
        dumped(tmp_path / "p")


def test_dump_fd_rejects_pipe():
    r, w = os.pipe()
    try:
        with pytest.raises(NarDumpError, match="unsupported type"):
            b"".join(dump_fd(r))
    finally:
        os.close(r)
        os.close(w)


def test_dump_detects_shrinking_file(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    gen = dump(f, chunk_size=10)
    next(gen)  # magic
    next(gen)  # header with the size taken from fstat
    os.truncate(f, 5)
    with pytest.raises(NarDumpError, match="shrank"):
        list(gen)


def test_dump_detects_type_change(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    file_stat = os.stat(__file__)
    monkeypatch.setattr(os, "lstat", lambda name, dir_fd=None: file_stat)
    with pytest.raises(NarDumpError, match="changed type"):
        dumped(tmp_path / "d")


def test_dump_never_follows_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "secret").write_bytes(b"s")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path / "real", root / "escape")
    events = parse_nar(dumped(root))
    assert Symlink(("escape",), str(tmp_path / "real")) in events
    assert not any(isinstance(e, Regular) for e in events)


def test_dump_depth_limit(tmp_path):
    d = tmp_path / "deep"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(limits.MAX_NAR_DEPTH + 1):
            os.mkdir("d", dir_fd=fd)
            new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = new
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    with pytest.raises(NarDumpError, match="deeper"):
        dumped(d)


def build_real_tree(root):
    root.mkdir()
    (root / "file").write_bytes(b"plain file\n")
    (root / "exe").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "exe", 0o755)
    (root / "empty").write_bytes(b"")
    os.symlink("../somewhere/else", root / "rel-link")
    os.symlink("/abs/target", root / "abs-link")
    (root / "emptydir").mkdir()
    nested = root / "a" / "b" / "c"
    nested.mkdir(parents=True)
    (nested / "deep.txt").write_bytes(b"deep" * 1000)
    (root / "a" / "Z").write_bytes(bytes(range(256)))
    (root / "a" / "b" / "x.sh").write_bytes(b"")
    os.chmod(root / "a" / "b" / "x.sh", 0o700)


@pytest.mark.skipif(not os.path.exists(NIX_STORE), reason="nix-store not installed")
@pytest.mark.parametrize("target", ["tree", "tree/file", "tree/exe", "tree/rel-link", "tree/emptydir"])
def test_dump_matches_real_nix(tmp_path, target):
    build_real_tree(tmp_path / "tree")
    path = tmp_path / target
    real = subprocess.run([NIX_STORE, "--dump", str(path)], check=True,
                          capture_output=True).stdout
    assert dumped(path) == real
    assert merged(parse_nar(real)) == merged(parse_nar(dumped(path)))


# --- reader: valid archives -----------------------------------------------------

def test_parse_file_events():
    assert parse_nar(nar_of_bytes(b"hi", executable=True)) == [
        Regular((), True, 2), Contents((), b"hi"), ContentsEnd(()), End()]
    assert parse_nar(nar_of_bytes(b"")) == [Regular((), False, 0), ContentsEnd(()), End()]


def test_parse_tree_events(tmp_path):
    make_tree(tmp_path / "tree")
    assert merged(parse_nar(dumped(tmp_path / "tree"))) == [
        Directory(()),
        Regular(("a.txt",), False, 6), Contents(("a.txt",), b"hello\n"), ContentsEnd(("a.txt",)),
        Symlink(("link",), "a.txt"),
        Regular(("run.sh",), True, 18), Contents(("run.sh",), b"#!/bin/sh\necho hi\n"),
        ContentsEnd(("run.sh",)),
        Directory(("sub",)),
        Regular(("sub", "b"), False, 1), Contents(("sub", "b"), b"x"), ContentsEnd(("sub", "b")),
        End(),
    ]


def test_non_utf8_names_round_trip():
    data = nar(dir_node(entry(b"\xff\xfe", [b"(", b"type", b"symlink", b"target", b"\x80", b")"])))
    events = parse_nar(data)
    assert os.fsencode(events[1].path[0]) == b"\xff\xfe"
    assert os.fsencode(events[1].target) == b"\x80"


VALID = [
    nar_of_bytes(b""),
    nar_of_bytes(b"hello world, 8+ bytes of content", executable=True),
    nar([b"(", b"type", b"symlink", b"target", b"/x", b")"]),
    nar(dir_node()),
    nar(dir_node(entry(b"a", reg(b"1")), entry(b"b", dir_node(entry(b"c", reg(b"12345678")))),
                 entry(b"\xc3\xa9", [b"(", b"type", b"symlink", b"target", b"a", b")"]))),
]


@pytest.mark.parametrize("data", VALID)
def test_whole_and_bytewise_agree(data):
    whole = parse_nar(data)
    assert merged(feed_bytewise(data)) == merged(whole)
    assert isinstance(whole[-1], End)


@pytest.mark.parametrize("data", VALID)
def test_counters_and_done(data):
    p = NarParser()
    assert not p.done and p.wanted() == 8
    p.feed(data)
    assert p.done and p.wanted() == 0
    assert p.bytes_consumed == len(data)
    assert p.feed(b"") == []


@pytest.mark.parametrize("data", VALID)
def test_wanted_never_over_reads(data):
    """Pull a NAR from a stream with trailing bytes using only wanted()."""
    stream = data + b"TRAILING-BYTES"
    rng = random.Random(len(data))
    p, pos = NarParser(), 0
    while not p.done:
        n = p.wanted()
        assert n > 0
        take = min(n, rng.randint(1, 50))
        p.feed(stream[pos:pos + take])
        pos += take
    assert pos == len(data)
    assert stream[pos:] == b"TRAILING-BYTES"


def test_max_depth_accepted():
    node = reg(b"x")
    for _ in range(limits.MAX_NAR_DEPTH):
        node = dir_node(entry(b"d", node))
    events = parse_nar(nar(node))
    assert len(events[-4].path) == limits.MAX_NAR_DEPTH


def test_limits_exactly_accepted():
    name = b"n" * limits.MAX_NAR_NAME
    target = b"t" * limits.MAX_NAR_TARGET
    data = nar(dir_node(entry(name, [b"(", b"type", b"symlink", b"target", target, b")"])))
    assert parse_nar(data)[1] == Symlink((name.decode(),), target.decode())


def test_accepts_memoryview_and_bytearray():
    data = nar_of_bytes(b"abc")
    assert parse_nar(bytearray(data)) == parse_nar(memoryview(data)) == parse_nar(data)


# --- reader: hostile archives ----------------------------------------------------

def sym(target: bytes) -> list[bytes]:
    return [b"(", b"type", b"symlink", b"target", target, b")"]


def deep(levels: int) -> bytes:
    node = reg(b"x")
    for _ in range(levels):
        node = dir_node(entry(b"d", node))
    return nar(node)


HOSTILE = {
    "bad magic": (toks(b"nix-archive-2", *reg()), "bad magic"),
    "long magic": (toks(b"x" * 100), "too long"),
    "dotdot": (nar(dir_node(entry(b"..", reg()))), "invalid entry name"),
    "dot": (nar(dir_node(entry(b".", reg()))), "invalid entry name"),
    "empty name": (nar(dir_node(entry(b"", reg()))), "empty entry name"),
    "slash": (nar(dir_node(entry(b"a/b", reg()))), "contains '/' or NUL"),
    "nul": (nar(dir_node(entry(b"a\0b", reg()))), "contains '/' or NUL"),
    "long name": (nar(dir_node(entry(b"n" * (limits.MAX_NAR_NAME + 1), reg()))), "too long"),
    "duplicate": (nar(dir_node(entry(b"a", reg()), entry(b"a", reg()))), "duplicate"),
    "unsorted": (nar(dir_node(entry(b"b", reg()), entry(b"a", reg()))), "not sorted"),
    "unsorted bytes": (nar(dir_node(entry(b"\xc3\xa9", reg()), entry(b"z", reg()))), "not sorted"),
    "empty target": (nar(sym(b"")), "empty symlink target"),
    "nul target": (nar(sym(b"a\0")), "contains NUL"),
    "long target": (nar(sym(b"t" * (limits.MAX_NAR_TARGET + 1))), "too long"),
    "too deep": (deep(limits.MAX_NAR_DEPTH + 1), "deeper"),
    "long token": (toks(b"nix-archive-1", b"(", b"t" * (limits.MAX_NAR_TOKEN + 1)), "too long"),
    "unknown type": (nar([b"(", b"type", b"fifo", b")"]), "unknown NAR node type"),
    "unknown token": (nar([b"(", b"kind", b"regular"]), "expected 'type'"),
    "executable value": (nar([b"(", b"type", b"regular", b"executable", b"1", b"contents",
                              b"", b")"]), "empty value"),
    "executable after contents": (nar([b"(", b"type", b"regular", b"contents", b"x",
                                       b"executable", b"", b")"]), r"expected '\)'"),
    "double executable": (nar([b"(", b"type", b"regular", b"executable", b"", b"executable",
                               b"", b"contents", b"", b")"]), "expected 'contents'"),
    "name after node": (nar([b"(", b"type", b"directory", b"entry", b"(", b"node", *reg(),
                             b"name", b"a", b")", b")"]), "expected 'name'"),
    "entry garbage": (nar([b"(", b"type", b"directory", b"entree"]), "expected 'entry'"),
    "trailing garbage": (nar_of_bytes(b"x") + b"\0", "after the end"),
    "second archive": (nar_of_bytes(b"x") * 2, "after the end"),
    "truncated": (nar_of_bytes(b"hello")[:-3], "truncated"),
    "truncated in contents": (nar_of_bytes(b"hello")[:-20], "truncated"),
    "empty input": (b"", "truncated"),
}


def nonzero_padding_cases():
    good = nar_of_bytes(b"x")
    # The contents "x" sit at offset 96 (length 88..96), padding 97..104.
    contents_pad = good[:100] + b"\1" + good[101:]
    # Padding after "nix-archive-1" (bytes 21..24).
    token_pad = good[:22] + b"\x80" + good[23:]
    name = nar(dir_node(entry(b"abc", reg())))
    name_pad = name.replace(s(b"abc"), (3).to_bytes(8, "little") + b"abc\0\0\0\0\1")
    return {"contents padding": contents_pad, "token padding": token_pad, "name padding": name_pad}


HOSTILE.update({k: (v, "padding is not zero") for k, v in nonzero_padding_cases().items()})


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_whole(case):
    data, msg = HOSTILE[case]
    p = NarParser()
    with pytest.raises(NarError, match=msg) as info:
        p.feed(data)
        p.feed(b"")
    assert isinstance(info.value, ClientProtocolError)
    with pytest.raises(NarError, match="unusable"):
        p.feed(b"")
    with pytest.raises(NarError, match="unusable"):
        p.wanted()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_bytewise(case):
    data, msg = HOSTILE[case]
    with pytest.raises(NarError, match=msg):
        feed_bytewise(data)


def test_unsorted_is_reported_at_the_name():
    data = nar(dir_node(entry(b"b", reg()), entry(b"a", reg())))
    cut = data.index(s(b"a"))
    p = NarParser()
    assert Regular(("b",), False, 0) in p.feed(data[:cut])
    with pytest.raises(NarError, match="not sorted"):
        p.feed(data[cut:cut + len(s(b"a"))])


def test_huge_declared_length_is_not_allocated():
    header = toks(b"nix-archive-1", b"(", b"type", b"regular", b"contents")
    size = 2**63 - 1
    data = header + size.to_bytes(8, "little") + b"abc"
    p = NarParser()
    tracemalloc.start()
    try:
        events = p.feed(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    assert events == [Regular((), False, size), Contents((), b"abc")]
    assert p.wanted() == size - 3 + 1
    with pytest.raises(NarError, match="truncated"):
        p.feed(b"")


def test_huge_declared_name_length_fails_at_once():
    data = toks(b"nix-archive-1", b"(", b"type", b"directory", b"entry", b"(", b"name")
    p = NarParser()
    with pytest.raises(NarError, match="too long"):
        p.feed(data + (2**64 - 1).to_bytes(8, "little"))


def test_feed_after_done_with_data_poisons():
    p = NarParser()
    p.feed(nar_of_bytes(b"x"))
    with pytest.raises(NarError, match="after the end"):
        p.feed(b"x")
    with pytest.raises(NarError, match="unusable"):
        p.feed(b"")


def test_trailing_bytes_count():
    p = NarParser()
    with pytest.raises(NarError):
        p.feed(nar_of_bytes(b"x") + b"junk")
    assert p.bytes_consumed == len(nar_of_bytes(b"x"))


# --- garbage invariant (STYLE.md 3.2) -------------------------------------------

def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            del b[i:i + rng.randint(1, 16)]
        elif op == 2:
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and b:
            b[min(i, len(b) - 1)] = rng.choice([0, 0xFF, 0x7F, 1])
        elif op == 4:
            j = rng.randrange(len(b) + 1)
            b[i:i] = b[j:j + 8 * rng.randint(1, 6)]
        else:
            b = b[:i]
    return bytes(b)


def run_garbage(data: bytes, rng: random.Random) -> None:
    p = NarParser()
    pos = 0
    try:
        while pos < len(data):
            n = rng.randint(1, 64)
            p.feed(data[pos:pos + n])
            pos += n
        p.feed(b"")
    except NarError:
        return


def test_garbage_invariant(tmp_path):
    make_tree(tmp_path / "tree")
    corpus = VALID + [dumped(tmp_path / "tree")] + [d for d, _ in HOSTILE.values()]
    rng = random.Random(20240601)
    for _ in range(3000):
        base = rng.choice(corpus)
        run_garbage(mutate(rng, base), rng)
    for _ in range(300):
        run_garbage(rng.randbytes(rng.randint(0, 300)), rng)
