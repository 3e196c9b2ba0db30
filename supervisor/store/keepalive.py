"""Small HTTP GETs on kept-alive connections of the standard ``http.client``.

The narinfo look-ups of one query come by the thousand, and urllib3's
general machinery costs about twice the CPU of a plain ``http.client``
exchange per request, which they do not need when all goes well.
``QuickGetter.get`` does that plain exchange, on a connection kept from an
earlier one to the same host (at most ``max_idle`` kept per host), and
answers the response's ``(status, reason, body)``.  It answers None, and
the caller's general client takes over, whenever more than the plain case
is involved: a connection that cannot be made or fails, a redirect, an
encoded or too long body, a URL with credentials.  A timeout is the one
failure it reports (``TimeoutError``): that attempt is over.  Process:
session.

Trust: servers are untrusted; a body is read up to ``max_size`` + 1 bytes,
never more, and only what ``transfer.Downloader`` makes of the answer
reaches anyone.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import urllib.parse

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class QuickGetter:
    """Kept-alive connections by (scheme, host, port); thread-safe."""

    def __init__(self, *, max_idle: int, connect_timeout: float, read_timeout: float | None,
                 user_agent: str):
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.headers = {"User-Agent": user_agent}
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def get(self, url: str, max_size: int) -> tuple[int, str, bytes] | None:
        """``(status, reason, body)`` of a GET of ``url``; None: use the general client.

        Raises:
            TimeoutError: connecting or a read took longer than its timeout
                (a failed attempt: the general client would only wait again).
        """
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname \
                or parts.username is not None or parts.password is not None:
            return None
        key = (parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for reuse in (True, False):  # a kept connection the server has closed: a new one
            try:
                conn, reused = self._take(key, reuse)
            except TimeoutError:
                raise
            except (OSError, http.client.HTTPException, ValueError):
                return None
            try:
                return self._exchange(key, conn, target, max_size)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conn.close()
                if not reused:
                    if isinstance(exc, TimeoutError):
                        raise
                    return None
        return None

    def _exchange(self, key, conn: http.client.HTTPConnection, target: str,
                  max_size: int) -> tuple[int, str, bytes] | None:
        conn.request("GET", target, headers=self.headers)
        resp = conn.getresponse()
        encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
        length = resp.getheader("Content-Length")
        if resp.status in _REDIRECTS or encoding != "identity" or \
                (length is not None and (not length.isdigit() or int(length) > max_size)):
            conn.close()
            return None
        body = resp.read(max_size + 1)
        if len(body) > max_size or not resp.isclosed():
            conn.close()
            return None
        if resp.will_close:
            conn.close()
        else:
            self._keep(key, conn)
        return resp.status, resp.reason or "", body

    def _take(self, key: tuple[str, str, int], reuse: bool
              ) -> tuple[http.client.HTTPConnection, bool]:
        """A kept connection (if ``reuse`` and there is one) or a new one; and which."""
        if reuse:
            with self._lock:
                kept = self._idle.get(key)
                if kept:
                    return kept.pop(), True
        scheme, host, port = key
        if scheme == "https":
            with self._lock:
                if self._tls is None:
                    self._tls = ssl.create_default_context()
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=self.connect_timeout, context=self._tls)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
        try:
            conn.connect()
            conn.sock.settimeout(self.read_timeout)
        except BaseException:
            conn.close()
            raise
        return conn, False

    def _keep(self, key: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            kept = self._idle.setdefault(key, [])
            if len(kept) < self.max_idle:
                kept.append(conn)
                return
        conn.close()
