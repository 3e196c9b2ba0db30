"""Store paths, path computation and content addresses (spec §5-§7)."""

import struct

import pytest

from nixwarden.shared.hashes import Hash, HashAlgo
from nixwarden.shared.storepath import (
    BadStorePath, ContentAddress, ContentAddressMethod, StoreDir, StorePath,
    output_path_name)

SD = StoreDir("/nix/store")
HELLO = b"hello\n"
HELLO_PATH = "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"
H32 = "i9pmrzmpshapij2kin22pff6fc2adavx"


def _s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b + bytes(-len(b) % 8)


def nar_file(contents: bytes) -> bytes:
    toks = [b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")"]
    return b"".join(_s(t) for t in toks)


def sha256(data: bytes) -> Hash:
    return Hash.compute(HashAlgo.SHA256, data)


# --- StorePath ------------------------------------------------------------------

def test_parse_and_print():
    sp = SD.parse(HELLO_PATH)
    assert sp == StorePath(H32, "hello.txt")
    assert sp.base == f"{H32}-hello.txt"
    assert str(sp) == sp.base
    assert SD.print(sp) == HELLO_PATH
    assert sp.full("/nix/store/") == HELLO_PATH
    assert not sp.is_derivation
    assert StorePath(H32, "x.drv").is_derivation


def test_from_base_lengths():
    assert StorePath.from_base(H32 + "-" + "a" * 211).name == "a" * 211
    with pytest.raises(BadStorePath, match="longer than 211"):
        StorePath.from_base(H32 + "-" + "a" * 212)


@pytest.mark.parametrize("base,msg", [
    (H32, "too short"),
    (H32 + "-", "empty name"),
    (H32 + "_x", "lacks a '-'"),
    ("e" + H32[1:] + "-x", "illegal base-32 character 'e'"),
    ("I" + H32[1:] + "-x", "illegal base-32 character 'I'"),
    (H32 + "-a b", "illegal character ' '"),
    (H32 + "-a/b", "illegal character '/'"),
    (H32 + "-\u00e9", "illegal character"),
    (H32 + "-.", "invalid name"),
    (H32 + "-..", "invalid name"),
    (H32 + "-.-x", "invalid name"),
    (H32 + "-..-x", "invalid name"),
])
def test_from_base_rejects(base, msg):
    with pytest.raises(BadStorePath, match=msg):
        StorePath.from_base(base)


@pytest.mark.parametrize("name", [".hidden", "a+b-c._?=", "..x", ".x-", "-", "Z9"])
def test_legal_names(name):
    assert StorePath.from_base(f"{H32}-{name}").name == name


def test_hash_part_length_checked():
    with pytest.raises(BadStorePath):
        StorePath(H32[:-1], "x")


def test_ordering_is_bytewise_by_base():
    names = ["b", "B", "a-b", "a", "Z10", "Z9"]
    paths = sorted(StorePath(H32, n) for n in names)
    assert [p.base for p in paths] == sorted(f"{H32}-{n}" for n in names)
    other = StorePath("0" * 32, "z")
    assert min(other, StorePath(H32, "a")) == other


# --- StoreDir -------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/srv/not-in-store", "/nix/store", "/nix/store/", "/nix/storex/" + H32 + "-x",
    "/nix/" + H32 + "-x", "relative/" + H32 + "-x",
])
def test_parse_not_in_store(path):
    with pytest.raises(BadStorePath, match=f"path '{path}' is not in the Nix store"):
        SD.parse(path)


def test_parse_rejects_sub_paths():
    with pytest.raises(BadStorePath, match="is not in the Nix store"):
        SD.parse(HELLO_PATH + "/bin/x")


def test_parse_canonicalises_like_nix():
    assert SD.parse("/nix//store/./" + H32 + "-hello.txt/") == SD.parse(HELLO_PATH)
    assert SD.parse("/nix/store/../store/" + H32 + "-hello.txt").name == "hello.txt"
    assert SD.parse("/../nix/store/" + H32 + "-hello.txt").name == "hello.txt"


def test_to_store_path():
    assert SD.to_store_path(HELLO_PATH + "/bin/x") == SD.parse(HELLO_PATH)
    assert SD.parse_lenient(HELLO_PATH) == SD.parse(HELLO_PATH)
    with pytest.raises(BadStorePath, match="not in the Nix store"):
        SD.to_store_path(HELLO_PATH + "/../../../etc/passwd")
    with pytest.raises(BadStorePath, match="not in the Nix store"):
        SD.to_store_path("/nix/store")
    with pytest.raises(BadStorePath, match="too short"):
        SD.to_store_path("/nix/store/abc/def")


def test_is_in_store():
    assert SD.is_in_store(HELLO_PATH)
    assert SD.is_in_store(HELLO_PATH + "/x")
    assert not SD.is_in_store("/nix/store/")
    assert not SD.is_in_store("/nix/storefoo")


def test_store_dir_normalised():
    assert StoreDir("/nix/store/").path == "/nix/store"
    assert str(StoreDir()) == "/nix/store"
    for bad in ["", "/", "nix/store", "/nix/../store", "/nix//store", "/nix/./store"]:
        with pytest.raises(ValueError):
            StoreDir(bad)


def test_parse_many():
    assert SD.parse_many([HELLO_PATH]) == [SD.parse(HELLO_PATH)]


# --- computing paths (spec §6 verified vectors) --------------------------------

def test_source_path_hello():
    nar = nar_file(HELLO)
    assert sha256(nar).to_base16() == (
        "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13")
    sp = SD.make_fixed_output_path("nar", sha256(nar), "hello.txt")
    assert SD.print(sp) == HELLO_PATH
    assert SD.make_store_path("source", sha256(nar), "hello.txt") == sp


def test_source_path_empty():
    sp = SD.make_fixed_output_path("nar", sha256(nar_file(b"")), "empty.txt")
    assert sp.base == "sfmk8wid8fzwnvzcwvw8sgblj2xz4n58-empty.txt"


def test_flat_sha256_and_sha1():
    sp = SD.make_fixed_output_path("flat", sha256(HELLO), "hello.txt")
    assert sp.base == "gy454w1cxaq731grqwylhzf4pp9r5izh-hello.txt"
    sp1 = SD.make_fixed_output_path("flat", Hash.compute(HashAlgo.SHA1, HELLO), "hello.txt")
    assert sp1.base == "svdva85yi507g9vncgsaxvnd1r808h4w-hello.txt"


def test_recursive_sha1():
    h = Hash.compute(HashAlgo.SHA1, nar_file(HELLO))
    assert ContentAddress("nar", h).render() == "fixed:r:sha1:wz60bbf44cw7nswp1wv8vcsyfg155sqd"
    sp = SD.make_fixed_output_path("nar", h, "hello.txt")
    assert sp.base == "hzq8n5jpi3g2d0xhlvqd8q1gx5c9s6i3-hello.txt"


def test_fod_vector():
    sp = SD.make_fixed_output_path("flat", sha256(b"hello"), "fod")
    assert sp.base == "9q0mqp4y1k819ysjzsfjah1ld74x19w2-fod"


def test_text_paths():
    foo = SD.make_text_path("foo.txt", sha256(HELLO))
    assert foo.base == "xl3jbiq4g9jnqn8yp9y4cski5n3ylk1q-foo.txt"
    contents = f"see {HELLO_PATH}\n".encode()
    ref = SD.make_text_path("ref.txt", sha256(contents), [SD.parse(HELLO_PATH)])
    assert ref.base == "wmm9hngfwxsjqpiy50lligndn8n83f6w-ref.txt"
    assert SD.make_fixed_output_path("text", sha256(contents), "ref.txt",
                                     [SD.parse(HELLO_PATH)]) == ref


def test_self_reference_vector():
    inner = Hash.parse("sha256:0i5lijmhbvdznxqwxiqnqx96l4hv90yqg0kgg3f8xhp4ijq6gwba")
    assert inner.to_base16().startswith("6af167b0")
    sp = SD.make_fixed_output_path("nar", inner, "caself", [], has_self_reference=True)
    assert sp.base == "yxz3b8xbcbpff1g14v88rrm1p270skl3-caself"
    ca = ContentAddress.parse("fixed:r:sha256:0i5lijmhbvdznxqwxiqnqx96l4hv90yqg0kgg3f8xhp4ijq6gwba")
    assert SD.make_path_from_ca("caself", ca, has_self_reference=True) == sp


def test_source_references_sorted_and_deduplicated():
    a, b = StorePath("0" * 32, "a"), StorePath("1" * 32, "b")
    h = sha256(b"x")
    assert SD.make_fixed_output_path("nar", h, "n", [b, a, b]) == \
        SD.make_fixed_output_path("nar", h, "n", [a, b])
    assert SD.make_fixed_output_path("nar", h, "n", [a]) != \
        SD.make_fixed_output_path("nar", h, "n", [])


def test_store_dir_is_part_of_the_hash():
    h = sha256(nar_file(HELLO))
    assert StoreDir("/other/store").make_fixed_output_path("nar", h, "hello.txt") != \
        SD.make_fixed_output_path("nar", h, "hello.txt")


def test_output_path_names():
    h = sha256(b"drv")
    assert output_path_name("dep", "out") == "dep"
    assert output_path_name("dep", "dev") == "dep-dev"
    assert SD.make_output_path("dev", h, "dep").name == "dep-dev"
    assert SD.make_output_path("out", h, "dep") == SD.make_store_path("output:out", h, "dep")


def test_git_method_uses_output_out():
    h = Hash.compute(HashAlgo.SHA1, b"blob")
    payload = f"fixed:out:git:sha1:{h.to_base16()}:".encode()
    assert SD.make_fixed_output_path("git", h, "g") == \
        SD.make_store_path("output:out", sha256(payload), "g")


def test_fixed_output_errors():
    ref = SD.parse(HELLO_PATH)
    with pytest.raises(ValueError, match="not allowed to refer"):
        SD.make_fixed_output_path("flat", sha256(HELLO), "x", [ref])
    with pytest.raises(ValueError, match="not allowed to refer"):
        SD.make_fixed_output_path("nar", Hash.compute(HashAlgo.SHA1, HELLO), "x",
                                  has_self_reference=True)
    with pytest.raises(ValueError, match="unknown content-address method"):
        SD.make_fixed_output_path("zip", sha256(HELLO), "x")
    with pytest.raises(ValueError, match="sha256"):
        SD.make_text_path("x", Hash.compute(HashAlgo.SHA1, HELLO))
    with pytest.raises(ValueError, match="themselves"):
        SD.make_fixed_output_path("text", sha256(HELLO), "x", has_self_reference=True)
    with pytest.raises(BadStorePath):
        SD.make_store_path("source", sha256(HELLO), "bad name")


# --- content addresses (spec §7) ------------------------------------------------

CA_VECTORS = [
    ("text:sha256:0nw4lmikvxh489n05lc09n33yrg1nil6hyav976zqvji42ig63nh", "text", "sha256"),
    ("fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq", "flat", "sha256"),
    ("fixed:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm", "flat", "sha1"),
    ("fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw", "nar", "sha256"),
    ("fixed:r:sha1:wz60bbf44cw7nswp1wv8vcsyfg155sqd", "nar", "sha1"),
    ("fixed:git:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm", "git", "sha1"),
]


@pytest.mark.parametrize("text,method,algo", CA_VECTORS)
def test_ca_round_trip(text, method, algo):
    ca = ContentAddress.parse(text)
    assert (ca.method, ca.hash.algo.value) == (method, algo)
    assert ca.render() == text
    cam = ca.method_algo
    assert cam.render() == text.rsplit(":", 1)[0]
    assert ContentAddressMethod.parse(cam.render()) == cam


def test_ca_hello_path():
    ca = ContentAddress.parse(
        "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")
    assert SD.print(SD.make_path_from_ca("hello.txt", ca)) == HELLO_PATH


def test_ca_accepts_other_encodings():
    h = sha256(HELLO)
    for digest in (h.to_base16(), h.to_base64()):
        ca = ContentAddress.parse(f"fixed:sha256:{digest}")
        assert ca == ContentAddress("flat", h)
        assert ca.render() == "fixed:sha256:" + h.to_nix32()


@pytest.mark.parametrize("text", [
    "", "fixed", "text:sha256", "fixed:sha256", "source:sha256:" + "0" * 52,
    "text:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm", "fixed:r:sha257:00",
    "fixed:sha256:" + sha256(HELLO).to_sri(), "fixed:r:sha256:abc",
    "fixed:x:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw",
])
def test_ca_rejects(text):
    with pytest.raises(ValueError):
        ContentAddress.parse(text)


@pytest.mark.parametrize("text,method,algo", [
    ("text:sha256", "text", HashAlgo.SHA256), ("fixed:sha256", "flat", HashAlgo.SHA256),
    ("fixed:r:sha256", "nar", HashAlgo.SHA256), ("fixed:git:sha1", "git", HashAlgo.SHA1),
    ("fixed:md5", "flat", HashAlgo.MD5), ("fixed:r:sha512", "nar", HashAlgo.SHA512),
])
def test_cam_parse(text, method, algo):
    cam = ContentAddressMethod.parse(text)
    assert (cam.method, cam.algo) == (method, algo)
    assert cam.render() == text


@pytest.mark.parametrize("text", [
    "text:sha1", "fixed:r", "fixed:", "text", "sha256", "fixed:r:sha256:x", "r:sha256"])
def test_cam_rejects(text):
    with pytest.raises(ValueError):
        ContentAddressMethod.parse(text)


def test_cam_constructor_checks():
    with pytest.raises(ValueError):
        ContentAddressMethod("zip", HashAlgo.SHA256)
    with pytest.raises(ValueError):
        ContentAddress("text", Hash.compute(HashAlgo.MD5, b""))

