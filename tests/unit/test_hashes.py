"""Hash algorithms and text forms: spec/store-formats.md §1-§4 vectors."""

import pytest

from nixwarden.shared.hashes import Hash, HashAlgo, HashSink, compress_hash

A = HashAlgo

# (algo, input, base16, nix32) -- the spec's verified table (§2).
VECTORS = [
    (A.MD5, b"", "d41d8cd98f00b204e9800998ecf8427e", "3y8bwfr609h3lh9ch0izcqq7fl"),
    (A.SHA1, b"", "da39a3ee5e6b4b0d3255bfef95601890afd80709", "143xibwh31h9bvxzalr0sjvbbvpa6ffs"),
    (A.SHA256, b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
     "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"),
    (A.SHA512, b"", None,
     "0zdl9zrg8r3i9c1g90lgg9ip5ijzv3yhz91i0zzn3r8ap9ws784gkp9dk9j3aglhgf1amqb0pj21mh7h1nxcl18akqvvf7ggqsy30yg"),
    (A.MD5, b"hello\n", "b1946ac92492d2347c6235b4d2611184", "4425hx5d1mc9y39llj4k4nm55i"),
    (A.SHA1, b"hello\n", "f572d396fae9206628714fb2ce00f72e94f2258f", "iwjz551fyw0cxcjgf4l6c879zabd6wpm"),
    (A.SHA256, b"hello\n", "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
     "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"),
    (A.SHA512, b"hello\n", None,
     "0lrc0dwnvipqviibf7qfm1y492qvjwb1zhkcyi05cndmva1mr5gjcgrnz1x36djmk0sfg8djd2n0qv68vib2jg590mwznar9jcjphp7"),
    (A.MD5, b"abc", "900150983cd24fb0d6963f7d28e17f72", "3jgzhjhz9zjvbb0kyj7jc500ch"),
    (A.SHA1, b"abc", "a9993e364706816aba3e25717850c26c9cd0d89d", "kpcd173cq987hw957sx6m0868wv3x6d9"),
    (A.SHA256, b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
     "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"),
]


@pytest.mark.parametrize("algo,data,hexd,nix32", VECTORS)
def test_compute_vectors(algo, data, hexd, nix32):
    h = Hash.compute(algo, data)
    if hexd is not None:
        assert h.to_base16() == hexd
    assert h.to_nix32() == nix32
    for base in ("base16", "nix32", "base64"):
        assert Hash.parse(h.to_prefixed(base)) == h
        assert Hash.parse(h.encode(base), algo) == h
    assert Hash.parse(h.to_sri()) == h


def test_sizes():
    assert [a.size for a in A] == [16, 20, 32, 64]
    assert str(A.SHA256) == "sha256"


def test_sri_vector():
    h = Hash.compute(A.SHA256, b"hello\n")
    assert h.to_sri() == "sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM="
    assert str(h) == "sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"
    assert h.to_prefixed("base16") == "sha256:" + h.to_base16()


def test_parse_upper_case_hex():
    h = Hash.compute(A.MD5, b"abc")
    assert Hash.parse("md5:" + h.to_base16().upper()) == h


@pytest.mark.parametrize("text,algo,msg", [
    ("00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq", None, "does not include a type"),
    ("sha257:00", None, "unknown hash algorithm 'sha257'"),
    ("sha256:abcd", None, "wrong length for hash type 'sha256'"),
    ("sha256:" + "g" * 64, None, "invalid base-16 hash"),
    ("sha256:" + "e" * 52, None, "invalid base-32 hash"),
    ("sha256:" + "z" * 52, None, "invalid base-32 hash"),
    ("sha256:" + "!" * 44, None, "invalid base-64 hash"),
    ("sha256-" + "A" * 10, None, "invalid SRI hash"),
    ("sha256-" + "!" * 44, None, "invalid SRI hash"),
    ("sha256-" + "A" * 40 + "====", None, "invalid SRI hash"),
    ("sha1:143xibwh31h9bvxzalr0sjvbbvpa6ffs", A.SHA256, "should have type 'sha256'"),
    ("143xibwh31h9bvxzalr0sjvbbvpa6ffs", A.SHA256, "wrong length"),
    ("sha256:" + "\u00e9" * 64, None, "invalid base-16"),
])
def test_parse_errors(text, algo, msg):
    with pytest.raises(ValueError, match=msg):
        Hash.parse(text, algo)


def test_sri_is_base64_only():
    h = Hash.compute(A.SHA256, b"hello\n")
    with pytest.raises(ValueError):
        Hash.parse("sha256-" + h.to_base16())


def test_hash_checks_digest_size():
    with pytest.raises(ValueError):
        Hash(A.SHA256, b"x" * 20)
    with pytest.raises(TypeError):
        Hash("sha256", b"x" * 32)


def test_unknown_encoding():
    with pytest.raises(ValueError):
        Hash.compute(A.MD5, b"").encode("base58")


def test_sink_matches_compute():
    sink = HashSink(A.SHA256)
    for piece in (b"hel", b"", b"lo", b"\n"):
        sink.update(piece)
    assert sink.size == 6
    assert sink.finish() == Hash.compute(A.SHA256, b"hello\n")


def test_compress_hash_vector():
    digest = bytes.fromhex("fe50c26088fb1e2ba70dc3de7815d4b7fe5c6f8a83fb6464fb3da70023809016")
    assert compress_hash(digest, 20).hex() == "7daba60473c6b92b848d53c87815d4b7fe5c6f8a"
    assert compress_hash(b"\x01\x02", 4) == b"\x01\x02\x00\x00"
    with pytest.raises(ValueError):
        compress_hash(b"", 0)


def test_algo_parse():
    assert A.parse("sha512") is A.SHA512
    with pytest.raises(ValueError, match="unknown hash algorithm 'SHA256'"):
        A.parse("SHA256")
