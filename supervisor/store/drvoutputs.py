"""DerivationOutputs rows for a newly added ``.drv`` (spec local-store §2.4, §4.4).

When a derivation file becomes valid, Nix records each output whose path
is statically known, and refuses a derivation whose declared outputs are
not the ones Nix computes.  Process: session.

Trust: the file content came from a client; it is parsed strictly by
``shared.derivation`` and its outputs are recomputed, never read as given.
"""

from __future__ import annotations

import os

from nixwarden.shared import derivation as drvmod
from nixwarden.shared import derivation_hash

#: Input derivation hashes a session keeps (a few hundred bytes each).
DRV_HASH_CACHE_MAX = 50_000


def read_drv(store_fd: int, store_dir, path: str) -> drvmod.Derivation:
    """Parse the ``.drv`` at ``path`` (relative to the real store directory)."""
    sp = store_dir.parse(path)
    fd = os.open(sp.base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=store_fd)
    with os.fdopen(fd, "rb") as f:
        text = f.read()
    return drvmod.parse_derivation(text, store_dir, sp.name[:-len(".drv")])


def outputs_for_new_drv(writer, path: str) -> dict[str, dict[str, str]]:
    """``{drv path: {output name: output path}}`` for the DerivationOutputs table.

    The new derivation is in place but not yet registered; its inputs are
    valid store paths, read the same way.

    Raises:
        DerivationError: an unparsable derivation or wrong declared outputs
            (a ``StoreRefusal`` with Nix's message).
    """
    store_dir = writer.store_dir
    drv = read_drv(writer.store_fd, store_dir, path)
    if len(writer.drv_hashes) > DRV_HASH_CACHE_MAX:
        writer.drv_hashes.clear()
    derivation_hash.check_outputs(drv, store_dir,
                                  lambda p: read_drv(writer.store_fd, store_dir, p),
                                  drv_path=path, cache=writer.drv_hashes)
    outputs = {name: out.path for name, out in drv.outputs.items() if out.path}
    return {path: outputs} if outputs else {}
