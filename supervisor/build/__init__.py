"""Preparing a local build: what the builder is given and what it produced.

Pure modules (spec/local-store.md §8) used by the supervisor's build code:

* ``placeholders``: output placeholders and Nix's string rewriting;
* ``structured``: ``__structuredAttrs``: ``.attrs.json`` / ``.attrs.sh``;
* ``refgraph``: ``exportReferencesGraph`` files (text and JSON forms);
* ``env``: the builder's environment, arguments and build-directory files;
* ``refscan``: reference scanning and hash rewriting of built outputs.

Trust: every input here comes from a client-supplied derivation; nothing
in this package starts a process or writes to the store.
"""
