"""Store verification: ``nix-store --verify [--check-contents] [--repair]``.

Holds ``verify_store``, the VerifyStore operation as Nix 2.8's
``LocalStore::verifyStore`` / ``verifyPath`` do it (spec §10): with the GC
lock held shared, every valid path whose directory entry is gone is
invalidated (after its referrers, so that a missing closure goes as a
whole) or, if a present path still refers to it, reported or repaired;
with ``check_contents`` every ``.links`` entry and every valid path is
hashed again, a missing hash or size filled in.  The messages are Nix's,
word for word, at Nix's levels: plain lines for ``printInfo`` /
``printError`` and ``error:`` / ``warning:`` prefixed lines where Nix
logs an error or a warning object.

Process: session (the supervisor side, which owns the store).

Trust: the store's files may have been changed behind the daemon's back;
they are only read (NAR writer, ``O_NOFOLLOW``) and hashed.  The database
is the store's record and is changed only to invalidate paths whose
directory is gone and to fill in an all-zero hash or a zero size with the
values just computed.  Repairing is left to the caller's ``repair_path``
(the session decides whether the client may repair; Nix refuses untrusted
clients with "you are not privileged to repair paths").
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

from nixwarden.shared import nar
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.hashes import Hash, HashAlgo
from nixwarden.shared.logtypes import Verbosity, error_line, warning_line
from nixwarden.shared.storepath import BadStorePath, StoreDir
from nixwarden.supervisor.store.layout import StoreLayout
from nixwarden.supervisor.store.locks import gc_lock

#: ``log(level, text)``: one message line for the client (Verbosity level).
LogFn = Callable[[int, str], None]
#: Repairs one path (re-substitution, else rebuilding its deriver); returns
#: False when it cannot, or raises ``StoreRefusal`` with the reason.
RepairFn = Callable[[str], bool]


@dataclass
class _Frame:
    """A missing path whose referrers are being verified first."""

    path: str
    referrers: list[str]
    pending: list[str] = field(default_factory=list)


class _Verifier:
    def __init__(self, layout: StoreLayout, db, *, repair: bool, log: LogFn,
                 repair_path: RepairFn | None):
        self.layout = layout
        self.db = db
        self.store_dir = StoreDir(layout.store_dir)
        self.repair = repair
        self.log = log
        self.repair_path = repair_path
        self.errors = False
        self.present: set[str] = set()
        self.done: set[str] = set()
        self.valid: set[str] = set()

    # -- path existence (Nix's verifyPath) ------------------------------------

    def check_existence(self) -> None:
        self.present = set(os.listdir(self.layout.real_store_dir))
        self.log(Verbosity.INFO, "checking path existence...")
        for path in self.db.query_all_valid_paths():
            self._verify_path(path)

    def _verify_path(self, start: str) -> None:
        """Nix's recursive ``verifyPath``, with an explicit stack."""
        frame = self._visit(start)
        stack = [frame] if frame else []
        while stack:
            top = stack[-1]
            if top.pending:
                child = self._visit(top.pending.pop(0))
                if child:
                    stack.append(child)
                continue
            stack.pop()
            self._settle_missing(top)

    def _visit(self, path: str) -> _Frame | None:
        """First look at ``path``; a frame if it is missing (referrers next)."""
        if path in self.done:
            return None
        self.done.add(path)
        try:
            base = self.store_dir.parse(path).base
        except BadStorePath:
            self.log(Verbosity.ERROR, f"path '{path}' is not in the Nix store")
            return None
        if base in self.present:
            self.valid.add(path)
            return None
        referrers = [r for r in self.db.query_referrers(path) if r != path]
        return _Frame(path, referrers, list(referrers))

    def _settle_missing(self, frame: _Frame) -> None:
        """Invalidate a missing path, or report it if a present path needs it."""
        path = frame.path
        if not any(r in self.valid for r in frame.referrers):
            self.log(Verbosity.INFO, f"path '{path}' disappeared, removing from database...")
            try:
                self.db.invalidate_path(path)
            except StoreRefusal as e:
                # A referrer that is missing too but could not go (Nix
                # would stop here on the foreign key).
                self.log(Verbosity.ERROR, error_line(str(e)))
                self.errors = True
            return
        self.log(Verbosity.ERROR,
                 f"path '{path}' disappeared, but it still has valid referrers!")
        if not self.repair:
            self.errors = True
            return
        try:
            self._repair(path)
        except StoreRefusal as e:
            self.log(Verbosity.WARN, warning_line(str(e)))
            self.errors = True

    def _repair(self, path: str) -> None:
        """Raises StoreRefusal "cannot repair path '…'" unless it was repaired."""
        if self.repair_path is None or not self.repair_path(path):
            raise StoreRefusal(f"cannot repair path '{path}'")

    # -- contents ---------------------------------------------------------------

    def check_links(self) -> None:
        self.log(Verbosity.INFO, "checking link hashes...")
        links_dir = self.layout.links_dir
        names = os.listdir(links_dir)
        hashed = _hashed(lambda name: nar.nar_hash_of_path(f"{links_dir}/{name}")[0], names)
        for name, digest in zip(names, hashed):
            self.log(Verbosity.TALKATIVE, f"checking contents of '{name}'")
            link_path = f"{links_dir}/{name}"
            got = digest.result().to_nix32()
            if got == name:
                continue
            self.log(Verbosity.ERROR, f"link '{link_path}' was modified! "
                                      f"expected hash '{name}', got '{got}'")
            if not self.repair:
                self.errors = True
                continue
            try:
                os.unlink(link_path)
            except OSError as e:
                raise StoreRefusal(f"removing corrupt link '{link_path}': "
                                   f"{os.strerror(e.errno or 0)}") from None
            self.log(Verbosity.INFO, f"removed link '{link_path}'")

    def check_hashes(self) -> None:
        self.log(Verbosity.INFO, "checking store hashes...")
        paths = sorted(self.valid)
        records = [self._recorded(path) for path in paths]
        hashed = _hashed(lambda job: nar.nar_hash_of_path(self.layout.real_path(job[0]),
                                                          job[1].algo),
                         [(p, r[0]) for p, r in zip(paths, records) if isinstance(r, tuple)])
        for path, record in zip(paths, records):
            try:
                if not isinstance(record, tuple):
                    raise record
                self.log(Verbosity.TALKATIVE, f"checking contents of '{path}'")
                self._check_hash(path, *record, *next(hashed).result())
            except (StoreRefusal, OSError, ValueError) as e:
                # The path may have been collected meanwhile: only a warning then.
                text = _error_text(e)
                if self.db.is_valid(path):
                    self.log(Verbosity.ERROR, error_line(text))
                else:
                    self.log(Verbosity.WARN, warning_line(text))
                self.errors = True

    def _recorded(self, path: str) -> tuple[Hash, int] | StoreRefusal:
        """The recorded NAR hash and size of ``path``, or the error to report."""
        info = self.db.query_path_info(path)
        if info is None:
            return StoreRefusal(f"path '{path}' is not valid")
        try:
            return Hash.parse(info.nar_hash), info.nar_size
        except ValueError as e:
            return StoreRefusal(f"invalid-path entry for '{path}': {e}")

    def _check_hash(self, path: str, expected: Hash, nar_size: int,
                    current: Hash, size: int) -> None:
        missing = expected == Hash(HashAlgo.SHA256, bytes(32))
        if not missing and expected != current:
            self.log(Verbosity.ERROR, f"path '{path}' was modified! expected hash "
                                      f"'{expected.to_prefixed()}', got '{current.to_prefixed()}'")
            if self.repair:
                self._repair(path)
            else:
                self.errors = True
            return
        self._fill_in(path, current if missing else None, size if nar_size == 0 else None)

    def _fill_in(self, path: str, new_hash: Hash | None, new_size: int | None) -> None:
        """Nix's ``updatePathInfo`` for a missing hash or narSize."""
        if new_hash is not None:
            self.log(Verbosity.INFO, f"fixing missing hash on '{path}'")
        if new_size is not None:
            self.log(Verbosity.INFO, f"updating size field on '{path}' to {new_size}")
        if new_hash is not None or new_size is not None:
            self.db.update_path_info(
                path, nar_hash=None if new_hash is None else new_hash.to_prefixed("base16"),
                nar_size=new_size)


#: Paths hashed at once: hashing and reading release the GIL, so a
#: ``--check-contents`` uses the machine's cores (Nix 2.8 hashes one path
#: at a time).  Results are taken in order, so the messages are Nix's.
HASH_THREADS = max(1, min(4, os.cpu_count() or 1))


def _hashed(hash_one: Callable, items: list) -> Iterator:
    """Futures of ``hash_one(item)`` for ``items``, in order, computed on
    ``HASH_THREADS`` threads while the caller goes through them (only file
    reads and hashing run there: no database, no client log)."""
    pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="verify")
    try:
        for future in [pool.submit(hash_one, item) for item in items]:
            yield future
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _gc_lock_shared(layout: StoreLayout, log: LogFn) -> Iterator[None]:
    """``gc.lock`` shared, telling the client when it has to wait (Nix's FdLock)."""
    with gc_lock(layout, exclusive=False, wait=False) as acquired:
        if acquired:
            yield
            return
    log(Verbosity.INFO, "waiting for the big garbage collector lock...")
    with gc_lock(layout, exclusive=False):
        yield


def _error_text(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"getting status of '{e.filename}': {e.strerror}"
    return str(e)


def verify_store(layout: StoreLayout, db, *, check_contents: bool, repair: bool,
                 log: LogFn, repair_path: RepairFn | None = None) -> bool:
    """Verify (and with ``repair``, repair) the store (spec §10).

    Args:
        db: the ``StoreDB``.
        check_contents: also re-hash ``.links`` and every valid path.
        repair: remove corrupt links, repair modified or missing paths.
            The caller must already have refused untrusted clients.
        log: ``log(level, text)`` for the client; texts as Nix prints them.
        repair_path: repairs one path (see ``RepairFn``); None means no
            repair is possible ("cannot repair path '…'").
    Returns:
        Whether errors remain (the client then warns "not all store
        errors were fixed" and exits 1).
    Raises:
        StoreRefusal: a corrupt link could not be removed.
        OSError: the store or ``.links`` directory could not be read.
    """
    log(Verbosity.INFO, "reading the Nix store...")
    run = _Verifier(layout, db, repair=repair, log=log, repair_path=repair_path)
    with _gc_lock_shared(layout, log):
        run.check_existence()
        if check_contents:
            run.check_links()
            run.check_hashes()
    return run.errors
