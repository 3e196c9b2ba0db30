"""Signing keys and path signatures: spec/store-formats.md §15.3 vectors,
malformed keys and signatures, key loading, and agreement with the real
Nix 2.8 (keys from ``nix-store --generate-binary-cache-key``, signatures
from ``nix store sign`` read back with ``nix path-info --json --sigs``)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess

import pytest

from nixwarden.shared import limits
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.hashes import Hash, HashAlgo
from nixwarden.supervisor.store.signatures import (
    PublicKey, SecretKey, check_path_sigs, fingerprint, load_public_keys, parse_public_key,
    parse_secret_key, public_key_of, sign, verify)

needs_nix = pytest.mark.skipif(shutil.which("nix-store") is None, reason="needs the real Nix 2.8")

SECRET = ("test-key-1:jP25alcKDxUMxgxkx4+qd0oE7GnZ/Ph7a+V/mjbkgpTKntcxqEMQDrfFxe4rccijoP5wP"
          "hFO4Hwr5CcLYoAIag==")
PUBLIC = "test-key-1:yp7XMahDEA63xcXuK3HIo6D+cD4RTuB8K+QnC2KACGo="

HELLO = "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"
TREE = "/nix/store/nbwba2pj62h71gx0r9dy2ipjlw19r02d-tree"
REFS = "/nix/store/4gqv4131mx80b5gcxwpphyihvn59h902-refs"
SIMPLE = "/nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple"

VECTORS = [  # (path, nar hash, size, references, fingerprint, signature)
    (HELLO, "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw", 120, [],
     f"1;{HELLO};sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw;120;",
     "test-key-1:M+d4OBdzyEzG9jjTOyh+Ds8jFN6J7oCWDUJ+E+DxujgGy1xRYAmw8diU52zSsykJrQBpI1E23W+hJ6hCeJa7Dg=="),
    (TREE, "sha256:1hp3mc366n1f9lv215smw294anigjgy5gqzczqqlzcy4vqg6pcq7", 1080, [],
     f"1;{TREE};sha256:1hp3mc366n1f9lv215smw294anigjgy5gqzczqqlzcy4vqg6pcq7;1080;",
     "test-key-1:kIjIc/hvtUralmkyfeqCdGijdvLXNG9LEViyq1jgx1wutuWApj+3CfZ8tJpuGPxtGWquOjKzsyXXx8jZcjeSBg=="),
    (REFS, "sha256:18jr0nbrjg1xi0bvfyvzrklsxhd6fjrykmypsqicx54dgbrc3pnv", 216, [SIMPLE, REFS],
     f"1;{REFS};sha256:18jr0nbrjg1xi0bvfyvzrklsxhd6fjrykmypsqicx54dgbrc3pnv;216;{REFS},{SIMPLE}",
     "test-key-1:SdfhKO6Lder4yBYQiygeHBlbKUEx4OqHGWCooRbeVh7BtE4R7z6dh6d6pDnX1aNzrcrLj8rc6giGQJCqp1D4AA=="),
]


@pytest.fixture
def keys():
    secret = parse_secret_key(SECRET)
    public = parse_public_key(PUBLIC)
    return secret, {public.name: public}


def test_key_parsing_and_text_forms():
    secret = parse_secret_key(SECRET + "\n")
    public = parse_public_key(" " + PUBLIC + "\n")
    assert secret.name == public.name == "test-key-1"
    assert len(secret.seed_and_pub) == 64 and len(public.key) == 32
    assert public_key_of(secret) == public
    assert secret.to_text() == SECRET and public.to_text() == PUBLIC
    assert "jP25" not in repr(secret)


@pytest.mark.parametrize("vector", VECTORS, ids=["hello", "tree", "refs"])
def test_spec_vectors(vector, keys):
    secret, trusted = keys
    path, nar_hash, size, refs, fp, sig = vector
    assert fingerprint(path, Hash.parse(nar_hash), size, refs) == fp
    assert sign(secret, fp) == sig
    assert verify(fp, sig, trusted)
    assert not verify(fp + "x", sig, trusted)
    assert not verify(fp.replace(f";{size};", f";{size + 1};"), sig, trusted)
    assert check_path_sigs(path, Hash.parse(nar_hash), size, refs, [sig, sig], trusted) == 1


def test_fingerprint_rules():
    nar_hash = Hash(HashAlgo.SHA256, bytes(32))
    fp = fingerprint("/s/p", nar_hash, 5, ["/s/b", "/s/a", "/s/b"])
    assert fp == f"1;/s/p;sha256:{'0' * 52};5;/s/a,/s/b"
    with pytest.raises(StoreRefusal, match="cannot calculate fingerprint of path '/s/p' "
                                           "because its size is not known"):
        fingerprint("/s/p", nar_hash, 0, [])


def test_verify_rejects_what_does_not_verify(keys):
    _, trusted = keys
    path, nar_hash, size, refs, fp, sig = VECTORS[0]
    name, b64 = sig.split(":", 1)
    raw = base64.b64decode(b64)
    bad = [
        "", ":", sig.replace("test-key-1", "other-key"), b64, f":{b64}",
        f"{name}:{base64.b64encode(bytes([raw[0] ^ 1]) + raw[1:]).decode()}",
        f"{name}:{base64.b64encode(raw[:32] + bytes([0xff] * 32)).decode()}",
    ]
    for s in bad:
        assert verify(fp, s, trusted) is False, s
    # like Nix, a newline inside the base64, missing padding and anything
    # after the first "=" are accepted
    assert verify(fp, f"{name}:{b64[:40]}\n{b64[40:].rstrip('=')}", trusted)
    assert verify(fp, f"{name}:{b64} junk", trusted)
    assert check_path_sigs(path, Hash.parse(nar_hash), size, refs, bad, trusted) == 0
    assert verify(fp, sig, {}) is False
    weird_key = {name: PublicKey(name, bytes(32))}
    assert verify(fp, sig, weird_key) is False


def test_malformed_signature_of_a_trusted_key_is_an_error(keys):
    """Nix 2.8's verifyDetached throws for these instead of returning false,
    which aborts the substitution or addition that checked them."""
    _, trusted = keys
    path, nar_hash, size, refs, fp, sig = VECTORS[0]
    name, b64 = sig.split(":", 1)
    raw = base64.b64decode(b64)
    malformed = {
        f"{name}:": "signature is not valid",
        f"{name}:{base64.b64encode(raw[:63]).decode()}": "signature is not valid",
        f"{name}:{base64.b64encode(raw + b'x').decode()}": "signature is not valid",
        f"{name}:!!!!": "invalid character in Base64 string: '!'",
        f"{name}:{b64.rstrip('=')} ": "invalid character in Base64 string: ' '",
    }
    for text, message in malformed.items():
        with pytest.raises(StoreRefusal) as refused:
            verify(fp, text, trusted)
        assert refused.value.message == message, text
    # An unknown key's malformed signature is never looked at.
    assert verify(fp, "other-key:!!!!", trusted) is False
    with pytest.raises(StoreRefusal, match="signature is not valid"):
        check_path_sigs(path, Hash.parse(nar_hash), size, refs, [f"{name}:"], trusted)


@pytest.mark.parametrize("text, message", [
    ("", "secret key is corrupt"),
    ("no-colon", "secret key is corrupt"),
    (":abcd", "secret key is corrupt"),
    ("name:", "secret key is corrupt"),
    ("name:ab$d", "invalid character in Base64 string: '\\$'"),
    ("name:" + base64.b64encode(bytes(63)).decode(), "secret key is not valid"),
])
def test_bad_secret_keys(text, message):
    with pytest.raises(StoreRefusal, match=message):
        parse_secret_key(text)


def test_inconsistent_secret_key_refused():
    raw = base64.b64decode(SECRET.split(":", 1)[1])
    broken = "test-key-1:" + base64.b64encode(raw[:32] + bytes(32)).decode()
    with pytest.raises(StoreRefusal, match="secret key is not valid"):
        parse_secret_key(broken)


@pytest.mark.parametrize("text, message", [
    ("", "secret key is corrupt"),            # sic: Nix 2.8's wording for any key
    ("name:" + base64.b64encode(bytes(31)).decode(), "public key is not valid"),
    (SECRET, "public key is not valid"),
])
def test_bad_public_keys(text, message):
    with pytest.raises(StoreRefusal, match=message):
        parse_public_key(text)


def test_key_types_validate():
    with pytest.raises(ValueError):
        PublicKey("a:b", bytes(32))
    with pytest.raises(ValueError):
        PublicKey("a", bytes(31))
    with pytest.raises(ValueError):
        SecretKey("", bytes(64))


def test_load_public_keys(tmp_path):
    secret_file = tmp_path / "sec"
    secret_file.write_text(SECRET)
    other = SecretKey("other-1", _fresh_secret())
    other_file = tmp_path / "other"
    other_file.write_text(other.to_text() + "\n")
    keys = load_public_keys([PUBLIC], [str(secret_file), str(tmp_path / "missing"),
                                       str(tmp_path), str(other_file)])
    assert set(keys) == {"test-key-1", "other-1"}
    assert keys["other-1"] == public_key_of(other)
    # first key of a name wins, as in Nix (trusted-public-keys come first)
    impostor = "test-key-1:" + base64.b64encode(bytes(range(32))).decode()
    assert load_public_keys([impostor], [str(secret_file)])["test-key-1"].key == bytes(range(32))
    with pytest.raises(StoreRefusal, match=f"opening file '{tmp_path}/missing': "
                                           "No such file or directory"):
        load_public_keys([], [str(tmp_path / "missing")], ignore_unreadable=False)
    corrupt = tmp_path / "corrupt"
    corrupt.write_text("garbage")
    with pytest.raises(StoreRefusal, match="secret key is corrupt"):
        load_public_keys([], [str(corrupt)])
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * (limits.MAX_KEY_FILE + 1))
    with pytest.raises(StoreRefusal, match="secret key is corrupt"):
        load_public_keys([], [str(huge)])
    with pytest.raises(StoreRefusal, match="public key is not valid"):
        load_public_keys(["x:AAAA"], [])


def _fresh_secret() -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes_raw()
    return seed + key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# --- differential: the real Nix 2.8 --------------------------------------------------

def _nix(root, *args, check=True):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
           "NIX_CONFIG": "substituters =\nexperimental-features = nix-command\n"}
    return subprocess.run(list(args), env=env, capture_output=True, text=True, check=check)


@needs_nix
def test_real_nix_keys_and_signatures(tmp_path):
    sec, pub = tmp_path / "sec", tmp_path / "pub"
    _nix(tmp_path, "nix-store", "--generate-binary-cache-key", "nw-diff-1", str(sec), str(pub))
    secret = parse_secret_key(sec.read_text())
    public = parse_public_key(pub.read_text())
    assert public_key_of(secret) == public
    assert load_public_keys([], [str(sec)]) == {"nw-diff-1": public}
    store = f"local?root={tmp_path}/root"
    (tmp_path / "hello.txt").write_text("hello\n")
    (tmp_path / "a.nix").write_text(
        'derivation { name = "d"; system = "x"; builder = "/bin/sh"; '
        f'src = ./hello.txt; r = builtins.toFile "r.txt" "x ${{./hello.txt}}"; }}')
    added = _nix(tmp_path, "nix-store", "--store", store, "--add",
                 str(tmp_path / "hello.txt")).stdout.strip()
    drv = _nix(tmp_path, "nix-instantiate", "--store", store,
               str(tmp_path / "a.nix")).stdout.strip()
    for path in (added, drv):
        opts = ["--derivation"] if path.endswith(".drv") else []
        _nix(tmp_path, "nix", "store", "sign", "--store", store, *opts,
             "--key-file", str(sec), path)
        info = json.loads(_nix(tmp_path, "nix", "path-info", "--store", store, "--json",
                               "--sigs", *opts, path).stdout)[0]
        (nix_sig,) = info["signatures"]
        nar_hash = Hash.parse(info["narHash"])
        fp = fingerprint(path, nar_hash, info["narSize"], info["references"])
        assert verify(fp, nix_sig, {public.name: public})
        assert sign(secret, fp) == nix_sig            # ed25519 is deterministic
        assert check_path_sigs(path, nar_hash, info["narSize"], info["references"],
                               [nix_sig], {public.name: public}) == 1
        assert not verify(fp, nix_sig, {"nw-diff-1": parse_public_key(PUBLIC)})
    assert len(json.loads(_nix(tmp_path, "nix", "path-info", "--store", store, "--json",
                               "--derivation", drv).stdout)[0]["references"]) == 2
