"""Unit tests of binary-cache metadata and the pieces under substitution.

``narinfo.py`` against the verified vectors of spec/store-formats.md §13-15
(parse, fields, render round trip, signatures over the parsed fields) and
every malformed-field rule; ``nix-cache-info``; ``transfer.decompress``
(each method, concatenated streams, truncation, corruption, bounded
output); the narinfo disk cache's TTLs and ``refresh``.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import sqlite3

import pytest
import zstandard

from nixwarden.shared.storepath import StoreDir
from nixwarden.supervisor.store import signatures, transfer
from nixwarden.supervisor.store.narinfo import (NarInfoError, parse_cache_info, parse_narinfo,
                                                render)
from nixwarden.supervisor.store.narinfo_cache import NarInfoDiskCache

SD = StoreDir("/nix/store")
HELLO = """StorePath: /nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt
URL: nar/17gd6zzlkx90irc6qawagdkgh1d7qvlnq46yjf7xiqw9ycz7zq4a.nar.xz
Compression: xz
FileHash: sha256:17gd6zzlkx90irc6qawagdkgh1d7qvlnq46yjf7xiqw9ycz7zq4a
FileSize: 128
NarHash: sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw
NarSize: 120
References: 
Sig: test-key-1:M+d4OBdzyEzG9jjTOyh+Ds8jFN6J7oCWDUJ+E+DxujgGy1xRYAmw8diU52zSsykJrQBpI1E23W+hJ6hCeJa7Dg==
CA: fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw
"""
REFS = """StorePath: /nix/store/4gqv4131mx80b5gcxwpphyihvn59h902-refs
URL: nar/18nx4m0a8lfmg14bm2wpmpmh5917q8fyi95zbcy4vqbyjrkxyzgv.nar.bz2
Compression: bzip2
FileHash: sha256:18nx4m0a8lfmg14bm2wpmpmh5917q8fyi95zbcy4vqbyjrkxyzgv
FileSize: 173
NarHash: sha256:18jr0nbrjg1xi0bvfyvzrklsxhd6fjrykmypsqicx54dgbrc3pnv
NarSize: 216
References: 4gqv4131mx80b5gcxwpphyihvn59h902-refs 94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple
Deriver: 542kk53fdk66wcj4gn5v6hd6kv4pa2fl-refs.drv
Sig: test-key-1:SdfhKO6Lder4yBYQiygeHBlbKUEx4OqHGWCooRbeVh7BtE4R7z6dh6d6pDnX1aNzrcrLj8rc6giGQJCqp1D4AA==
"""
DRV = """StorePath: /nix/store/ziac89l9ai0wnkf7pi5z87dbfpjgmpcd-dep.drv
URL: nar/17pi2q927byl071s7fhy2vh7yikklzz6r7p2xan4fry86wk9krc8.nar.xz
Compression: xz
FileHash: sha256:17pi2q927byl071s7fhy2vh7yikklzz6r7p2xan4fry86wk9krc8
FileSize: 524
NarHash: sha256:0ih467jnwh54dr2jjxb75a71myx1h8yzns921fyy6y3xdva64vdd
NarSize: 824
References: 3ghsl9sd83mc26i81adpa2fzf3yw4f68-simple.drv lwric6hprlwl7yndn78sy90574d84lsm-fod.drv
CA: text:sha256:1mrvvkm8yid57vg6zp3qlwva2pd7s307182bspcbfvgfkcby8y8x
"""
PUBLIC = "test-key-1:yp7XMahDEA63xcXuK3HIo6D+cD4RTuB8K+QnC2KACGo="


@pytest.mark.parametrize("text", [HELLO, REFS, DRV])
def test_vectors_round_trip(text):
    assert render(parse_narinfo(text, SD)) == text


def test_vector_fields_and_signatures():
    keys = signatures.load_public_keys([PUBLIC], [])
    for text in (HELLO, REFS):
        i = parse_narinfo(text, SD)
        assert signatures.check_path_sigs(i.path, i.nar_hash, i.nar_size, i.references,
                                          i.sigs, keys) == 1
    i = parse_narinfo(REFS, SD)
    assert i.references == ("/nix/store/4gqv4131mx80b5gcxwpphyihvn59h902-refs",
                            "/nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple")
    assert i.deriver == "/nix/store/542kk53fdk66wcj4gn5v6hd6kv4pa2fl-refs.drv"
    assert (i.file_size, i.nar_size, i.compression, i.ca) == (173, 216, "bzip2", None)
    assert i.hash_part == "4gqv4131mx80b5gcxwpphyihvn59h902"
    h = parse_narinfo(HELLO, SD)
    assert h.references == () and h.deriver is None
    assert h.ca.render() == "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
    assert parse_narinfo(DRV, SD).ca.method == "text"


def _drop(text, key):
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith(key + ":"))


def _set(text, key, value):
    return "".join((f"{key}: {value}" if line.startswith(key + ":") else line) + "\n"
                   for line in text.splitlines())


def test_defaults_and_leniencies():
    i = parse_narinfo(_drop(_drop(_drop(HELLO, "Compression"), "FileHash"), "FileSize"), SD)
    assert (i.compression, i.file_hash, i.file_size) == ("bzip2", None, 0)
    assert parse_narinfo(_set(REFS, "Deriver", "unknown-deriver"), SD).deriver is None
    assert parse_narinfo(HELLO + "Future: thing\n", SD).path.endswith("hello.txt")
    assert parse_narinfo(_set(HELLO, "CA", ""), SD).ca is None
    assert parse_narinfo(_set(HELLO, "References", " "), SD).references == ()
    sri = "sha256-" + parse_narinfo(HELLO, SD).nar_hash.to_base64()
    assert parse_narinfo(_set(HELLO, "NarHash", sri), SD).nar_hash == \
        parse_narinfo(HELLO, SD).nar_hash
    assert parse_narinfo(_set(HELLO, "URL", "https://mirror.example/nar/x.nar.xz"), SD).url \
        == "https://mirror.example/nar/x.nar.xz"
    two = HELLO + "Sig: a:b\nSig: a:b\n"
    assert len(parse_narinfo(two, SD).sigs) == 2


@pytest.mark.parametrize("mutate,reason", [
    (lambda t: _drop(t, "StorePath"), "field 'StorePath' is missing"),
    (lambda t: _drop(t, "NarHash"), "field 'NarHash' is missing"),
    (lambda t: _drop(t, "NarSize"), "field 'NarSize' is missing"),
    (lambda t: _drop(t, "URL"), "field 'URL' is missing"),
    (lambda t: _set(t, "URL", ""), "bad URL"),
    (lambda t: _set(t, "NarSize", "0"), "bad NarSize"),
    (lambda t: _set(t, "NarSize", "-1"), "bad NarSize"),
    (lambda t: _set(t, "NarSize", " 120"), "bad NarSize"),
    (lambda t: _set(t, "NarSize", str(2**64)), "bad NarSize"),
    (lambda t: _set(t, "FileSize", "12a"), "bad FileSize"),
    (lambda t: _set(t, "NarHash", "sha256:zzz"), "bad NarHash"),
    (lambda t: _set(t, "NarHash", "md5:" + "0" * 32), "bad NarHash"),
    (lambda t: _set(t, "NarHash", "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"),
     "bad NarHash"),
    (lambda t: _set(t, "FileHash", "sha256:"), "bad FileHash"),
    (lambda t: _set(t, "StorePath", "/other/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"),
     "bad StorePath"),
    (lambda t: _set(t, "StorePath", "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-a/b"),
     "bad StorePath"),
    (lambda t: _set(t, "References", "not-a-store-path"), "bad References"),
    (lambda t: _set(t, "References", "../../etc/passwd"), "bad References"),
    (lambda t: t + "Deriver: eeee-x.drv\n", "bad Deriver"),
    (lambda t: _set(t, "CA", "fixed:r:sha999:abc"), "bad CA"),
    (lambda t: _set(t, "Compression", "xz; rm -rf"), "bad Compression"),
    (lambda t: _set(t, "URL", "../../etc/shadow"), "bad URL"),
    (lambda t: _set(t, "URL", "nar/../../x"), "bad URL"),
    (lambda t: _set(t, "URL", "/etc/shadow"), "bad URL"),
    (lambda t: _set(t, "URL", "file:///etc/shadow"), "bad URL"),
    (lambda t: _set(t, "URL", "ftp://host/x"), "bad URL"),
    (lambda t: _set(t, "URL", "nar/a b"), "bad URL"),
    (lambda t: t + "NarSize: 120\n", "field 'NarSize' appears twice"),
    (lambda t: t + "StorePath: /nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt\n",
     "field 'StorePath' appears twice"),
    (lambda t: t + "CA: \n", "field 'CA' appears twice"),
    (lambda t: t + "Sig: \n", "bad Sig"),
    (lambda t: t.rstrip("\n"), "last line is not terminated"),
    (lambda t: t + "garbage\n", "line without a colon"),
    (lambda t: t.replace("NarSize: ", "NarSize:"), "no space after the colon of 'NarSize'"),
])
def test_malformed(mutate, reason):
    with pytest.raises(NarInfoError) as e:
        parse_narinfo(mutate(HELLO), SD, whence="http://c/i9pmrzmpshapij2kin22pff6fc2adavx.narinfo")
    msg = str(e.value)
    assert msg.startswith(
        "NAR info file 'http://c/i9pmrzmpshapij2kin22pff6fc2adavx.narinfo' is corrupt (")
    assert reason in msg


def test_cache_info():
    i = parse_cache_info("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
    assert (i.store_dir, i.want_mass_query, i.priority) == ("/nix/store", True, 40)
    i = parse_cache_info("StoreDir:   /x  \njunk line\nOther: 3\nWantMassQuery: 0")
    assert (i.store_dir, i.want_mass_query, i.priority) == ("/x", False, None)
    assert parse_cache_info("").store_dir is None
    assert parse_cache_info("Priority: 10abc\n").priority == 10  # std::stoi
    with pytest.raises(NarInfoError, match="invalid Priority"):
        parse_cache_info("Priority: high\n")


# --- decompression ----------------------------------------------------------------------------

NAR = bytes(range(256)) * 5000


def _pieces(data, n=1000):
    return iter([data[i:i + n] for i in range(0, len(data), n)])


@pytest.mark.parametrize("method,compress", [
    ("xz", lzma.compress), ("bzip2", bz2.compress), ("gzip", gzip.compress),
    ("zstd", zstandard.ZstdCompressor().compress), ("none", lambda d: d)])
def test_decompress_each_method(method, compress):
    data = compress(NAR)
    assert transfer.sniff(data) == method
    out = list(transfer.decompress(_pieces(data), "xz"))  # the hint does not decide
    assert b"".join(out) == NAR
    assert max(len(c) for c in out) <= transfer.CHUNK
    assert b"".join(transfer.decompress(iter([data]))) == NAR


@pytest.mark.parametrize("compress", [lzma.compress, bz2.compress, gzip.compress])
def test_concatenated_streams(compress):
    data = compress(NAR[:1000]) + compress(NAR[1000:])
    assert b"".join(transfer.decompress(_pieces(data, 7))) == NAR


@pytest.mark.parametrize("compress", [lzma.compress, bz2.compress, gzip.compress])
def test_truncated_and_corrupt(compress):
    data = compress(NAR)
    with pytest.raises(transfer.DecompressionError, match="truncated"):
        b"".join(transfer.decompress(_pieces(data[:len(data) // 2])))
    bad = data[:20] + bytes(b ^ 0xFF for b in data[20:60]) + data[60:]
    with pytest.raises(transfer.DecompressionError):
        b"".join(transfer.decompress(_pieces(bad)))


def test_bomb_gives_bounded_chunks():
    data = lzma.compress(b"\0" * (64 * 1024 * 1024))
    stream = transfer.decompress(iter([data]))
    for _ in range(10):
        assert len(next(stream)) <= transfer.CHUNK
    z = zstandard.ZstdCompressor().compress(b"\0" * (64 * 1024 * 1024))
    stream = transfer.decompress(iter([z]))
    assert len(next(stream)) <= transfer.CHUNK


def test_unsupported_methods():
    with pytest.raises(transfer.DecompressionError, match="'lz4'"):
        list(transfer.decompress(iter([b"\x04\x22\x4d\x18rest"])))
    with pytest.raises(transfer.DecompressionError, match="'br'"):
        list(transfer.decompress(iter([b"\x0b\x02\x80"]), "br"))


# --- the disk cache -----------------------------------------------------------------------------


def test_disk_cache_ttls_and_refresh(tmp_path):
    now = [1000.0]
    db = str(tmp_path / "cache.sqlite")
    cache = NarInfoDiskCache(db, positive_ttl=100, negative_ttl=10, clock=lambda: now[0])
    uri, h = "http://c", "i9pmrzmpshapij2kin22pff6fc2adavx"
    assert cache.lookup(uri, h) == ("unknown", None)
    cache.record(uri, h, None)
    assert cache.lookup(uri, h) == ("absent", None)
    assert cache.lookup("http://other", h) == ("unknown", None)
    now[0] += 10
    assert cache.lookup(uri, h) == ("unknown", None)
    cache.record(uri, h, HELLO)
    now[0] += 99
    assert cache.lookup(uri, h) == ("present", HELLO)
    other_session = NarInfoDiskCache(db, positive_ttl=100, negative_ttl=10,
                                     clock=lambda: now[0])
    assert other_session.lookup(uri, h) == ("unknown", None)  # not written yet
    cache.flush()
    assert other_session.lookup(uri, h) == ("present", HELLO)  # one file for all sessions
    refreshing = NarInfoDiskCache(db, positive_ttl=100, negative_ttl=10,
                                  refresh=True, clock=lambda: now[0])
    assert refreshing.lookup(uri, h) == ("unknown", None)
    now[0] += 1
    assert cache.lookup(uri, h) == ("unknown", None)
    cache.record_cache_info(uri, "StoreDir: /nix/store\n")
    assert cache.lookup_cache_info(uri) == "StoreDir: /nix/store\n"
    now[0] += 7 * 24 * 3600
    assert cache.lookup_cache_info(uri) is None
    with pytest.raises(ValueError):
        cache.lookup(uri, "../../x")
    for c in (cache, other_session, refreshing):
        c.close()


def test_disk_cache_purges_expired_entries_daily(tmp_path):
    now = [1000.0]
    db = str(tmp_path / "cache.sqlite")
    first = NarInfoDiskCache(db, positive_ttl=100, negative_ttl=10, clock=lambda: now[0])
    first.record("http://c", "a" * 32, HELLO)
    first.record("http://c", "b" * 32, None)
    first.close()

    def rows():
        with sqlite3.connect(db) as conn:
            return sorted(r[0] for r in conn.execute("select hashPart from NarInfos"))

    now[0] += 50  # the negative entry expired, but the last purge is recent
    NarInfoDiskCache(db, positive_ttl=100, negative_ttl=10,
                     clock=lambda: now[0]).lookup("http://c", "a" * 32)
    assert rows() == ["a" * 32, "b" * 32]
    now[0] += 24 * 3600
    later = NarInfoDiskCache(db, positive_ttl=10**6, negative_ttl=10, clock=lambda: now[0])
    assert later.lookup("http://c", "a" * 32) == ("present", HELLO)
    assert rows() == ["a" * 32]
    later.close()


def test_disk_cache_damaged_entry_or_file(tmp_path):
    db = tmp_path / "cache.sqlite"
    cache = NarInfoDiskCache(str(db), positive_ttl=100, negative_ttl=10)
    uri, h = "http://c", "i9pmrzmpshapij2kin22pff6fc2adavx"
    cache.record(uri, h, HELLO)
    cache.flush()
    with sqlite3.connect(db) as conn:
        conn.execute("update NarInfos set time = 'x'")
    assert cache.lookup(uri, h) == ("unknown", None)
    with sqlite3.connect(db) as conn:
        conn.execute("update NarInfos set time = 1e12, present = 1, narinfo = null")
    assert cache.lookup(uri, h) == ("unknown", None)
    cache.close()
    for name in ("cache.sqlite-wal", "cache.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    db.write_bytes(b"not a database" * 100)
    broken = NarInfoDiskCache(str(db), positive_ttl=100, negative_ttl=10)
    broken.record(uri, h, HELLO)
    broken.flush()  # cannot be written: no error
    assert broken.lookup(uri, h) == ("unknown", None)
    assert broken.lookup_cache_info(uri) is None