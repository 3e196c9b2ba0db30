"""Small GETs on kept-alive connections (``keepalive.QuickGetter``) and how
``transfer.Downloader.get`` builds on them, against a real HTTP/1.1 server
on loopback that counts the connections it accepts."""

from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nixwarden.supervisor.store.keepalive import QuickGetter
from nixwarden.supervisor.store.transfer import Downloader, TransferError


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests[self.path] = self.server.requests.get(self.path, 0) + 1
            count = self.server.requests[self.path]
        headers, status, body = {}, 200, b"hello " + self.path.encode()
        if self.path == "/missing":
            status, body = 404, b"no such file"
        elif self.path == "/moved":
            status, headers = 302, {"Location": "/file"}
        elif self.path == "/gzip":
            body, headers = gzip.compress(b"unpacked"), {"Content-Encoding": "gzip"}
        elif self.path == "/big":
            body = b"x" * 5000
        elif self.path == "/500once" and count == 1:
            status, body = 500, b"oops"
        elif self.path == "/stall":
            time.sleep(1.5)
        elif self.path == "/close":
            headers = {"Connection": "close"}
            self.close_connection = True
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock = threading.Lock()
    srv.connections = 0
    srv.requests = {}
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def getter():
    g = QuickGetter(max_idle=4, connect_timeout=5, read_timeout=5, user_agent="test")
    yield g
    g.close()


def test_connection_kept_for_the_next_request(server, getter):
    srv, url = server
    assert getter.get(f"{url}/a", 1024) == (200, "OK", b"hello /a")
    assert getter.get(f"{url}/b?x=1", 1024) == (200, "OK", b"hello /b?x=1")
    assert getter.get(f"{url}/missing", 1024) == (404, "Not Found", b"no such file")
    assert srv.connections == 1


def test_connection_closed_by_the_server_is_replaced(server, getter):
    srv, url = server
    assert getter.get(f"{url}/close", 1024)[0] == 200  # not kept: the server said close
    assert getter.get(f"{url}/a", 1024)[0] == 200
    for conn in getter._idle[("http", "127.0.0.1", srv.server_address[1])]:
        conn.sock.close()  # as if the server had timed the idle connection out
    assert getter.get(f"{url}/b", 1024) == (200, "OK", b"hello /b")
    assert srv.connections == 3


@pytest.mark.parametrize("path,max_size", [("/moved", 1024), ("/gzip", 1024), ("/big", 4096)])
def test_anything_but_the_plain_case_is_left_to_the_general_client(server, getter,
                                                                   path, max_size):
    _, url = server
    assert getter.get(f"{url}{path}", max_size) is None


def test_no_server_or_odd_urls(getter):
    assert getter.get("http://127.0.0.1:9/x", 1024) is None  # nothing listens (discard)
    assert getter.get("http://user:pw@127.0.0.1:9/x", 1024) is None
    assert getter.get("ftp://127.0.0.1/x", 1024) is None
    assert getter.get("http://[::1/x", 1024) is None


def test_downloader_get_falls_back_and_retries_as_before(server):
    srv, url = server
    warnings: list[str] = []
    d = Downloader(connections=4, attempts=3, warn=warnings.append)
    try:
        assert d.get(f"{url}/a", max_size=1024) == b"hello /a"
        assert d.get(f"{url}/missing", max_size=1024) is None
        assert d.get(f"{url}/moved", max_size=1024) == b"hello /file"  # urllib3 follows
        assert d.get(f"{url}/gzip", max_size=1024) == b"unpacked"  # urllib3 decodes
        # The quick attempt's 500 is attempt 1: one warning, then urllib3 gets it.
        assert d.get(f"{url}/500once", max_size=1024) == b"hello /500once"
        assert len(warnings) == 1 and "HTTP error 500" in warnings[0] \
            and "retrying in" in warnings[0]
        assert srv.requests["/500once"] == 2
    finally:
        d.close()


def test_a_stalled_first_attempt_counts_as_one(server):
    """A read timeout is the one failure the quick path reports: urllib3 does
    not ask again within the same attempt."""
    srv, url = server
    getter = QuickGetter(max_idle=1, connect_timeout=5, read_timeout=0.3, user_agent="t")
    with pytest.raises(TimeoutError):
        getter.get(f"{url}/stall", 1024)
    d = Downloader(connections=1, stall_timeout=1, attempts=1)
    try:
        with pytest.raises(TransferError) as e:
            d.get(f"{url}/stall", max_size=1024)
        assert e.value.message == f"unable to download '{url}/stall': Timeout was reached (28)"
    finally:
        d.close()
    time.sleep(1.5)  # the server's handlers finish
    assert srv.requests["/stall"] == 2  # one per client, none repeated
