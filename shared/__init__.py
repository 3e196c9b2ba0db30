"""nixwarden.shared: code both sides of the privilege boundary need.

Nothing here is privileged and nothing here does I/O except
``rpc/channel.py``: codecs, hashes, store paths, NAR reading and writing,
the RPC schema.  This package imports only the standard library (and
msgspec for the RPC schema) and itself.
"""
