"""The local store's SQLite database, shared with CppNix (spec §2, §4.3–§5).

Holds ``StoreDB``: opening (big-lock, schema file, creation with exactly the
Nix 2.8 schema, per-connection pragmas), the path-info queries and the
registration / invalidation transactions.  This is the only module that
imports ``sqlite3`` and the only one that contains SQL (STYLE.md 2.7).

Runs in the supervisor process; workers never get a database handle
(DESIGN.md §2.1).

Trust: the database file is shared with real Nix tools running as the store
owner, so rows are trusted as the store's record, but tolerated in every
form Nix writes (NULL or '' for absent values, extra tables from newer
versions).  ``PathInfo`` values to register come from supervisor code that
has already verified content, hash and size; this module enforces only the
database invariants (references valid or in the batch, no cycles, no
invalidation of a path that is still referenced).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sqlite3
import threading
import time
import urllib.parse
from typing import Callable, Iterable, Iterator, TypeVar

from nixwarden.shared.errors import StoreRefusal
from nixwarden.supervisor.store import locks
from nixwarden.supervisor.store.layout import StoreLayout
from nixwarden.supervisor.store.pathinfo import PathInfo, check_acyclic

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``nixSchemaVersion`` in every release from 2.8 to master (spec §2.2).
NIX_SCHEMA_VERSION = 10
#: ``sqlite3_busy_timeout(3600000)`` (spec §2.1).
BUSY_TIMEOUT_SECONDS = 3600.0
#: SQLite primary result codes that Nix retries (``SQLiteBusy``).
_SQLITE_BUSY = 5
_SQLITE_PROTOCOL = 15
#: Bound on the number of host parameters per statement.
_IN_CHUNK = 500
#: Length of a store path hash part.
HASH_PART_LEN = 32

# The Nix 2.8 schema script (spec §2.3; upstream ``schema.sql``), run once
# on a new database.  The comments inside statements end up in
# ``sqlite_master`` exactly as with real Nix.
_SCHEMA_SQL = """\
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies "false"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);

create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);

create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);

create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;

create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);

create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
"""

_INSERT_PATH = ("insert into ValidPaths (path, hash, registrationTime, deriver, narSize,"
                " ultimate, sigs, ca) values (?, ?, ?, ?, ?, ?, ?, ?);")
_UPDATE_PATH = ("update ValidPaths set narSize = ?, hash = ?, ultimate = ?, sigs = ?,"
                " ca = ? where path = ?;")
_SET_HASH = "update ValidPaths set hash = ? where path = ?;"
_SET_NAR_SIZE = "update ValidPaths set narSize = ? where path = ?;"
_ADD_REF = "insert or replace into Refs (referrer, reference) values (?, ?);"
_ADD_DRV_OUTPUT = "insert or replace into DerivationOutputs (drv, id, path) values (?, ?, ?);"
# The row and its references in one statement, so one read transaction (a
# statement's own transaction costs SQLite several lock calls in WAL mode).
# Store paths hold no spaces, so the references can travel space-joined.
_QUERY_INFO = ("select v.hash, v.registrationTime, v.deriver, v.narSize, v.ultimate, v.sigs,"
               " v.ca, (select group_concat(r.path, ' ') from Refs join ValidPaths r"
               " on reference = r.id where referrer = v.id)"
               " from ValidPaths v where v.path = ?;")
_QUERY_REFERENCES_OF_PATH = ("select path from Refs join ValidPaths on reference = id"
                             " where referrer = (select id from ValidPaths where path = ?);")
_QUERY_REFERRERS = ("select path from Refs join ValidPaths on referrer = id"
                    " where reference = (select id from ValidPaths where path = ?);")
_QUERY_VALID_DERIVERS = ("select v.id, v.path from DerivationOutputs d join ValidPaths v"
                         " on d.drv = v.id where d.path = ?;")
_QUERY_DRV_OUTPUTS = "select id, path from DerivationOutputs where drv = ?;"
_QUERY_FROM_HASH_PART = "select path from ValidPaths where path >= ? limit 1;"
_QUERY_ALL = "select path from ValidPaths;"
_QUERY_ID = "select id from ValidPaths where path = ?;"
_INVALIDATE = "delete from ValidPaths where path = ?;"
_QUERY_REALISATION = ("select Realisations.id, ValidPaths.path, Realisations.signatures"
                      " from Realisations join ValidPaths on ValidPaths.id = Realisations.outputPath"
                      " where drvPath = ? and outputName = ?")


def _is_busy(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is None:
        return "locked" in str(e) or "busy" in str(e)
    return code & 0xFF in (_SQLITE_BUSY, _SQLITE_PROTOCOL)


def _retry_busy(fun: Callable[[], T]) -> T:
    """Run ``fun`` until it does not fail with SQLITE_BUSY (Nix's retrySQLite)."""
    while True:
        try:
            return fun()
        except sqlite3.OperationalError as e:
            if not _is_busy(e):
                raise
            log.warning("SQLite database is busy, retrying")
            time.sleep(random.uniform(0.0, 0.1))


def _show_paths(paths: Iterable[str]) -> str:
    return ", ".join(f"'{p}'" for p in paths)


class StoreDB:
    """An open store database; holds the shared big-lock until ``close``.

    Thread-safe (one connection, serialised by a lock).  All paths are full
    logical store paths.
    """

    def __init__(self, layout: StoreLayout, conn: sqlite3.Connection, big_lock_fd: int):
        self.layout = layout
        self._conn: sqlite3.Connection | None = conn
        self._big_lock_fd: int | None = big_lock_fd
        self._mutex = threading.RLock()
        self._txn_depth = 0

    # -- opening --------------------------------------------------------------

    @classmethod
    def open(cls, layout: StoreLayout, *, ensure_layout: bool = True) -> "StoreDB":
        """Open (creating if new) the database of ``layout`` (spec §2.2).

        With ``ensure_layout`` the §1.2 directories and ``db/reserved`` are
        created first, as Nix's ``LocalStore`` constructor does.

        Raises:
            StoreRefusal: the schema is newer than 10, too old, or corrupt.
        """
        if ensure_layout:
            layout.ensure_directories(as_root=os.getuid() == 0)
            layout.ensure_reserved()
        else:
            os.makedirs(layout.db_dir, mode=0o755, exist_ok=True)
        fd = locks.open_lock_file(layout.big_lock_path, create=True)
        assert fd is not None
        try:
            if not locks.flock(fd, exclusive=False, wait=False):
                log.info("waiting for the big Nix store lock...")
                locks.flock(fd, exclusive=False, wait=True)
            conn = _open_checked(layout, fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(layout, conn, fd)

    def close(self) -> None:
        """Close the connection and release the big-lock (idempotent)."""
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._big_lock_fd is not None:
                os.close(self._big_lock_fd)
                self._big_lock_fd = None

    def __enter__(self) -> "StoreDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("store database is closed")
        return self._conn

    # -- transactions -----------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator["StoreDB"]:
        """A write transaction; nested uses join the outermost one.

        Uses ``begin immediate`` so that the write lock is taken up front
        (waiting up to the busy timeout) and the body never hits
        SQLITE_BUSY halfway.  Rolled back on any exception.
        """
        with self._mutex:
            if self._txn_depth:
                self._txn_depth += 1
                try:
                    yield self
                finally:
                    self._txn_depth -= 1
                return
            _retry_busy(lambda: self.conn.execute("begin immediate;"))
            self._txn_depth = 1
            try:
                yield self
                self.conn.execute("commit;")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("rollback;")
                raise
            finally:
                self._txn_depth = 0

    def _write(self, fun: Callable[[], T]) -> T:
        """Run ``fun`` in a transaction, retried as a whole on SQLITE_BUSY."""
        with self._mutex:
            if self._txn_depth:
                return fun()

            def attempt() -> T:
                with self.transaction():
                    return fun()
            return _retry_busy(attempt)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._mutex:
            try:
                return self.conn.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                if not _is_busy(e):
                    raise
            return _retry_busy(lambda: self.conn.execute(sql, args).fetchall())

    # -- queries ----------------------------------------------------------------

    def _path_id(self, path: str) -> int | None:
        rows = self._read(_QUERY_ID, (path,))
        return rows[0][0] if rows else None

    def is_valid(self, path: str) -> bool:
        """Whether ``path`` has a ValidPaths row (file existence not checked)."""
        return self._path_id(path) is not None

    def valid_subset(self, paths: Iterable[str]) -> set[str]:
        """The members of ``paths`` that are valid."""
        wanted = sorted(set(paths))
        found: set[str] = set()
        for i in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[i:i + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            rows = self._read(f"select path from ValidPaths where path in ({marks});",
                              tuple(chunk))
            found.update(r[0] for r in rows)
        return found

    def query_path_info(self, path: str) -> PathInfo | None:
        """The path's info, or None if it is not valid (spec §4.5)."""
        rows = self._read(_QUERY_INFO, (path,))
        if not rows:
            return None
        nar_hash, reg_time, deriver, nar_size, ultimate, sigs, ca, refs = rows[0]
        return PathInfo(
            path=path,
            deriver=deriver or None,
            nar_hash=nar_hash,
            references=tuple(sorted(refs.split(" "))) if refs else (),
            registration_time=reg_time or 0,
            nar_size=nar_size or 0,
            ultimate=ultimate == 1,
            sigs=tuple(sorted(s for s in (sigs or "").split(" ") if s)),
            ca=ca or None,
        )

    def closure(self, roots: Iterable[str], visit: Callable[[str], None] | None = None
                ) -> set[str]:
        """``roots`` and every path they refer to, transitively (Nix's
        ``computeFSClosure``), each walk one recursive query (one read
        transaction, however deep the closure); ``visit(path)`` then runs
        for each.  Invalid roots are included, without references."""
        wanted = sorted(set(roots))
        found = set(wanted)
        for i in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[i:i + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            rows = self._read(
                "with recursive closure(id) as ("
                f" select id from ValidPaths where path in ({marks})"
                " union select reference from Refs join closure on Refs.referrer = closure.id)"
                " select path from ValidPaths where id in (select id from closure);",
                tuple(chunk))
            found.update(r[0] for r in rows)
        if visit is not None:
            for path in sorted(found):
                visit(path)
        return found

    def query_references(self, path: str) -> list[str]:
        """Sorted references of a valid path ([] if it is not valid)."""
        return sorted(r[0] for r in self._read(_QUERY_REFERENCES_OF_PATH, (path,)))

    def query_referrers(self, path: str) -> list[str]:
        """Sorted valid paths referring to ``path`` (including itself if so)."""
        return sorted(r[0] for r in self._read(_QUERY_REFERRERS, (path,)))

    def query_all_valid_paths(self) -> list[str]:
        return sorted(r[0] for r in self._read(_QUERY_ALL))

    def query_path_from_hash_part(self, hash_part: str,
                                  store_dir: str | None = None) -> str | None:
        """The valid path whose hash part is ``hash_part``, if any.

        Raises:
            ValueError: ``hash_part`` is not 32 characters long.
        """
        if len(hash_part) != HASH_PART_LEN:
            raise ValueError("invalid hash part")
        prefix = (store_dir or self.layout.store_dir) + "/" + hash_part
        rows = self._read(_QUERY_FROM_HASH_PART, (prefix,))
        if rows and rows[0][0].startswith(prefix):
            return rows[0][0]
        return None

    def query_valid_derivers(self, path: str) -> list[str]:
        """Valid ``.drv`` paths that list ``path`` among their outputs."""
        return sorted({r[1] for r in self._read(_QUERY_VALID_DERIVERS, (path,))})

    def query_derivation_outputs(self, drv_path: str) -> dict[str, str]:
        """Output name -> output path from DerivationOutputs ({} if not valid)."""
        with self._mutex:
            drv_id = self._path_id(drv_path)
            if drv_id is None:
                return {}
            return dict(self._read(_QUERY_DRV_OUTPUTS, (drv_id,)))

    # -- realisations (ca-derivations) ---------------------------------------

    def _has_table(self, name: str) -> bool:
        return bool(self._read("select 1 from sqlite_master where type = 'table' and name = ?",
                               (name,)))

    def ensure_ca_schema(self) -> None:
        """Create Nix 2.8's ``Realisations`` tables if they are missing.

        Tables a newer Nix created are used as they are.
        """
        def run() -> None:
            for statement in _CA_SCHEMA:
                self.conn.execute(statement)
        self._write(run)
        schema_file = os.path.join(self.layout.db_dir, "ca-schema")
        if not os.path.exists(schema_file):
            with open(schema_file, "w") as f:
                f.write("3")

    def register_realisation(self, drv_output: str, output_name: str, out_path: str,
                             signatures: Iterable[str] = (),
                             dependents: Iterable[tuple[str, str, str]] = ()) -> None:
        """Record that ``drv_output`` (``sha256:<hex>``) ! ``output_name`` is ``out_path``.

        ``dependents``: (drv output, output name, path) of the realisations
        of inputs that the output refers to (Nix's ``dependentRealisations``,
        rows of ``RealisationsRefs``); each must be known here and point to
        that path.

        Raises:
            StoreRefusal: a dependent realisation is unknown or differs.
        """
        dependents = list(dependents)

        def run() -> None:
            out_id = self._require_id(out_path)
            row = self.conn.execute(
                "select id from Realisations where drvPath = ? and outputName = ?",
                (drv_output, output_name)).fetchone()
            sigs = " ".join(sorted(set(signatures)))  # never NULL: Nix 2.8 reads it as text
            if row is None:
                row = (self.conn.execute(
                    "insert into Realisations (drvPath, outputName, outputPath, signatures) "
                    "values (?, ?, ?, ?)", (drv_output, output_name, out_id, sigs)).lastrowid,)
            this = f"{drv_output}!{output_name}"
            for dep_output, dep_name, dep_path in dependents:
                dep = self.conn.execute(_QUERY_REALISATION, (dep_output, dep_name)).fetchone()
                if dep is None:
                    raise StoreRefusal(f"unable to register the derivation '{this}' as it "
                                       f"depends on the non existent '{dep_output}!{dep_name}'")
                if dep[1] != dep_path:
                    raise StoreRefusal(f"unable to register the derivation '{this}' as it "
                                       f"depends on a realisation of '{dep_output}!{dep_name}' "
                                       f"that doesn’t point to '{dep_path}'")
                # (Nix 2.8 inserts again on every registration; one row is enough)
                self.conn.execute(
                    "insert into RealisationsRefs (referrer, realisationReference)"
                    " select ?, ? where not exists (select 1 from RealisationsRefs"
                    " where referrer = ? and realisationReference = ?)",
                    (row[0], dep[0], row[0], dep[0]))
        self._write(run)

    def query_realisation(self, drv_output: str, output_name: str
                          ) -> tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]] | None:
        """(output path, signatures, dependent realisations as (``<drv
        output>!<name>``, path)) of a realisation, if known and valid."""
        if not self._has_table("Realisations"):
            return None
        with self._mutex:
            rows = self._read(_QUERY_REALISATION + ";", (drv_output, output_name))
            if not rows:
                return None
            row_id, path, sigs = rows[0]
            deps = self._read(
                "select r.drvPath, r.outputName, v.path from RealisationsRefs x"
                " join Realisations r on r.id = x.realisationReference"
                " join ValidPaths v on v.id = r.outputPath where x.referrer = ?", (row_id,))
        return (path, tuple((sigs or "").split()),
                tuple(sorted((f"{d}!{n}", p) for d, n, p in deps)))

    def query_deriver(self, path: str) -> str | None:
        info = self.query_path_info(path)
        return info.deriver if info else None

    # -- registration -------------------------------------------------------------

    def register_valid_paths(self, infos: list[PathInfo],
                             derivation_outputs: dict[str, dict[str, str]] | None = None
                             ) -> None:
        """Register ``infos`` in one transaction (spec §4.3).

        Existing rows are updated (keeping id, deriver, registrationTime, as
        Nix's UpdatePathInfo does).  ``derivation_outputs`` maps a ``.drv``
        path (valid or in the batch) to its statically known outputs.

        Raises:
            StoreRefusal: a reference is neither valid nor in the batch, or
                the batch's references form a cycle; nothing is changed.
        """
        batch = {i.path: i for i in infos}
        check_acyclic(batch)

        def run() -> None:
            now = int(time.time())
            for info in batch.values():
                self._upsert(info, now)
            for info in batch.values():
                referrer = self._require_id(info.path)
                for ref in info.references:
                    self.conn.execute(_ADD_REF, (referrer, self._require_id(ref)))
            for drv, outputs in (derivation_outputs or {}).items():
                drv_id = self._require_id(drv)
                for name, out in sorted(outputs.items()):
                    self.conn.execute(_ADD_DRV_OUTPUT, (drv_id, name, out))
        self._write(run)

    def _upsert(self, info: PathInfo, now: int) -> None:
        nar_size = info.nar_size or None
        ultimate = 1 if info.ultimate else None
        sigs = " ".join(info.sigs) or None
        if self._path_id(info.path) is not None:
            self.conn.execute(_UPDATE_PATH, (nar_size, info.nar_hash, ultimate, sigs,
                                             info.ca, info.path))
        else:
            self.conn.execute(_INSERT_PATH, (
                info.path, info.nar_hash, info.registration_time or now, info.deriver,
                nar_size, ultimate, sigs, info.ca))

    def _require_id(self, path: str) -> int:
        path_id = self._path_id(path)
        if path_id is None:
            raise StoreRefusal(f"path '{path}' is not valid")
        return path_id

    def add_signatures(self, path: str, sigs: Iterable[str]) -> None:
        """Add signatures to a valid path's ``sigs`` (kept sorted, unique).

        Raises:
            StoreRefusal: the path is not valid.
        """
        def run() -> None:
            info = self.query_path_info(path)
            if info is None:
                raise StoreRefusal(f"path '{path}' is not valid")
            merged = " ".join(sorted(set(info.sigs) | {s for s in sigs if s})) or None
            self.conn.execute(_UPDATE_PATH, (info.nar_size or None, info.nar_hash,
                                             1 if info.ultimate else None, merged,
                                             info.ca, path))
        self._write(run)

    def update_path_info(self, path: str, *, nar_hash: str | None = None,
                         nar_size: int | None = None) -> None:
        """Fill in a valid path's ``hash`` and/or ``narSize`` (spec §10).

        What Nix's ``UpdatePathInfo`` does when ``verifyStore`` repairs a
        missing (all-zero) hash or size; the other columns are unchanged.
        ``nar_hash`` is written as given (``sha256:<base16>``).

        Raises:
            StoreRefusal: the path is not valid.
        """
        def run() -> None:
            self._require_id(path)
            if nar_hash is not None:
                self.conn.execute(_SET_HASH, (nar_hash, path))
            if nar_size is not None:
                self.conn.execute(_SET_NAR_SIZE, (nar_size or None, path))
        self._write(run)

    def invalidate_path(self, path: str) -> None:
        """Remove ``path`` from the database (no-op if it is not valid).

        Raises:
            StoreRefusal: another valid path still refers to it.
        """
        self.invalidate_paths([path])

    def invalidate_paths(self, paths: Iterable[str]) -> None:
        """Remove ``paths``, referrers first, from the database in one transaction.

        Paths that are not valid are passed over.

        Raises:
            StoreRefusal: a valid path outside ``paths`` (or later in it)
                still refers to one of them; then none is removed.
        """
        paths = list(paths)  # (run again as a whole when the database is busy)

        def run() -> None:
            for path in paths:
                if self._path_id(path) is None:
                    continue
                others = [p for p in self.query_referrers(path) if p != path]
                if others:
                    raise StoreRefusal(f"cannot delete path '{path}' because it is in use by "
                                       f"{_show_paths(others)}")
                self.conn.execute(_INVALIDATE, (path,))
        self._write(run)


# -- opening helpers -----------------------------------------------------------


def _open_checked(layout: StoreLayout, big_lock_fd: int) -> sqlite3.Connection:
    """Steps 2–6 of spec §2.2, with the shared big-lock already held."""
    try:
        schema = layout.read_schema_version()
    except ValueError as e:
        raise StoreRefusal(str(e)) from None
    if schema > NIX_SCHEMA_VERSION:
        raise StoreRefusal(f"current Nix store schema is version {schema}, "
                           f"but I only support {NIX_SCHEMA_VERSION}")
    if schema == 0:
        return _create(layout)
    if schema < NIX_SCHEMA_VERSION:
        return _upgrade(layout, big_lock_fd, schema)
    return _connect(layout.db_path, create=False)


def _create(layout: StoreLayout) -> sqlite3.Connection:
    """Create a new database, as Nix does, under the shared big-lock only.

    Several processes may do this at once: the schema is created in one
    SQLite write transaction of ``if not exists`` statements (so they take
    turns and nobody sees half of it), and ``db/schema`` is replaced
    atomically.  Upgrading the shared big-lock to exclusive here instead
    would deadlock: a pooled session holds it shared while it waits for a
    connection, and two processes upgrading at once wait for each other.
    """
    conn = _connect(layout.db_path, create=True)
    try:
        conn.executescript(f"begin immediate;\n{_SCHEMA_SQL}\ncommit;")
    except BaseException:
        conn.close()
        raise
    layout.write_schema_version(NIX_SCHEMA_VERSION)
    return conn


def _upgrade(layout: StoreLayout, big_lock_fd: int, schema: int) -> sqlite3.Connection:
    """Upgrade schema 7–9 to 10 under the exclusive big-lock."""
    if schema < 7:
        raise StoreRefusal(f"Nix store schema version {schema} is too old; "
                           "upgrade it with an older Nix first")
    # Not a blocking upgrade of the shared lock: if another process upgrades
    # first, it keeps the lock shared afterwards (and so may a pooled session
    # that opens the upgraded store), and we would wait for them all.  A
    # failed conversion drops our shared lock, so take it back and look again.
    waited = False
    while not locks.flock(big_lock_fd, exclusive=True, wait=False):
        if not waited:
            log.info("waiting for exclusive access to the Nix store...")
            waited = True
        locks.flock(big_lock_fd, exclusive=False, wait=True)
        if layout.read_schema_version() >= NIX_SCHEMA_VERSION:
            return _connect(layout.db_path, create=False)
        time.sleep(0.1)
    schema = layout.read_schema_version()  # someone may have done it
    conn = _connect(layout.db_path, create=False)
    steps = [(8, ["alter table ValidPaths add column ultimate integer",
                  "alter table ValidPaths add column sigs text"]),
             (9, ["drop table if exists FailedPaths"]),
             (10, ["alter table ValidPaths add column ca text"])]
    for version, statements in steps:
        if schema < version:
            conn.execute("begin;")
            for sql in statements:
                conn.execute(sql)
            conn.execute("commit;")
    layout.write_schema_version(NIX_SCHEMA_VERSION)
    locks.flock(big_lock_fd, exclusive=False, wait=True)
    return conn


def _connect(db_path: str, create: bool) -> sqlite3.Connection:
    """Open the database and apply the per-connection pragmas of spec §2.1."""
    if not os.access(os.path.dirname(db_path), os.R_OK | os.W_OK):
        raise StoreRefusal(f"Nix database directory '{os.path.dirname(db_path)}' "
                           "is not writable")
    mode = "rwc" if create else "rw"
    uri = f"file:{urllib.parse.quote(db_path)}?mode={mode}"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_SECONDS,
                               isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise StoreRefusal(f"cannot open SQLite database '{db_path}': {e}") from None
    try:
        _retry_busy(lambda: _apply_pragmas(conn))
    except BaseException:
        conn.close()
        raise
    return conn


def _apply_pragmas(conn: sqlite3.Connection) -> None:
    conn.execute(f"pragma busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)};")
    conn.execute("pragma foreign_keys = 1;")
    conn.execute("pragma synchronous = normal;")
    (mode,) = conn.execute("pragma main.journal_mode;").fetchone()
    if mode.lower() != "wal":
        conn.execute("pragma main.journal_mode = wal;")
    conn.execute("pragma wal_autocheckpoint = 40000;")


# Nix 2.8's ca-specific-schema.sql (ca-schema version 3).
_CA_SCHEMA = (
    """create table if not exists Realisations (
        id integer primary key autoincrement not null,
        drvPath text not null,
        outputName text not null,
        outputPath integer not null,
        signatures text,
        foreign key (outputPath) references ValidPaths(id) on delete cascade)""",
    "create index if not exists IndexRealisations on Realisations(drvPath, outputName)",
    """create table if not exists RealisationsRefs (
        referrer integer not null,
        realisationReference integer,
        foreign key (referrer) references Realisations(id) on delete cascade,
        foreign key (realisationReference) references Realisations(id) on delete restrict)""",
    "create index if not exists IndexRealisationsRefs on RealisationsRefs(referrer)",
    "create index if not exists IndexRealisationsRefsOnOutputPath on Realisations(outputPath)",
)
