"""Local builds (spec/local-store.md §8).

Pure modules that prepare a build and examine its results (no processes,
no store writes; ``refscan.rewrite_hashes`` writes only below the path
it is given):

* ``placeholders``: output placeholders and Nix's string rewriting;
* ``structured``: ``__structuredAttrs``: ``.attrs.json`` / ``.attrs.sh``;
* ``refgraph``: ``exportReferencesGraph`` files (text and JSON forms);
* ``env``: the builder's environment, arguments and build-directory files;
* ``refscan``: reference scanning and hash rewriting of built outputs.

The other modules (planning, scheduling, spawning builders, registering
outputs) say in their own docstrings which process runs them.

Trust: derivations are client-supplied; ``BuildSetupError`` is how a
derivation that Nix would refuse to set up is refused here.
"""

from nixwarden.shared.errors import StoreRefusal


class BuildSetupError(StoreRefusal):
    """The derivation cannot be set up for building (message as Nix words it)."""
