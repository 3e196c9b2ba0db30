"""Substitution: querying binary caches and fetching closures from them.

``Substituters`` holds a session's binary caches (the ``substituters``
setting, extra ones merged by the configuration, ordered by priority; none
when ``substitute`` is off or ``offline``) and answers Nix 2.8's
questions: ``query_infos`` (``LocalStore::querySubstitutablePathInfos``:
the first cache that has a path wins, signatures not considered),
``query_substitutable`` (``querySubstitutablePaths``: only caches that want
mass queries), and ``substitute``, which fetches the closures of paths as
``PathSubstitutionGoal`` does: references first (self-references ignored),
valid paths skipped, a cache whose narinfo lacks a trusted signature
skipped with Nix's warning, NARs streamed through ``StoreWriter.add_nar``
(hash, size and content address checked there, nothing registered on a
mismatch), failures logged and the next cache tried, up to
``max-substitution-jobs`` downloads at once, with the client activities
nix-daemon shows (substitute, copyPath, fileTransfer).  Process: session.

Caches of another store dir (``BinaryCache.foreign``, from a ``store=``
URL parameter or their ``nix-cache-info``) serve only paths whose content
address the caller knows (``cas``), as in Nix 2.8's ``tryNext``: the path
the content address gives without references in the cache's store dir is
looked up there, and a narinfo for exactly that path, with that content
address and no references, is taken as the info of our path (no
references, no deriver, no signatures: those belong to the other store).
Other paths are not looked up in such caches.

Trust: caches are untrusted network input.  A narinfo is used only if it
describes exactly the path asked for; unless the cache is marked
``trusted`` it must carry a signature by a key in ``trusted-public-keys``
or be content-addressed (checked here before downloading and again by the
writer); the decompressed NAR may not exceed the narinfo's ``NarSize`` and
must reach it; references come from the narinfo and are fetched (and so
checked) first, and a reference cycle fails instead of hanging.  A path
from a cache of another store dir is registered only with its content
address, which the writer checks against the content and our path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.logtypes import (ActivityType, ResultType, Verbosity, error_line,
                                       warning_line)
from nixwarden.shared.storepath import BadStorePath, ContentAddress, StoreDir
from nixwarden.supervisor.store import signatures
from nixwarden.supervisor.store.adding import NarClaim
from nixwarden.supervisor.store.caches import (BinaryCache, CacheDisabled, CacheFailure,
                                               CacheUnusable, open_cache)
from nixwarden.supervisor.store.narinfo import NarInfo
from nixwarden.supervisor.store.narinfo_cache import NarInfoDiskCache
from nixwarden.supervisor.store.transfer import Downloader



@dataclass(frozen=True)
class SubstitutableInfo:
    """What a cache says about a path (QuerySubstitutablePathInfos, QueryMissing)."""

    path: str
    deriver: str | None
    references: tuple[str, ...]
    download_size: int
    nar_size: int
    narinfo: NarInfo
    cache: BinaryCache


class SubstitutionFailure(str):
    """The error text of a path that could not be substituted.

    ``kind``: "no-substituter" (no cache has it: build it instead),
    "failed" (a cache had it but fetching failed: build only with
    ``fallback``), "dependency-failed" (a reference could not be realised).
    """

    kind: str

    def __new__(cls, text: str, kind: str) -> "SubstitutionFailure":
        obj = super().__new__(cls, text)
        obj.kind = kind
        return obj


def no_substituter(path: str, failed: bool = False) -> SubstitutionFailure:
    return SubstitutionFailure(
        f"path '{path}' is required, but there is no substituter that can build it",
        "failed" if failed else "no-substituter")


class Substituters:
    """The binary caches of one session (thread-safe; caches opened lazily)."""

    def __init__(self, settings, store_dir: StoreDir, state_dir: str, *,
                 offline: bool = False, refresh: bool = False, log=None):
        self.store_dir = store_dir
        self.enabled = bool(settings.get("substitute")) and not offline
        self.urls = list(dict.fromkeys(settings.get("substituters")))
        self.fallback = bool(settings.get("fallback"))
        self.http_connections = max(1, int(settings.get("http-connections")))
        self.max_jobs = max(1, int(settings.get("max-substitution-jobs")))
        self.log = log or (lambda level, text: None)
        self._current_log = None  # the client's log while ``substitute`` runs
        self.downloader = Downloader(
            connections=self.http_connections, connect_timeout=settings.get("connect-timeout"),
            stall_timeout=settings.get("stalled-download-timeout"),
            attempts=settings.get("download-attempts"),
            warn=lambda text: self._emit(Verbosity.WARN, warning_line(text)))
        self.disk_cache = NarInfoDiskCache.under_state_dir(
            state_dir, positive_ttl=settings.get("narinfo-cache-positive-ttl"),
            negative_ttl=settings.get("narinfo-cache-negative-ttl"), refresh=refresh)
        self._caches: list[BinaryCache] | None = None
        self._mutex = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.downloader.close()
        self.disk_cache.close()

    def _emit(self, level: int, text: str) -> None:
        (self._current_log or self.log)(level, text)

    def _lookup_pool(self) -> ThreadPoolExecutor:
        with self._mutex:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.http_connections,
                                                thread_name_prefix="narinfo")
            return self._pool

    # --- the caches ----------------------------------------------------------------------

    def caches(self) -> list[BinaryCache]:
        """The usable caches by priority; unusable ones are warned about once."""
        if not self.enabled:
            return []
        with self._mutex:
            if self._caches is not None:
                return self._caches
        opened = list(self._lookup_pool().map(self._open, self.urls))
        caches = sorted((c for c in opened if c is not None), key=lambda c: c.priority)
        with self._mutex:
            if self._caches is None:
                self._caches = caches
            return self._caches

    def _open(self, url: str) -> BinaryCache | None:
        try:
            return open_cache(url, store_dir=self.store_dir, downloader=self.downloader,
                              disk_cache=self.disk_cache, fallback=self.fallback,
                              log=self._emit)
        except CacheUnusable as e:
            self._emit(Verbosity.WARN, warning_line(str(e)))
            return None

    # --- queries -------------------------------------------------------------------------

    def query_infos(self, paths: Iterable[str], cas: Mapping[str, object] | None = None
                    ) -> dict[str, SubstitutableInfo]:
        """Substitutable infos of ``paths`` (first cache that has a path wins).

        ``cas`` maps paths to their content addresses (text as
        ``ContentAddress.render`` gives, or parsed; empty or None: unknown);
        only paths with one are looked up in caches of another store dir.

        Raises:
            StoreRefusal: a cache failed and ``fallback`` is off (Nix rethrows).
            ValueError: a malformed content address in ``cas``.
        """
        known = self._known_cas(cas)
        found = self._first_found(list(dict.fromkeys(paths)), self.caches(), known)
        return {p: SubstitutableInfo(p, i.deriver, i.references, i.file_size, i.nar_size, i, c)
                for p, (c, i) in found.items()}

    def query_substitutable(self, paths: Iterable[str]) -> set[str]:
        """The paths some mass-query cache has (QuerySubstitutablePaths)."""
        caches = [c for c in self.caches() if c.want_mass_query]
        return set(self._first_found(list(dict.fromkeys(paths)), caches, {}))

    def _known_cas(self, cas: Mapping[str, object] | None) -> dict[str, ContentAddress]:
        """The usable entries of ``cas``, parsed.

        A content address whose path (without references) in our store dir
        is not the path it is given for cannot be translated to another
        store dir (Nix translates only such paths) and is left out.
        """
        known = {}
        for path, ca in (cas or {}).items():
            if not ca:
                continue
            if not isinstance(ca, ContentAddress):
                ca = ContentAddress.parse(str(ca))
            try:
                sp = self.store_dir.parse(path)
                if self.store_dir.make_path_from_ca(sp.name, ca) != sp:
                    continue
            except (BadStorePath, ValueError):
                continue
            known[path] = ca
        return known

    def _first_found(self, paths: list[str], caches: list[BinaryCache],
                     cas: Mapping[str, ContentAddress]
                     ) -> dict[str, tuple[BinaryCache, NarInfo]]:
        found: dict[str, tuple[BinaryCache, NarInfo]] = {}
        pool = self._lookup_pool()
        try:
            for cache in caches:
                remaining = [p for p in paths if p not in found]
                if not remaining:
                    break
                if not cache.foreign:
                    cache.warm(remaining)
                results = list(pool.map(lambda p, c=cache: self._lookup(c, p, cas.get(p)),
                                        remaining))
                for path, info in zip(remaining, results):
                    if info is not None:
                        found[path] = (cache, info)
        finally:
            self.disk_cache.flush()
        return found

    def _lookup(self, cache: BinaryCache, path: str, ca: ContentAddress | None
                ) -> NarInfo | None:
        """The info ``cache`` has for our ``path``, translated from its store dir.

        A cache of our store dir is asked for ``path`` itself.  Another
        cache is asked only when ``ca`` is known, for the path ``ca`` gives
        there; its narinfo must have exactly that content address and no
        references, and is returned as the info of ``path``.

        Raises:
            StoreRefusal: as ``_try_query``.
        """
        if not cache.foreign:
            return self._try_query(cache, path)
        if ca is None:
            return None
        sub_path = self._path_in(cache, path, ca)
        info = self._try_query(cache, sub_path)
        if info is None:
            return None
        if info.ca != ca or info.references:
            if info.ca is not None and not _is_content_addressed(cache.store_dir, info):
                self._emit(Verbosity.ERROR, f"warning: path '{info.path}' claims to be "
                           "content-addressed but isn't")
            self._emit(Verbosity.ERROR,
                       f"asked '{cache.uri}' for '{path}' but got '{info.path}'")
            return None
        return replace(info, path=path, references=(), deriver=None, sigs=())

    def _try_query(self, cache: BinaryCache, path: str) -> NarInfo | None:
        """``cache.query(path)``, with Nix's handling of failures."""
        try:
            return cache.query(path)
        except CacheDisabled:
            return None
        except CacheFailure as e:
            if not self.fallback:
                raise StoreRefusal(e.message) from None
            self._emit(Verbosity.ERROR, error_line(e.message))
            return None

    def _path_in(self, cache: BinaryCache, path: str, ca: ContentAddress | None) -> str:
        """The path our ``path`` has in ``cache`` (Nix's ``subPath``)."""
        if not cache.foreign or ca is None:
            return path
        name = self.store_dir.parse(path).name
        return cache.store_dir.print(cache.store_dir.make_path_from_ca(name, ca))

    # --- substitution ---------------------------------------------------------------------

    def substitute(self, paths: Iterable[str], writer, client_log, *,
                   repair: bool = False, cas: Mapping[str, object] | None = None
                   ) -> dict[str, str | None]:
        """Make ``paths`` valid by fetching their closures from the caches.

        ``cas``: known content addresses of wanted paths (as in
        ``query_infos``), which let caches of another store dir serve them.

        Returns, for each requested path and each reference visited, None
        (valid now, or already) or a ``SubstitutionFailure``.

        Raises:
            ValueError: a malformed content address in ``cas``.
        """
        known = self._known_cas(cas)
        log = _LockedLog(client_log)
        self._current_log = log.log
        try:
            return _Run(self, writer, log, repair, known).run(list(dict.fromkeys(paths)))
        finally:
            self._current_log = None


def _is_content_addressed(store_dir: StoreDir, info: NarInfo) -> bool:
    """Nix's ``ValidPathInfo::isContentAddressed`` in ``store_dir``."""
    sp = store_dir.parse(info.path)
    refs = [store_dir.parse(r) for r in info.references if r != info.path]
    try:
        return store_dir.make_path_from_ca(sp.name, info.ca, refs,
                                           info.path in info.references) == sp
    except ValueError:
        return False


class _LockedLog:
    """A ``ClientLog`` shared by the download threads (one sender at a time)."""

    def __init__(self, client_log):
        self._log = client_log
        self._mutex = threading.Lock()

    def __getattr__(self, name):
        method = getattr(self._log, name)

        def locked(*args, **kw):
            with self._mutex:
                return method(*args, **kw)
        return locked


@dataclass
class _Goal:
    path: str
    repair: bool
    ca: ContentAddress | None = None
    cache_index: int = 0
    cache: BinaryCache | None = None
    info: NarInfo | None = None
    result: str | None = None
    done: bool = False
    cache_failed: bool = False
    last_error: str | None = None
    refs: list[str] = field(default_factory=list)


class _Run:
    """One ``substitute`` call: resolve the closure, then fetch in order."""

    def __init__(self, subs: Substituters, writer, log: _LockedLog, repair: bool,
                 cas: Mapping[str, ContentAddress]):
        self.subs = subs
        self.writer = writer
        self.log = log
        self.repair = repair
        self.cas = cas
        self.caches = subs.caches()
        self.goals: dict[str, _Goal] = {}

    def run(self, paths: list[str]) -> dict[str, str | None]:
        self._resolve_all(paths)
        self._fetch_all()
        return {p: g.result for p, g in self.goals.items()}

    # --- phase 1: which cache, which references ----------------------------------------

    def _resolve_all(self, paths: list[str]) -> None:
        pool = self.subs._lookup_pool()
        running: dict[Future, _Goal] = {}
        for path in paths:
            self.goals[path] = goal = _Goal(path, self.repair, self.cas.get(path))
            running[pool.submit(self._resolve, goal)] = goal
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                goal = running.pop(fut)
                fut.result()
                for ref in goal.refs:
                    if ref not in self.goals:
                        self.goals[ref] = new = _Goal(ref, False)
                        running[pool.submit(self._resolve, new)] = new

    def _resolve(self, goal: _Goal) -> None:
        self.writer.temp_roots.add(goal.path)
        if not goal.repair and self.writer.db.is_valid(goal.path):
            goal.done = True
            return
        if not self._next_candidate(goal, require_valid_refs=False):
            self._finish(goal, self._final_error(goal))
            return
        goal.refs = [r for r in goal.info.references if r != goal.path]

    def _next_candidate(self, goal: _Goal, *, require_valid_refs: bool) -> bool:
        """Move ``goal`` to the next cache with an acceptable narinfo."""
        while goal.cache_index < len(self.caches):
            cache = self.caches[goal.cache_index]
            goal.cache_index += 1
            try:
                info = self.subs._lookup(cache, goal.path, goal.ca)
            except StoreRefusal as e:
                goal.cache_failed, goal.last_error = True, e.message
                goal.cache_index = len(self.caches)  # no fallback: Nix gives up here
                return False
            if info is None:
                continue
            if not cache.trusted and self._lacks_signature(info):
                self.log.log(Verbosity.WARN, warning_line(
                    f"the substitute for '{goal.path}' from '{cache.uri}' is not signed by "
                    "any of the keys in 'trusted-public-keys'"))
                continue
            if require_valid_refs and not self._refs_valid(info):
                continue
            goal.cache, goal.info = cache, info
            return True
        return False

    def _refs_valid(self, info: NarInfo) -> bool:
        refs = [r for r in info.references if r != info.path]
        return len(self.writer.db.valid_subset(refs)) == len(refs)

    def _lacks_signature(self, info: NarInfo) -> bool:
        """CppNix's ``pathInfoIsUntrusted`` for a narinfo (as the writer decides)."""
        if not self.writer.require_sigs:
            return False
        if info.ca is not None and self._ca_matches(info):
            return False
        return signatures.check_path_sigs(info.path, info.nar_hash, info.nar_size,
                                          info.references, info.sigs,
                                          self.writer.public_keys) == 0

    def _ca_matches(self, info: NarInfo) -> bool:
        return _is_content_addressed(self.subs.store_dir, info)

    def _final_error(self, goal: _Goal) -> str:
        if goal.last_error and goal.cache_failed:
            return SubstitutionFailure(goal.last_error, "failed")
        return no_substituter(goal.path, goal.cache_failed)

    def _finish(self, goal: _Goal, result: str | None) -> None:
        goal.result, goal.done = result, True

    # --- phase 2: fetch, references first -------------------------------------------------

    def _fetch_all(self) -> None:
        pending = [g for g in self.goals.values() if not g.done]
        running: dict[Future, _Goal] = {}
        with ThreadPoolExecutor(self.subs.max_jobs, thread_name_prefix="substitute") as pool:
            while pending or running:
                pending = self._start_ready(pending, running, pool)
                if not running:
                    for goal in pending:  # only a reference cycle can leave these
                        self._dependency_failed(goal)
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    goal = running.pop(fut)
                    self._finish(goal, fut.result())

    def _start_ready(self, pending: list[_Goal], running: dict, pool) -> list[_Goal]:
        waiting = []
        for goal in pending:
            refs = [self.goals[r] for r in goal.refs]
            if any(r.done and r.result is not None for r in refs):
                self._dependency_failed(goal)
            elif all(r.done for r in refs):
                running[pool.submit(self._fetch, goal)] = goal
            else:
                waiting.append(goal)
        if len(waiting) < len(pending) and not running:
            return self._start_ready(waiting, running, pool)
        return waiting

    def _dependency_failed(self, goal: _Goal) -> None:
        self._finish(goal, SubstitutionFailure(
            f"some references of path '{goal.path}' could not be realised",
            "dependency-failed"))

    def _fetch(self, goal: _Goal) -> str | None:
        """Download ``goal`` from its cache, then from the next ones; the result."""
        while True:
            try:
                self._download(goal)
                return None
            except (CacheFailure, StoreRefusal) as e:
                message = (f"substitution of '{goal.path}' from '{goal.cache.uri}' failed: "
                           f"{e.message}")
                self.log.log(Verbosity.ERROR, error_line(message))
                if not getattr(e, "gone", False):
                    goal.cache_failed, goal.last_error = True, message
            except CacheDisabled:
                pass
            if not self._next_candidate(goal, require_valid_refs=True):
                return self._final_error(goal)

    def _download(self, goal: _Goal) -> None:
        cache, info = goal.cache, goal.info
        src_path = self.subs._path_in(cache, goal.path, goal.ca)  # as copyStorePath names it
        log = self.log
        act = log.start(Verbosity.ERROR, ActivityType.SUBSTITUTE, "", (goal.path, cache.uri))
        copy = log.start(Verbosity.INFO, ActivityType.COPY_PATH,
                         f"copying path '{src_path}' from '{cache.uri}'",
                         (src_path, cache.uri, "local"), act)
        transfer_act = None
        if cache.is_http:
            url = cache.url_of(info.url)
            transfer_act = log.start(Verbosity.TALKATIVE, ActivityType.FILE_TRANSFER,
                                     f"downloading '{url}'", (url,), copy)
        try:
            chunks = cache.open_nar(info, progress=_progress(log, transfer_act))
            claim = NarClaim(goal.path, info.deriver, info.nar_hash, info.references,
                             int(time.time()), info.nar_size, False, info.sigs, info.ca)
            self.writer.add_nar(claim, _bounded(chunks, src_path, cache, info, log, copy),
                                repair=goal.repair, check_sigs=not cache.trusted)
        finally:
            for a in (transfer_act, copy, act):
                if a is not None:
                    log.stop(a)


def _progress(log, act):
    if act is None:
        return None
    return lambda done, total: log.result(act, ResultType.PROGRESS, (done, total, 0, 0))


def _bounded(chunks: Iterator[bytes], path: str, cache: BinaryCache, info: NarInfo,
             log, act) -> Iterator[bytes]:
    """The NAR chunks, refused beyond ``NarSize`` and checked to reach it."""
    total = 0
    for data in chunks:
        total += len(data)
        if total > info.nar_size:
            raise CacheFailure(f"NAR for '{path}' fetched from '{cache.uri}' is larger than "
                               f"its NarSize ({info.nar_size} bytes)")
        yield data
        log.result(act, ResultType.PROGRESS, (total, info.nar_size, 0, 0))
    if total < info.nar_size:
        raise CacheFailure(f"NAR for '{path}' fetched from '{cache.uri}' is incomplete")
