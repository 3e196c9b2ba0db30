"""Reference scanning and hash rewriting (spec/store-formats.md §12):
where hash parts are found, chunk boundaries, streaming, and in-place
rewriting that never follows the builder's symlinks."""

from __future__ import annotations

import os
import random
import stat
import tracemalloc

import pytest

from nixwarden.shared import base32
from nixwarden.shared.nar import dump
from nixwarden.supervisor.build.refscan import RefScanner, rewrite_hashes, scan_references

STORE = "/nix/store"
HASHES = ["94f9f6i31zwzwbf0kclq1naqxxi4c7v9", "4gqv4131mx80b5gcxwpphyihvn59h902",
          "6aya2z3yjmxq6827027j12y7cwws9rnj", "1rz4g4znpzjwh1xymhjpm42vipw92pr7",
          "yxz3b8xbcbpff1g14v88rrm1p270skl3"]
PATHS = [f"{STORE}/{h}-p{i}" for i, h in enumerate(HASHES)]


def write(path: str, data: bytes, mode: int = 0o644) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def test_found_in_contents_symlink_targets_and_names(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write(out / "file", b"prefix " + PATHS[0].encode() + b"/bin/sh suffix")
    os.symlink(f"../{HASHES[1]}-x/lib", out / "link")
    (out / f"dir-{HASHES[2]}").mkdir()
    write(out / "bare", HASHES[3][:31].encode() + b"-not a full hash")
    found = scan_references(str(out), PATHS, STORE)
    assert found == set(PATHS[:3])


def test_self_reference_and_shared_hash_parts(tmp_path):
    f = tmp_path / "f"
    write(f, f"{HASHES[4]}\n".encode())
    twins = [f"{STORE}/{HASHES[4]}-a", f"{STORE}/{HASHES[4]}-b"]
    assert scan_references(str(f), twins + PATHS[:1], STORE) == set(twins)


def test_non_candidates_and_near_misses_ignored(tmp_path):
    f = tmp_path / "f"
    upper = HASHES[0].upper().encode()
    utf16 = HASHES[1].encode("utf-16-le")
    split = HASHES[2][:16].encode() + b"\n" + HASHES[2][16:].encode()
    write(f, b"x".join([upper, utf16, split, HASHES[3].encode()]))
    assert scan_references(str(f), PATHS[:3], STORE) == set()
    assert scan_references(str(f), PATHS, STORE) == {PATHS[3]}


def test_long_runs_of_nix32_characters(tmp_path):
    f = tmp_path / "f"
    write(f, b"a" * 10_000 + HASHES[0].encode() + b"z" * 10_000)
    assert scan_references(str(f), PATHS, STORE) == {PATHS[0]}


@pytest.mark.parametrize("chunk_size", [1, 5, 31, 32, 33, 64, 4096])
def test_hash_split_across_chunk_boundaries(tmp_path, chunk_size):
    for offset in range(0, 40, 3):
        f = tmp_path / f"f{offset}"
        write(f, b"\0" * offset + HASHES[1].encode() + b"\0" * 7)
        assert scan_references(str(f), PATHS, STORE, chunk_size=chunk_size) == {PATHS[1]}


def test_scanner_feeding_is_chunking_independent():
    rng = random.Random(1234)
    alphabet = base32.ALPHABET.encode() + b"\0/-etou"
    for _ in range(200):
        data = bytearray(rng.choice(alphabet) for _ in range(rng.randrange(300)))
        for h in rng.sample(HASHES, rng.randrange(3)):
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = h.encode()
        want = {h for h in HASHES if h.encode() in data}
        scanner = RefScanner(HASHES)
        pos = 0
        while pos < len(data):
            n = rng.randrange(1, 40)
            scanner.feed(bytes(data[pos:pos + n]))
            pos += n
        assert scanner.found == want


def test_large_file_is_streamed(tmp_path):
    f = tmp_path / "big"
    size = 64 * 1024 * 1024
    with open(f, "wb") as fh:
        fh.truncate(size)
        fh.seek(size // 2 - 10)
        fh.write(HASHES[0].encode())
        fh.seek(size - 32)
        fh.write(HASHES[1].encode())
    tracemalloc.start()
    try:
        found = scan_references(str(f), PATHS, STORE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found == set(PATHS[:2])
    assert peak < 4 * 1024 * 1024


def test_candidates_must_be_store_paths(tmp_path):
    f = tmp_path / "f"
    write(f, b"")
    with pytest.raises(ValueError):
        scan_references(str(f), ["/elsewhere/" + HASHES[0] + "-x"], STORE)


# --- rewriting -----------------------------------------------------------------------

OLD, NEW = HASHES[0], HASHES[3]


def nar(path) -> bytes:
    return b"".join(dump(path))


def test_rewrite_contents_targets_and_names(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    body = (f"{STORE}/{OLD}-x " * 3 + "tail").encode()
    write(out / "ro", body, 0o555)
    os.symlink(f"{STORE}/{OLD}-x/bin", out / "link")
    (out / f"sub-{OLD}").mkdir()
    write(out / f"sub-{OLD}" / "f", OLD.encode())
    before = nar(out)
    rewrite_hashes(str(out), {OLD: NEW})
    assert nar(out) == before.replace(OLD.encode(), NEW.encode())
    assert stat.S_IMODE(os.stat(out / "ro").st_mode) == 0o555


@pytest.mark.parametrize("chunk_size", [1, 7, 31, 32, 33, 100])
def test_rewrite_across_chunk_boundaries(tmp_path, chunk_size):
    data = b"".join(b"\0" * i + OLD.encode() for i in range(0, 70, 5)) + OLD.encode() * 3
    f = tmp_path / "f"
    write(f, data)
    rewrite_hashes(str(f), {OLD: NEW, HASHES[1]: HASHES[2]}, chunk_size=chunk_size)
    assert f.read_bytes() == data.replace(OLD.encode(), NEW.encode())


def test_rewrite_never_follows_symlinks(tmp_path):
    outside = tmp_path / "outside"
    write(outside, OLD.encode())
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(str(outside), out / "escape")
    os.symlink(str(tmp_path), out / "dirlink")
    rewrite_hashes(str(out), {OLD: NEW})
    assert outside.read_bytes() == OLD.encode()
    # a top-level symlink is rewritten as a link, its target untouched
    top = tmp_path / "toplink"
    os.symlink(f"{outside}-{OLD}", top)
    rewrite_hashes(str(top), {OLD: NEW})
    assert os.readlink(top) == f"{outside}-{NEW}"
    assert outside.read_bytes() == OLD.encode()


def test_rewrite_rejects_non_hash_parts(tmp_path):
    with pytest.raises(ValueError):
        rewrite_hashes(str(tmp_path), {"short": "other"})
