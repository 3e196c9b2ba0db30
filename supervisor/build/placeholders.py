"""Output placeholders and string rewriting for builds (spec/local-store.md
§8.3, spec/store-formats.md §10.3).

Holds ``hash_placeholder`` (Nix's ``hashPlaceholder``), ``rewrite`` (Nix's
``rewriteStrings``), ``placeholder_map`` (placeholder -> output path as the
builder sees it) and ``input_rewrites`` (everything Nix 2.8 rewrites in the
builder's environment, arguments and files).  Pure; run by the supervisor's
build code in the session that starts a build.

Trust: the derivation is client-supplied; output names are checked by
``Derivation`` and output paths come from the caller, never from the
derivation's env.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from nixwarden.shared import base32
from nixwarden.shared.derivation import Derivation, encode_text
from nixwarden.shared.storepath import StorePath


def hash_placeholder(output_name: str) -> str:
    """``"/" + nix32(sha256("nix-output:" + output_name))`` (spec SF §10.3)."""
    digest = hashlib.sha256(encode_text("nix-output:" + output_name)).digest()
    return "/" + base32.encode(digest)


def rewrite(text: str, mapping: Mapping[str, str]) -> str:
    """Replace every occurrence of each key of ``mapping`` by its value.

    Keys are applied one after the other in bytewise order (Nix iterates a
    ``std::map``); a key equal to its value, or empty, is skipped.  Each
    key's occurrences are replaced left to right without rescanning the
    inserted text; Nix rescans from the start of the replacement, which
    differs only when a value recreates its own key (Nix then loops).
    """
    for key in sorted(mapping, key=encode_text):
        value = mapping[key]
        if key and key != value:
            text = text.replace(key, value)
    return text


def _output_path(output_paths: Mapping[str, str], name: str) -> str:
    try:
        return output_paths[name]
    except KeyError:
        raise ValueError(f"no path given for output '{name}'") from None


def placeholder_map(drv: Derivation, output_paths: Mapping[str, str]) -> dict[str, str]:
    """Each output's placeholder -> the path the builder writes that output to.

    Args:
        drv: the derivation being built.
        output_paths: output name -> full (scratch) store path, for every
            output of ``drv``.
    Raises:
        ValueError: an output of ``drv`` has no entry in ``output_paths``.
    """
    return {hash_placeholder(name): _output_path(output_paths, name) for name in drv.outputs}


def _hash_part(path: str) -> str:
    return StorePath.from_base(path.rsplit("/", 1)[-1]).hash_part


def input_rewrites(drv: Derivation, output_paths: Mapping[str, str]) -> dict[str, str]:
    """Nix 2.8's ``inputRewrites``: placeholders plus final -> scratch hash parts.

    Where an output's path is known from the derivation but the build
    writes elsewhere (a scratch path, spec §8.6), the known path's hash
    part is rewritten to the scratch path's.

    Raises:
        ValueError: a missing output path.
        BadStorePath: a path that is not a store path.
    """
    rewrites = placeholder_map(drv, output_paths)
    for name, out in drv.outputs.items():
        scratch = output_paths[name]
        if out.path is not None and out.path != scratch:
            final_hash, scratch_hash = _hash_part(out.path), _hash_part(scratch)
            rewrites[final_hash] = scratch_hash
    return rewrites
