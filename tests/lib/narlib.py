"""Test-side NAR writer and store-path arithmetic, independent of the daemon's code.

Written from spec/store-formats.md (NAR grammar, make-store-path, nix32)
so that tests craft byte strings and expected paths without trusting
``nixwarden.shared``.  Trees are nested Python values:

* ``bytes`` — a regular file; ``Exe(bytes)`` — an executable file;
* ``Link("target")`` — a symlink;
* ``dict`` — a directory (name -> node; written in sorted order).

``raw_*`` helpers build deliberately malformed NARs (any name, any order).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"


@dataclass(frozen=True)
class Exe:
    data: bytes


@dataclass(frozen=True)
class Link:
    target: str


def s(data) -> bytes:
    """One NAR/wire string: u64 length, bytes, zero padding to 8."""
    if isinstance(data, str):
        data = data.encode()
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def node(tree) -> bytes:
    if isinstance(tree, (bytes, bytearray)):
        return s("(") + s("type") + s("regular") + s("contents") + s(bytes(tree)) + s(")")
    if isinstance(tree, Exe):
        return (s("(") + s("type") + s("regular") + s("executable") + s("")
                + s("contents") + s(tree.data) + s(")"))
    if isinstance(tree, Link):
        return s("(") + s("type") + s("symlink") + s("target") + s(tree.target) + s(")")
    if isinstance(tree, dict):
        return raw_dir([(k.encode() if isinstance(k, str) else k, node(v))
                        for k, v in sorted(tree.items(), key=lambda kv: _b(kv[0]))])
    raise TypeError(tree)


def _b(k) -> bytes:
    return k.encode() if isinstance(k, str) else k


def raw_dir(entries) -> bytes:
    """A directory node from ``[(name bytes, node bytes)]`` exactly as given."""
    out = s("(") + s("type") + s("directory")
    for name, sub in entries:
        out += s("entry") + s("(") + s("name") + s(name) + s("node") + sub + s(")")
    return out + s(")")


def nar(tree) -> bytes:
    return s("nix-archive-1") + node(tree)


def nar_hash_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- store paths (spec store-formats: makeStorePath) ------------------------------

def nix32(digest: bytes) -> str:
    n = len(digest)
    out_len = (n * 8 - 1) // 5 + 1
    chars = []
    for k in range(out_len - 1, -1, -1):
        b = k * 5
        i, j = divmod(b, 8)
        c = digest[i] >> j
        if i + 1 < n:
            c |= digest[i + 1] << (8 - j)
        chars.append(NIX32[c & 0x1F])
    return "".join(chars)


def _compress(digest: bytes, size: int = 20) -> bytes:
    out = bytearray(size)
    for i, b in enumerate(digest):
        out[i % size] ^= b
    return bytes(out)


def make_store_path(store_dir: str, kind: str, inner_hex: str, name: str) -> str:
    text = f"{kind}:sha256:{inner_hex}:{store_dir}:{name}"
    h = _compress(hashlib.sha256(text.encode()).digest())
    return f"{store_dir}/{nix32(h)}-{name}"


def source_path(store_dir: str, nar_bytes: bytes, name: str, refs=()) -> str:
    """The path of a ``fixed:r:sha256`` (source) addition of this NAR."""
    kind = "source" + "".join(":" + r for r in sorted(refs))
    return make_store_path(store_dir, kind, nar_hash_hex(nar_bytes), name)


def text_path(store_dir: str, text: bytes, name: str, refs=()) -> str:
    kind = "text" + "".join(":" + r for r in sorted(refs))
    return make_store_path(store_dir, kind, hashlib.sha256(text).hexdigest(), name)


def fixed_path(store_dir: str, algo: str, digest_hex: str, name: str, recursive: bool) -> str:
    inner = hashlib.sha256(f"fixed:out:{'r:' if recursive else ''}{algo}:{digest_hex}:"
                           .encode()).hexdigest()
    return make_store_path(store_dir, "output:out", inner, name)


def input_path(store_dir: str, name: str, seed: str) -> str:
    """Some well-formed input-addressed path (the hash is arbitrary)."""
    h = _compress(hashlib.sha256(seed.encode()).digest())
    return f"{store_dir}/{nix32(h)}-{name}"
