"""The narinfo disk cache: remembered binary-cache look-ups with Nix's TTLs.

Nix 2.8 keeps them in ``binary-cache-v6.sqlite`` (``nar-info-disk-cache.cc``);
nixwarden keeps them in its own SQLite file,
``<state dir>/nixwarden/narinfo-cache.sqlite``: one row per (cache, hash
part) with the narinfo text, or none for "the cache does not have it", and
the ``nix-cache-info`` text per cache.  A positive entry is used for
``narinfo-cache-positive-ttl`` seconds, a negative one for
``narinfo-cache-negative-ttl``; ``refresh`` ignores every entry (but still
records new ones).  Like Nix's, the file is a cache: written without
syncing (``synchronous = off``), shared by all sessions (WAL, busy
timeout), entries older than their TTL purged once a day.  For the many
look-ups of one query, ``warm`` reads the entries of many paths at once
and new entries are kept in memory until ``flush`` (or enough of them)
writes them in one transaction.  Process: session.

Trust: the file belongs to the daemon (in a mode 0700 directory made by
the supervisor side); entries hold untrusted cache text, so a positive
entry is parsed again by ``narinfo.parse_narinfo`` on every use.  Any
unreadable or malformed entry, or a database that cannot be used at all,
counts as "not cached": the cache is an optimisation and never an error.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time

log = logging.getLogger("nixwarden.narinfo-cache")

#: How long ``nix-cache-info`` is remembered (newer Nix: 7 days).
CACHE_INFO_TTL = 7 * 24 * 3600
PURGE_INTERVAL = 24 * 3600  # as Nix's
FLUSH_EVERY = 256  # recorded entries kept in memory at most
BUSY_TIMEOUT_SECONDS = 60

_LOOKUP = "select time, present, narinfo from NarInfos where cache = ? and hashPart = ?"

_SCHEMA = """
create table if not exists NarInfos (
    cache     text not null,
    hashPart  text not null,
    time      real not null,
    present   integer not null,
    narinfo   text,
    primary key (cache, hashPart)
);
create table if not exists CacheInfos (
    cache     text primary key not null,
    time      real not null,
    text      text not null
);
create table if not exists LastPurge (
    dummy     text primary key not null,
    value     real not null
);
"""


class NarInfoDiskCache:
    """Remembered narinfo look-ups of all caches of one daemon (thread-safe)."""

    def __init__(self, path: str, *, positive_ttl: int, negative_ttl: int,
                 refresh: bool = False, clock=time.time):
        self.path = path
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.refresh = refresh
        self.clock = clock
        self._mutex = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._unusable = False
        self._warm: dict[tuple[str, str], tuple | None] = {}  # read ahead by ``warm``
        self._pending: dict[tuple[str, str], tuple] = {}  # recorded, not yet written

    @classmethod
    def under_state_dir(cls, state_dir: str, **kw) -> "NarInfoDiskCache":
        return cls(os.path.join(state_dir, "nixwarden", "narinfo-cache.sqlite"), **kw)

    def close(self) -> None:
        self.flush()
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --- narinfo look-ups ------------------------------------------------------------

    def lookup(self, cache_uri: str, hash_part: str) -> tuple[str, str | None]:
        """``("unknown", None)``, ``("absent", None)`` or ``("present", text)``."""
        _check_hash_part(hash_part)
        if self.refresh:
            return "unknown", None
        key = (cache_uri, hash_part)
        with self._mutex:
            if key in self._pending:
                row = self._pending[key][2:]
            elif key in self._warm:
                row = self._warm.pop(key)
            else:
                row = self._fetch_locked(_LOOKUP, key)
        if row is None:
            return "unknown", None
        stamp, present, text = row
        if present not in (0, 1) or not isinstance(stamp, (int, float)):
            return "unknown", None
        ttl = self.positive_ttl if present else self.negative_ttl
        if stamp <= self.clock() - ttl:
            return "unknown", None
        if not present:
            return "absent", None
        return ("present", text) if isinstance(text, str) else ("unknown", None)

    def record(self, cache_uri: str, hash_part: str, narinfo_text: str | None) -> None:
        """Remember a look-up: the narinfo text, or None for "absent"."""
        _check_hash_part(hash_part)
        with self._mutex:
            self._pending[(cache_uri, hash_part)] = (
                cache_uri, hash_part, self.clock(), int(narinfo_text is not None), narinfo_text)
            if len(self._pending) < FLUSH_EVERY:
                return
        self.flush()

    def warm(self, cache_uri: str, hash_parts: list[str]) -> None:
        """Read the entries of ``hash_parts`` at once, for the ``lookup``s to come."""
        if self.refresh:
            return
        for h in hash_parts:
            _check_hash_part(h)
        with self._mutex:
            conn = self._open()
            if conn is None:
                return
            try:
                for i in range(0, len(hash_parts), 500):
                    chunk = hash_parts[i:i + 500]
                    self._warm.update(((cache_uri, h), None) for h in chunk)
                    rows = conn.execute(
                        "select hashPart, time, present, narinfo from NarInfos where cache = ?"
                        f" and hashPart in ({','.join('?' * len(chunk))})",
                        (cache_uri, *chunk)).fetchall()
                    self._warm.update(((cache_uri, r[0]), r[1:]) for r in rows)
            except sqlite3.Error as e:
                log.debug("narinfo cache %s: %s", self.path, e)

    def flush(self) -> None:
        """Write the recorded entries (one transaction) and forget read-ahead ones."""
        with self._mutex:
            self._warm.clear()
            rows, self._pending = list(self._pending.values()), {}
            if not rows:
                return
            conn = self._open()
            if conn is None:
                return
            try:
                conn.execute("begin;")
                try:
                    conn.executemany("insert or replace into NarInfos"
                                     " (cache, hashPart, time, present, narinfo)"
                                     " values (?, ?, ?, ?, ?)", rows)
                    conn.execute("commit;")
                except BaseException:
                    conn.execute("rollback;")
                    raise
            except sqlite3.Error as e:
                log.debug("narinfo cache %s: %s", self.path, e)

    # --- nix-cache-info ------------------------------------------------------------------

    def lookup_cache_info(self, cache_uri: str) -> str | None:
        """The remembered ``nix-cache-info`` text (empty: the file was absent)."""
        if self.refresh:
            return None
        row = self._fetch("select time, text from CacheInfos where cache = ?", (cache_uri,))
        if row is None or not isinstance(row[1], str) or not isinstance(row[0], (int, float)):
            return None
        return row[1] if row[0] > self.clock() - CACHE_INFO_TTL else None

    def record_cache_info(self, cache_uri: str, text: str) -> None:
        self._store("insert or replace into CacheInfos (cache, time, text) values (?, ?, ?)",
                    (cache_uri, self.clock(), text))

    # --- the database ------------------------------------------------------------------

    def _fetch(self, sql: str, args: tuple) -> tuple | None:
        with self._mutex:
            return self._fetch_locked(sql, args)

    def _fetch_locked(self, sql: str, args: tuple) -> tuple | None:
        conn = self._open()
        if conn is None:
            return None
        try:
            return conn.execute(sql, args).fetchone()
        except sqlite3.Error as e:
            log.debug("narinfo cache %s: %s", self.path, e)
            return None

    def _store(self, sql: str, args: tuple) -> None:
        with self._mutex:
            conn = self._open()
            if conn is None:
                return
            try:
                conn.execute(sql, args)
            except sqlite3.Error as e:
                log.debug("narinfo cache %s: %s", self.path, e)

    def _open(self) -> sqlite3.Connection | None:
        """The connection (opened on first use); None once found unusable."""
        if self._conn is not None or self._unusable:
            return self._conn
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS,
                                   isolation_level=None, check_same_thread=False)
            try:
                conn.execute("pragma synchronous = off;")
                conn.execute("pragma journal_mode = wal;")
                conn.executescript(_SCHEMA)
                self._purge(conn)
            except BaseException:
                conn.close()
                raise
        except (OSError, sqlite3.Error) as e:
            log.warning("not using the narinfo cache %s: %s", self.path, e)
            self._unusable = True
            return None
        self._conn = conn
        return conn

    def _purge(self, conn: sqlite3.Connection) -> None:
        """Drop expired entries, at most once per ``PURGE_INTERVAL`` (as Nix)."""
        now = self.clock()
        row = conn.execute("select value from LastPurge where dummy = ''").fetchone()
        if row is not None and isinstance(row[0], (int, float)) and row[0] > now - PURGE_INTERVAL:
            return
        conn.execute("begin immediate;")
        try:
            conn.execute("delete from NarInfos where (present = 0 and time < ?)"
                         " or (present = 1 and time < ?)",
                         (now - self.negative_ttl, now - self.positive_ttl))
            conn.execute("delete from CacheInfos where time < ?", (now - CACHE_INFO_TTL,))
            conn.execute("insert or replace into LastPurge (dummy, value) values ('', ?)", (now,))
            conn.execute("commit;")
        except BaseException:
            conn.execute("rollback;")
            raise


def _check_hash_part(hash_part: str) -> None:
    """Callers pass validated 32-character nix32 text; refuse anything else."""
    if not hash_part.isalnum():
        raise ValueError(f"bad hash part '{hash_part}'")
