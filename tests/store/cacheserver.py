"""A loopback HTTP server for binary caches, with faults (not a test module).

Run as a program: ``python cacheserver.py <root dir>``; it binds
127.0.0.1 on a free port, prints the port on its first line and serves
``<root>/<cache>/<file>`` until terminated.  A first path component
``fault-<mode>`` selects a misbehaviour for NAR files (``nar/...``) and
narinfo files of the cache named next:

* ``500``: always "500 Internal Server Error";
* ``500once``: 500 on the first request of each file, then the file;
* ``stall``: headers and half the body, then silence for 30 s;
* ``truncate``: announce the full length, send half, close;
* ``corrupt``: the file with bytes in its middle flipped.

``GET /_stats`` returns a JSON object: request path -> number of requests.
``start(root)`` starts it as a child process and returns (Popen, base URL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATS: dict[str, int] = {}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    root = "."
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY each
    # response of a kept-alive connection would wait ~40 ms for the client's
    # delayed ACK (real servers such as nginx set it too).
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        with LOCK:
            STATS[self.path] = STATS.get(self.path, 0) + 1
            count = STATS[self.path]
        if self.path == "/_stats":
            with LOCK:
                return self._send(200, json.dumps(STATS).encode())
        parts = self.path.lstrip("/").split("/")
        mode = ""
        if parts[0].startswith("fault-"):
            mode = parts.pop(0)[len("fault-"):]
        if ".." in parts:
            return self._send(403, b"")
        path = os.path.join(self.root, *parts)
        if not os.path.isfile(path):
            return self._send(404, b"not found")
        with open(path, "rb") as f:
            data = f.read()
        faulty = parts[-1].endswith(".narinfo") or "nar" in parts[1:2]
        if not faulty or not mode or (mode == "500once" and count > 1):
            return self._send(200, data)
        getattr(self, "_fault_" + mode.replace("500once", "500"))(data)

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _fault_500(self, data: bytes) -> None:
        self._send(500, b"oops")

    def _fault_stall(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2])
        self.wfile.flush()
        time.sleep(30)
        self.close_connection = True

    def _fault_truncate(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def _fault_corrupt(self, data: bytes) -> None:
        mid = len(data) // 2
        bad = data[:mid] + bytes(b ^ 0x55 for b in data[mid:mid + 16]) + data[mid + 16:]
        self._send(200, bad)


def main() -> None:
    Handler.root = sys.argv[1]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


def start(root: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, root], stdout=subprocess.PIPE)
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
