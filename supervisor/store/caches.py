"""One binary cache (``file://``, ``http://``, ``https://``) as a substituter.

``open_cache(url, ...)`` parses a substituter URL with its parameters
(``trusted``, ``priority``, ``want-mass-query``, ``store``) and reads the
cache's ``nix-cache-info``.  The cache's store dir is its ``StoreDir``
(else the ``store`` parameter, else ours); when that differs from what
was expected (the ``store`` parameter, else ours) Nix 2.8's
``BinaryCacheStore::init`` message is warned with.  A cache whose store
dir is not ours is ``foreign``: the caller uses it only for
content-addressed paths without references, looked up under the path
their content address gives in the cache's store dir (Nix 2.8's
``PathSubstitutionGoal::tryNext``).  The ``BinaryCache`` looks
up ``.narinfo`` files (through the narinfo disk cache for HTTP caches, as
Nix does) and opens NARs as decompressed chunk streams.  A cache that
keeps failing is disabled for 60 s when ``fallback`` is set (Nix's
``maybeDisable``).  Process: session.

Trust: a cache is untrusted network input.  Its ``nix-cache-info`` and
``.narinfo`` files are parsed strictly (``narinfo.py``), a narinfo that
describes another path than the one asked for counts as absent (Nix's
``goodStorePath``), NAR URLs are checked to stay within the cache (or be
plain ``http(s)``), and NAR bytes are only ever handed to the hardened
restorer by the caller, which checks their hash and size.  Whether a
cache's signatures are needed is the caller's decision (``trusted``).
"""

from __future__ import annotations

import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import parse_qsl

from nixwarden.shared.logtypes import Verbosity, warning_line
from nixwarden.shared.storepath import StoreDir
from nixwarden.supervisor.store import transfer
from nixwarden.supervisor.store.narinfo import (CacheInfo, NarInfo, NarInfoError,
                                                parse_cache_info, parse_narinfo)
from nixwarden.supervisor.store.narinfo_cache import NarInfoDiskCache
from nixwarden.supervisor.store.transfer import Downloader, TransferError

MAX_NARINFO = 16 * 1024 * 1024
MAX_CACHE_INFO = 64 * 1024
DISABLE_SECONDS = 60
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


class CacheUnusable(Exception):
    """The substituter cannot be used at all (Nix warns and skips it)."""


class CacheDisabled(Exception):
    """The cache is disabled for a while after failures (with ``fallback``)."""


class CacheFailure(Exception):
    """A look-up or download failed; the message names the cache and file.

    ``gone`` marks a NAR that the cache does not have after all (Nix's
    ``SubstituteGone``: not counted as a substituter failure).
    """

    def __init__(self, message: str, *, gone: bool = False):
        super().__init__(message)
        self.message = message
        self.gone = gone


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """``scheme://rest?k=v`` to (URI without parameters or trailing ``/``, parameters)."""
    base, _, query = url.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    scheme, sep, rest = base.partition("://")
    if sep:
        rest = rest.rstrip("/") if rest.strip("/") else rest
        base = f"{scheme}://{rest}"
    return base, params


def _bool_param(params: dict[str, str], name: str, url: str) -> bool | None:
    value = params.get(name)
    if value is None:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise CacheUnusable(f"option '{name}' of substituter '{url}' has invalid value '{value}'")


def _int_param(params: dict[str, str], name: str, url: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise CacheUnusable(
            f"option '{name}' of substituter '{url}' has invalid value '{value}'") from None


class BinaryCache:
    """A binary cache reached through ``downloader``; build with ``open_cache``."""

    def __init__(self, uri: str, params: dict[str, str], *, store_dir: StoreDir,
                 downloader: Downloader, disk_cache: NarInfoDiskCache | None,
                 fallback: bool = False, log: Callable[[int, str], None] | None = None):
        scheme = uri.partition("://")[0]
        if scheme not in ("file", "http", "https") or "://" not in uri:
            raise CacheUnusable(_unsupported(uri))
        self.uri = uri
        self.is_http = scheme != "file"
        self.local_store_dir = store_dir
        #: The store dir the URL's ``store`` parameter names (default: ours).
        self.expected_store_dir = _store_param(params, uri) or store_dir
        #: The store dir of the cache's paths (``StoreDir`` of nix-cache-info).
        self.store_dir = self.expected_store_dir
        self.downloader = downloader
        self.disk_cache = disk_cache if self.is_http else None
        self.fallback = fallback
        self.log = log or (lambda level, text: None)
        self.trusted = bool(_bool_param(params, "trusted", uri))
        self._priority = _int_param(params, "priority", uri)
        self._want_mass_query = _bool_param(params, "want-mass-query", uri)
        self._disabled_until = 0.0
        self._mutex = threading.Lock()
        self.cache_info = CacheInfo()

    def __repr__(self) -> str:
        return f"BinaryCache({self.uri!r})"

    @property
    def priority(self) -> int:
        """URL parameter, else ``nix-cache-info``, else Nix's default 0."""
        if self._priority is not None:
            return self._priority
        return self.cache_info.priority if self.cache_info.priority is not None else 0

    @property
    def want_mass_query(self) -> bool:
        if self._want_mass_query is not None:
            return self._want_mass_query
        return bool(self.cache_info.want_mass_query)

    @property
    def foreign(self) -> bool:
        """True iff the cache's store dir is not ours (CA look-ups only)."""
        return self.store_dir != self.local_store_dir

    def url_of(self, rel: str) -> str:
        if rel.startswith(("http://", "https://")):
            return rel
        return f"{self.uri}/{rel}"

    # --- nix-cache-info --------------------------------------------------------------

    def info(self) -> CacheInfo:
        """Read ``nix-cache-info`` (once; remembered for HTTP caches) and check it.

        Sets ``store_dir`` from its ``StoreDir``; a ``StoreDir`` other than
        the expected one is warned about (through ``log``) as Nix 2.8 does.

        Raises:
            CacheUnusable: unreachable, not a binary cache, or a ``StoreDir``
                that is not a store dir.
        """
        text = self.disk_cache.lookup_cache_info(self.uri) if self.disk_cache else None
        if text is None:
            text = self._fetch_cache_info()
        try:
            info = parse_cache_info(text, whence=self.url_of("nix-cache-info"))
        except NarInfoError as e:
            raise CacheUnusable(str(e)) from None
        if info.store_dir is not None and info.store_dir != str(self.expected_store_dir):
            try:
                store_dir = StoreDir(info.store_dir)
            except ValueError:
                raise CacheUnusable(_mismatch(self.uri, info.store_dir,
                                              self.expected_store_dir)) from None
            self.log(Verbosity.WARN, warning_line(
                _mismatch(self.uri, info.store_dir, self.expected_store_dir)))
            self.store_dir = store_dir
        if self.disk_cache:
            self.disk_cache.record_cache_info(self.uri, text)
        self.cache_info = info
        return info

    def _fetch_cache_info(self) -> str:
        try:
            data = self.downloader.get(self.url_of("nix-cache-info"), max_size=MAX_CACHE_INFO)
        except TransferError as e:
            raise CacheUnusable(e.message) from None
        if data is None:
            if self.is_http:
                raise CacheUnusable(f"'{self.uri}' does not appear to be a binary cache")
            return ""  # Nix would create it; a missing file means the defaults
        return data.decode("utf-8", "replace")

    # --- narinfo ------------------------------------------------------------------------

    def narinfo(self, hash_part: str) -> NarInfo | None:
        """The cache's ``<hash_part>.narinfo``, None if it has none.

        Raises:
            CacheDisabled: the cache is disabled for a while.
            CacheFailure: the download failed or the file is malformed.
        """
        self._check_enabled()
        whence = self.url_of(f"{hash_part}.narinfo")
        if self.disk_cache is not None:
            state, text = self.disk_cache.lookup(self.uri, hash_part)
            if state == "absent":
                return None
            if state == "present":
                try:
                    return parse_narinfo(text, self.store_dir, whence=whence)
                except NarInfoError:
                    pass  # a damaged entry: ask the cache again
        text = self._fetch_narinfo(whence)
        info = None
        if text is not None:
            try:
                info = parse_narinfo(text, self.store_dir, whence=whence)
            except NarInfoError as e:
                raise CacheFailure(str(e)) from None
        if self.disk_cache is not None:
            self.disk_cache.record(self.uri, hash_part, text)
        return info

    def _fetch_narinfo(self, whence: str) -> str | None:
        try:
            data = self.downloader.get(whence, max_size=MAX_NARINFO)
        except TransferError as e:
            self._maybe_disable()
            raise CacheFailure(e.message) from None
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise CacheFailure(f"NAR info file '{whence}' is corrupt (not UTF-8)") from None

    def warm(self, paths: list[str]) -> None:
        """Read the disk cache's entries of ``paths`` at once, before their ``query``."""
        if self.disk_cache is not None:
            self.disk_cache.warm(self.uri, [p.rsplit("/", 1)[1][:32] for p in paths])

    def query(self, path: str) -> NarInfo | None:
        """The narinfo of full store path ``path``; None if absent or for another path."""
        base = path.rsplit("/", 1)[1]
        info = self.narinfo(base[:32])
        if info is None or info.path != path:
            return None
        return info

    # --- NARs ----------------------------------------------------------------------------

    def open_nar(self, info: NarInfo, *, progress: Callable[[int, int], None] | None = None
                 ) -> Iterator[bytes]:
        """The NAR of ``info``, decompressed on the fly, in chunks.

        ``progress(done, total)`` is called with compressed byte counts.

        Raises (from the iterator):
            CacheFailure: the download failed (``gone`` if the file is absent)
                or the data does not decompress.
        """
        self._check_enabled()
        url = self.url_of(info.url)
        try:
            yield from transfer.decompress(self.downloader.stream(url, progress=progress),
                                           info.compression)
        except TransferError as e:
            if e.kind in (transfer.NOT_FOUND, transfer.FORBIDDEN):
                raise CacheFailure(f"file '{info.url}' does not exist in binary cache "
                                   f"'{self.uri}'", gone=True) from None
            self._maybe_disable()
            raise CacheFailure(e.message) from None
        except transfer.DecompressionError as e:
            raise CacheFailure(f"cannot decompress '{url}': {e}") from None

    # --- disabling (Nix's maybeDisable/checkEnabled, HTTP caches only) ------------------

    def _maybe_disable(self) -> None:
        if not (self.is_http and self.fallback):
            return
        with self._mutex:
            if self._disabled_until > time.monotonic():
                return
            self._disabled_until = time.monotonic() + DISABLE_SECONDS
        self.log(0, f"disabling binary cache '{self.uri}' for {DISABLE_SECONDS} seconds")

    def _check_enabled(self) -> None:
        with self._mutex:
            if self._disabled_until and time.monotonic() <= self._disabled_until:
                raise CacheDisabled(f"substituter '{self.uri}' is disabled")
            self._disabled_until = 0.0


def _mismatch(uri: str, theirs: str, expected: StoreDir) -> str:
    return (f"binary cache '{uri}' is for Nix stores with prefix '{theirs}', "
            f"not '{expected}'")


def _store_param(params: dict[str, str], url: str) -> StoreDir | None:
    """The ``store`` parameter (Nix canonicalises it), None if absent."""
    value = params.get("store")
    if value is None:
        return None
    if value == "":
        raise CacheUnusable("setting 'store' cannot be empty")
    if not value.startswith("/"):
        raise CacheUnusable(f"not an absolute path: '{value}'")
    try:
        return StoreDir(posixpath.normpath("/" + value.lstrip("/")))
    except ValueError:
        raise CacheUnusable(
            f"option 'store' of substituter '{url}' has invalid value '{value}'") from None


def _unsupported(uri: str) -> str:
    if uri in ("local", "daemon", "auto") or uri.startswith(("/", "unix://", "local?")):
        return f"substituter '{uri}' (a local or daemon store) is not supported by nixwarden"
    return f"don't know how to open Nix store '{uri}'"


def open_cache(url: str, *, store_dir: StoreDir, downloader: Downloader,
               disk_cache: NarInfoDiskCache | None, fallback: bool = False,
               log: Callable[[int, str], None] | None = None) -> BinaryCache:
    """Open substituter ``url`` and read its ``nix-cache-info``.

    Raises:
        CacheUnusable: with the message Nix would warn with.
    """
    uri, params = split_url(url)
    cache = BinaryCache(uri, params, store_dir=store_dir, downloader=downloader,
                        disk_cache=disk_cache, fallback=fallback, log=log)
    cache.info()
    return cache
