"""The narinfo disk cache: remembered binary-cache look-ups with Nix's TTLs.

Nix 2.8 keeps them in ``binary-cache-v6.sqlite`` (``nar-info-disk-cache.cc``);
nixwarden keeps one small JSON file per look-up under
``<state dir>/nixwarden/narinfo-cache/<sha256(cache uri)[:32]>/<hash part>``
(only ``db.py`` may use SQLite), plus ``cache-info`` per cache.  A positive
entry (the narinfo text) is used for ``narinfo-cache-positive-ttl`` seconds,
a negative one (the cache does not have the path) for
``narinfo-cache-negative-ttl``; ``refresh`` ignores every entry (but still
records new ones).  Entries are written atomically (temp file + rename).
Process: session.

Trust: the directory belongs to the daemon (mode 0700, made by the
supervisor side); entries hold untrusted cache text, so a positive entry is
parsed again by ``narinfo.parse_narinfo`` on every use, and any unreadable
or malformed entry counts as "not cached".
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

#: How long ``nix-cache-info`` is remembered (newer Nix: 7 days).
CACHE_INFO_TTL = 7 * 24 * 3600
_MAX_ENTRY = 8 * 1024 * 1024


class NarInfoDiskCache:
    """Remembered narinfo look-ups of all caches of one daemon (thread-safe)."""

    def __init__(self, directory: str, *, positive_ttl: int, negative_ttl: int,
                 refresh: bool = False, clock=time.time):
        self.directory = directory
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.refresh = refresh
        self.clock = clock

    @classmethod
    def under_state_dir(cls, state_dir: str, **kw) -> "NarInfoDiskCache":
        return cls(os.path.join(state_dir, "nixwarden", "narinfo-cache"), **kw)

    def _dir(self, cache_uri: str) -> str:
        return os.path.join(self.directory, hashlib.sha256(cache_uri.encode()).hexdigest()[:32])

    # --- narinfo look-ups ------------------------------------------------------------

    def lookup(self, cache_uri: str, hash_part: str) -> tuple[str, str | None]:
        """``("unknown", None)``, ``("absent", None)`` or ``("present", text)``."""
        if self.refresh:
            return "unknown", None
        entry = self._read(os.path.join(self._dir(cache_uri), _safe(hash_part)))
        if entry is None:
            return "unknown", None
        present = entry.get("present") is True
        ttl = self.positive_ttl if present else self.negative_ttl
        stamp = entry.get("time")
        if not isinstance(stamp, (int, float)) or stamp <= self.clock() - ttl:
            return "unknown", None
        text = entry.get("narinfo")
        if present and not isinstance(text, str):
            return "unknown", None
        return ("present", text) if present else ("absent", None)

    def record(self, cache_uri: str, hash_part: str, narinfo_text: str | None) -> None:
        """Remember a look-up: the narinfo text, or None for "absent"."""
        entry = {"uri": cache_uri, "time": self.clock(), "present": narinfo_text is not None,
                 "narinfo": narinfo_text}
        self._write(self._dir(cache_uri), _safe(hash_part), entry)

    # --- nix-cache-info ------------------------------------------------------------------

    def lookup_cache_info(self, cache_uri: str) -> str | None:
        """The remembered ``nix-cache-info`` text (empty: the file was absent)."""
        if self.refresh:
            return None
        entry = self._read(os.path.join(self._dir(cache_uri), "cache-info"))
        if entry is None or not isinstance(entry.get("text"), str):
            return None
        stamp = entry.get("time")
        if not isinstance(stamp, (int, float)) or stamp <= self.clock() - CACHE_INFO_TTL:
            return None
        return entry["text"]

    def record_cache_info(self, cache_uri: str, text: str) -> None:
        self._write(self._dir(cache_uri), "cache-info",
                    {"uri": cache_uri, "time": self.clock(), "text": text})

    # --- files -----------------------------------------------------------------------------

    @staticmethod
    def _read(path: str) -> dict | None:
        try:
            with open(path, "rb") as f:
                data = f.read(_MAX_ENTRY + 1)
        except OSError:
            return None
        if len(data) > _MAX_ENTRY:
            return None
        try:
            entry = json.loads(data)
        except ValueError:
            return None
        return entry if isinstance(entry, dict) else None

    def _write(self, directory: str, name: str, entry: dict) -> None:
        """Write one entry; failures are ignored (the cache is an optimisation)."""
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(entry, f)
                os.rename(tmp, os.path.join(directory, name))
            except BaseException:
                _unlink(tmp)
                raise
        except OSError:
            pass


def _safe(hash_part: str) -> str:
    """A hash part as a file name (callers pass validated 32-char nix32 text)."""
    if not hash_part.isalnum():
        raise ValueError(f"bad hash part '{hash_part}'")
    return hash_part


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
