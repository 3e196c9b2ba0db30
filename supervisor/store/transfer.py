"""Downloads for binary caches: HTTP(S) with retries, local files, decompression.

``Downloader`` fetches small files whole (``get``) or streams large ones
(``stream``) from ``http://``, ``https://`` (one urllib3 ``PoolManager``,
connections reused, ``http-connections`` kept per host; a small file's
plain first attempt goes through ``keepalive.QuickGetter``, cheaper per
request) and from local files (``file://`` caches).  Errors are classified
as Nix 2.8's ``filetransfer.cc`` does (404/410 not found, 401/403/407
forbidden, most 4xx and 501/505/511 hopeless, the rest transient) and
transient ones are retried ``download-attempts`` times with Nix's back-off
(250 ms * 2^(n-1+U), U uniform in [0, 0.5)); a broken stream resumes with
a ``Range`` request when the server accepts ranges, otherwise only if
nothing was passed on yet.  ``decompress`` turns a stream of compressed chunks into NAR chunks,
choosing the method by magic bytes (xz, bzip2, zstd, gzip, else as is).
Process: session.

Trust: everything read here comes from a binary cache and is untrusted.
Memory stays bounded: files fetched whole are capped (``max_size``), and
decompressors are asked for bounded output per step, so a decompression
bomb yields many small chunks (the caller bounds their total by NarSize),
never one huge buffer.  URLs are built by the caller from checked values.
"""

from __future__ import annotations

import bz2
import lzma
import os
import random
import time
import zlib
from collections.abc import Callable, Iterator

import urllib3
import zstandard

from nixwarden.shared.logtypes import ANSI_NORMAL, ANSI_WARNING
from nixwarden.supervisor.store.keepalive import QuickGetter

CHUNK = 256 * 1024
#: Nix's FileTransferRequest::baseRetryTimeMs.
BASE_RETRY_MS = 250
#: How much of an HTTP error's response body is read to show it (Nix shows
#: bodies under 1 KiB, or HTML ones).
ERROR_BODY_MAX = 64 * 1024

NOT_FOUND, FORBIDDEN, MISC, TRANSIENT = "not-found", "forbidden", "misc", "transient"
USER_AGENT = "nixwarden"


class TransferError(Exception):
    """A failed download; ``kind`` is one of the classes above."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class DecompressionError(Exception):
    """The compressed stream is corrupt or truncated."""


def with_response_body(message: str, body: bytes) -> str:
    """An HTTP error's message as Nix 2.8's FileTransferError words it: a
    short (or HTML) response body is shown after it, highlighted."""
    text = body[:ERROR_BODY_MAX].decode("utf-8", "replace")
    if text and (len(body) < 1024 or "<html>" in text):
        shown = text.rstrip(" \n\r\t")
        return f"{message}\n\nresponse body:\n\n{ANSI_WARNING}{shown}{ANSI_NORMAL}"
    return message


def _classify(status: int) -> str:
    if status in (404, 410):
        return NOT_FOUND
    if status in (401, 403, 407):
        return FORBIDDEN
    if 400 <= status < 500 and status not in (408, 429):
        return MISC
    if status in (501, 505, 511):
        return MISC
    return TRANSIENT


class Downloader:
    """One session's HTTP client and file reader (thread-safe)."""

    def __init__(self, *, connections: int = 25, connect_timeout: int = 0,
                 stall_timeout: int = 300, attempts: int = 5,
                 warn: Callable[[str], None] = lambda text: None):
        self.attempts = attempts
        self.warn = warn
        # curl's connect timeout 0 means its default of 300 s.
        self.timeout = urllib3.Timeout(connect=connect_timeout or 300,
                                       read=stall_timeout or None)
        self.pool = urllib3.PoolManager(num_pools=16, maxsize=max(1, connections),
                                        block=False, headers={"User-Agent": USER_AGENT})
        self.quick = QuickGetter(max_idle=max(1, connections),
                                 connect_timeout=connect_timeout or 300,
                                 read_timeout=stall_timeout or None, user_agent=USER_AGENT)
        self._retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0,
                                      redirect=10, raise_on_redirect=True)

    def close(self) -> None:
        self.pool.clear()
        self.quick.close()

    # --- whole files ----------------------------------------------------------------

    def get(self, url: str, *, max_size: int) -> bytes | None:
        """The contents of ``url``; None if absent (not found or forbidden).

        Raises:
            TransferError: after the retries, or bigger than ``max_size``.
        """
        if url.startswith("file://"):
            return _read_file(url[len("file://"):], max_size)
        first_error = None
        try:
            quick = self.quick.get(url, max_size)
        except TimeoutError:
            quick = None
            first_error = TransferError(
                TRANSIENT, f"unable to download '{url}': Timeout was reached (28)")
        if quick is not None:  # the plain case, done cheaply; else urllib3 decides
            status, reason, body = quick
            if status == 200:
                return body
            if _classify(status) in (NOT_FOUND, FORBIDDEN):
                return None
            first_error = _http_error(url, status, reason, body)
        try:
            return b"".join(self._http_chunks(url, max_size=max_size, first_error=first_error))
        except TransferError as e:
            if e.kind in (NOT_FOUND, FORBIDDEN):
                return None
            raise

    # --- streams ----------------------------------------------------------------------

    def stream(self, url: str, *, progress: Callable[[int, int], None] | None = None
               ) -> Iterator[bytes]:
        """The bytes of ``url`` in chunks; ``progress(done, total)`` after each.

        Raises (from the iterator):
            TransferError: absent (kind NOT_FOUND/FORBIDDEN) or failed.
        """
        if url.startswith("file://"):
            return _file_chunks(url[len("file://"):])
        return self._http_chunks(url, progress=progress)

    def _http_chunks(self, url: str, *, max_size: int | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     first_error: TransferError | None = None) -> Iterator[bytes]:
        """The body of ``url``, retried as Nix does; ``first_error``: how a
        first attempt made elsewhere failed (it counts as attempt 1)."""
        written = 0
        attempt = 0
        if first_error is not None:
            attempt = 1
            if not self._retry(first_error, attempt, written, False):
                raise first_error
        while True:
            attempt += 1
            resumable = False
            try:
                resp = self._open(url, written)
                resumable = _accepts_ranges(resp)
                skip = written if resp.status == 200 else 0
                total = written + int(resp.headers.get("Content-Length") or 0) - skip
                for data in _response_chunks(resp, url):
                    if skip:
                        cut = min(skip, len(data))
                        data, skip = data[cut:], skip - cut
                        if not data:
                            continue
                    written += len(data)
                    if max_size is not None and written > max_size:
                        raise TransferError(MISC, f"file '{url}' is larger than {max_size} bytes")
                    yield data
                    if progress is not None:
                        progress(written, max(total, written))
                return
            except TransferError as e:
                if not self._retry(e, attempt, written, resumable):
                    raise

    def _open(self, url: str, offset: int) -> urllib3.BaseHTTPResponse:
        headers = {"Range": f"bytes={offset}-"} if offset else None
        try:
            resp = self.pool.request("GET", url, headers=headers, preload_content=False,
                                     decode_content=True, retries=self._retries,
                                     timeout=self.timeout)
        except urllib3.exceptions.HTTPError as e:
            raise TransferError(*_describe(e, url)) from None
        if resp.status not in (200, 206):
            reason = resp.reason or ""
            try:
                body = resp.read(ERROR_BODY_MAX + 1)
            except urllib3.exceptions.HTTPError:
                body = b""
            resp.drain_conn()
            resp.release_conn()
            raise _http_error(url, resp.status, reason, body)
        return resp

    def _retry(self, e: TransferError, attempt: int, written: int, resumable: bool) -> bool:
        if e.kind != TRANSIENT or attempt >= self.attempts or (written and not resumable):
            return False
        ms = int(BASE_RETRY_MS * 2 ** (attempt - 1 + random.uniform(0, 0.5)))
        if written:
            self.warn(f"{e.message}; retrying from offset {written} in {ms} ms")
        else:
            self.warn(f"{e.message}; retrying in {ms} ms")
        time.sleep(ms / 1000)
        return True


def _http_error(url: str, status: int, reason: str, body: bytes) -> TransferError:
    return TransferError(_classify(status), with_response_body(
        f"unable to download '{url}': HTTP error {status} ('{reason}')", body))


def _accepts_ranges(resp) -> bool:
    return (resp.headers.get("Accept-Ranges", "").lower() == "bytes"
            and not resp.headers.get("Content-Encoding"))


def _response_chunks(resp, url: str) -> Iterator[bytes]:
    try:
        yield from resp.stream(CHUNK)
    except urllib3.exceptions.HTTPError as e:
        raise TransferError(*_describe(e, url)) from None
    finally:
        resp.release_conn()


def _describe(e: Exception, url: str) -> tuple[str, str]:
    """Kind and curl-like message of a urllib3 failure."""
    exc = urllib3.exceptions
    if isinstance(e, exc.MaxRetryError):
        if isinstance(e.reason, Exception):
            return _describe(e.reason, url)
        return MISC, f"unable to download '{url}': too many redirects (47)"
    if isinstance(e, exc.NewConnectionError):
        what = "Couldn't connect to server (7)"
    elif isinstance(e, exc.TimeoutError):
        what = "Timeout was reached (28)"
    elif isinstance(e, exc.ProtocolError) and "IncompleteRead" in str(e) or \
            isinstance(e, getattr(exc, "IncompleteRead", ())):
        what = "Transferred a partial file (18)"
    elif isinstance(e, exc.LocationValueError):
        return MISC, f"unable to download '{url}': URL using bad/illegal format (3)"
    elif isinstance(e, exc.DecodeError):
        what = "Failed writing received data to disk/application (23)"
    else:
        what = f"Failure when receiving data from the peer (56): {e}"
    return TRANSIENT, f"unable to download '{url}': {what}"


# --- local files ----------------------------------------------------------------------------


def _open_local(path: str):
    try:
        return open(path, "rb")
    except (FileNotFoundError, NotADirectoryError):
        raise TransferError(NOT_FOUND, f"file '{path}' does not exist") from None
    except OSError as e:
        raise TransferError(MISC, f"opening file '{path}': {e.strerror}") from None


def _read_file(path: str, max_size: int) -> bytes | None:
    try:
        f = _open_local(path)
    except TransferError as e:
        if e.kind == NOT_FOUND:
            return None
        raise
    with f:
        data = f.read(max_size + 1)
    if len(data) > max_size:
        raise TransferError(MISC, f"file '{path}' is larger than {max_size} bytes")
    return data


def _file_chunks(path: str) -> Iterator[bytes]:
    with _open_local(path) as f:
        while True:
            try:
                data = f.read(CHUNK)
            except OSError as e:
                raise TransferError(MISC, f"reading file '{path}': {e.strerror}") from None
            if not data:
                return
            yield data


# --- decompression ----------------------------------------------------------------------------

_MAGIC = ((b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"), (b"\x28\xb5\x2f\xfd", "zstd"),
          (b"\x1f\x8b", "gzip"), (b"LZIP", "lzip"), (b"\x04\x22\x4d\x18", "lz4"))


def sniff(head: bytes) -> str:
    """The compression method ``head`` starts with, or "none"."""
    for magic, method in _MAGIC:
        if head.startswith(magic):
            return method
    return "none"


def decompress(chunks: Iterator[bytes], hint: str = "") -> Iterator[bytes]:
    """Decompress ``chunks`` on the fly, by magic bytes (``hint`` only for "br").

    Raises (from the iterator):
        DecompressionError: corrupt or truncated data, or an unsupported method.
    """
    chunks = iter(chunks)
    head = b""
    for data in chunks:
        head += data
        if len(head) >= 6:
            break
    method = sniff(head)
    if hint == "br" and method == "none":
        raise DecompressionError("compression method 'br' is not supported")
    if method in ("lzip", "lz4"):
        raise DecompressionError(f"compression method '{method}' is not supported")
    source = _prepend(head, chunks)
    if method == "none":
        return (d for d in source if d)
    if method == "zstd":
        return _zstd(source)
    return _stdlib(source, method)


def _prepend(head: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if head:
        yield head
    yield from rest


_FACTORIES = {"xz": lambda: lzma.LZMADecompressor(), "bzip2": bz2.BZ2Decompressor,
              "gzip": lambda: _Gzip()}


class _Gzip:
    """zlib's decompressobj with the interface of the lzma/bz2 decompressors."""

    def __init__(self):
        self._d = zlib.decompressobj(wbits=31)

    def decompress(self, data: bytes, max_length: int) -> bytes:
        out = self._d.decompress(self._d.unconsumed_tail + data, max_length)
        return out

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def needs_input(self) -> bool:
        return not self._d.unconsumed_tail

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data


def _stdlib(source: Iterator[bytes], method: str) -> Iterator[bytes]:
    """xz, bzip2 or gzip; concatenated streams are decoded one after another."""
    d = _FACTORIES[method]()
    try:
        for data in source:
            while data or not d.needs_input:
                if d.eof:
                    data = d.unused_data + data
                    if not data:
                        break
                    d = _FACTORIES[method]()  # a concatenated stream follows
                out = d.decompress(data, CHUNK)
                data = b""
                if out:
                    yield out
    except (lzma.LZMAError, OSError, zlib.error, EOFError) as e:
        raise DecompressionError(f"{method} data is corrupt: {e}") from None
    if not d.eof:
        raise DecompressionError(f"{method} data is truncated")


class _IterReader:
    """A ``read(n)`` view of a chunk iterator (for zstandard's stream reader)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while not self._buf:
            self._buf = next(self._chunks, None)
            if self._buf is None:
                self._buf = b""
                return b""
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def _zstd(source: Iterator[bytes]) -> Iterator[bytes]:
    reader = zstandard.ZstdDecompressor().stream_reader(
        _IterReader(source), read_size=CHUNK, read_across_frames=True)
    try:
        while True:
            out = reader.read(CHUNK)
            if not out:
                return
            yield out
    except zstandard.ZstdError as e:
        raise DecompressionError(f"zstd data is corrupt: {e}") from None


def file_url(directory: str, rel: str) -> str:
    """``file://`` URL of ``rel`` below a local cache ``directory``."""
    return "file://" + os.path.join(directory, rel)
