"""DerivationOutputs rows for a newly added ``.drv`` (spec local-store §2.4).

When a derivation file becomes valid, Nix records each output whose path
is statically known, and refuses a derivation whose declared outputs are
not the ones Nix computes.  Process: session.

Trust: the file content came from a client; it is parsed strictly by
``shared.derivation`` and its outputs are recomputed, never read as given.
"""

from __future__ import annotations

import os

from nixwarden.shared.errors import StoreRefusal


def _read_drv(writer, path: str) -> str:
    base = writer.store_dir.parse(path).base
    fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=writer.store_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read().decode("utf-8", "surrogateescape")


def outputs_for_new_drv(writer, path: str) -> dict[str, dict[str, str]]:
    """``{drv path: {output name: output path}}`` for the DerivationOutputs table.

    The new derivation has already been moved into place (not yet
    registered); its inputs are valid store paths.

    Raises:
        StoreRefusal: unparsable derivation or wrong declared outputs.
    """
    from nixwarden.shared import derivation as drvmod
    name = writer.store_dir.parse(path).name[:-len(".drv")]
    text = _read_drv(writer, path)
    try:
        drv = drvmod.parse_derivation(text, writer.store_dir, name)
        drvmod.check_outputs(drv, writer.store_dir,
                             lambda p: drvmod.parse_derivation(
                                 _read_drv(writer, p), writer.store_dir,
                                 writer.store_dir.parse(p).name[:-len(".drv")]))
    except drvmod.DerivationError:
        raise
    except (ValueError, OSError) as exc:
        raise StoreRefusal(f"error parsing derivation '{path}': {exc}") from None
    outputs = {out: o.path for out, o in drv.outputs.items() if o.path}
    return {path: outputs} if outputs else {}
