"""GC roots that clients create: indirect roots under ``gcroots/auto``.

An indirect root is a symlink ``<state>/gcroots/auto/<nix32 sha1 of the
link path>`` pointing at the client's own link (e.g. a ``result``
symlink); the collector follows it to find the store path (spec
local-store §6.2).  The link is replaced atomically.  Process: session.

Trust: the link path is client-supplied; it is only ever stored as a
symlink target, never opened or followed here.
"""

from __future__ import annotations

import os
import secrets

from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.hashes import Hash, HashAlgo


def check_link_path(link: str) -> str:
    """An absolute, canonical path without NUL."""
    if not link.startswith("/") or "\0" in link or os.path.normpath(link) != link:
        raise StoreRefusal(f"invalid root path '{link}'")
    return link


def indirect_root_location(gcroots_dir: str, link: str) -> str:
    name = Hash.compute(HashAlgo.SHA1, link.encode("utf-8", "surrogateescape")).to_nix32()
    return os.path.join(gcroots_dir, "auto", name)


def replace_symlink(location: str, target: str) -> None:
    """Make ``location`` a symlink to ``target``, atomically."""
    os.makedirs(os.path.dirname(location), mode=0o755, exist_ok=True)
    temp = f"{location}.tmp-{os.getpid()}-{secrets.randbelow(1 << 30)}"
    os.symlink(target, temp)
    try:
        os.rename(temp, location)
    except OSError:
        os.unlink(temp)
        raise


def add_indirect_root(gcroots_dir: str, link: str) -> None:
    replace_symlink(indirect_root_location(gcroots_dir, check_link_path(link)), link)


def make_perm_root(link: str, path: str, store_dir) -> None:
    """Create ``link`` → ``path``, refusing to clobber what is not a root.

    Raises:
        StoreRefusal: ``link`` exists and is not a symlink into the store.
    """
    if os.path.lexists(link):
        if not os.path.islink(link) or not store_dir.is_in_store(os.readlink(link)):
            raise StoreRefusal(f"cannot create symlink '{link}'; already exists")
    replace_symlink(link, path)
