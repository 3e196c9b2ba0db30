"""Version strings nixwarden reports.

``NIX_COMPAT_VERSION`` is the Nix version the daemon announces to clients
in the handshake (protocol >= 1.33) and prints with ``--version``, so that
clients and test suites that gate on the daemon's Nix version see the
behaviour nixwarden implements.
"""

NIXWARDEN_VERSION = "0.1.0"
NIX_COMPAT_VERSION = "2.8.0"
