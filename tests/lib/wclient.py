"""A small worker-protocol client for tests, speaking any version 1.21-1.38.

Written from the spec (worker-protocol §3-§5), independently of the
daemon's own codec, so that a shared misunderstanding cannot hide.
"""

from __future__ import annotations

import socket
import struct

MAGIC_1 = 0x6E697863
MAGIC_2 = 0x6478696F
LAST, ERROR, NEXT = 0x616C7473, 0x63787470, 0x6F6C6D67
START, STOP, RESULT, READ, WRITE = 0x53545254, 0x53544F50, 0x52534C54, 0x64617461, 0x64617416


class DaemonError(Exception):
    pass


class WClient:
    def __init__(self, socket_path: str | None = None, minor: int = 38, *, sock=None,
                 features=(), send_set_options=True, version_twice=False):
        self.sock = sock or socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if sock is None:
            self.sock.connect(socket_path)
        self.sock.settimeout(30)
        self.rbuf = b""
        self.logs: list[str] = []
        self.minor = minor
        self.handshake(minor, features, version_twice)
        if send_set_options:
            self.set_options()

    # --- primitives ---
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    @staticmethod
    def u64(n: int) -> bytes:
        return struct.pack("<Q", n)

    @staticmethod
    def s(data) -> bytes:
        if isinstance(data, str):
            data = data.encode()
        return struct.pack("<Q", len(data)) + data + b"\0" * ((8 - len(data) % 8) % 8)

    def strs(self, items) -> bytes:
        items = list(items)
        return self.u64(len(items)) + b"".join(self.s(i) for i in items)

    def read(self, n: int) -> bytes:
        while len(self.rbuf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("daemon closed the connection")
            self.rbuf += chunk
        out, self.rbuf = self.rbuf[:n], self.rbuf[n:]
        return out

    def r_u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def r_str(self) -> str:
        n = self.r_u64()
        data = self.read(n)
        self.read((8 - n % 8) % 8)
        return data.decode()

    def r_strs(self) -> list[str]:
        return [self.r_str() for _ in range(self.r_u64())]

    # --- protocol ---
    def handshake(self, minor: int, features, version_twice: bool = False) -> None:
        """Run the client side of spec §3.2.  ``version_twice`` is the Nix 2.23
        quirk (§3.5): the version goes out with the magic and again later."""
        self.send(self.u64(MAGIC_1) + (self.u64((1 << 8) | minor) if version_twice else b""))
        assert self.r_u64() == MAGIC_2
        self.server_version = self.r_u64()
        self.send(self.u64((1 << 8) | minor))
        v = min(minor, self.server_version & 0xFF)
        self.version = v
        if v >= 38:
            self.send(self.strs(features))
            self.server_features = self.r_strs()
        if v >= 14:
            self.send(self.u64(0))
        if v >= 11:
            self.send(self.u64(0))
        self.daemon_version = self.r_str() if v >= 33 else None
        self.trusted = self.r_u64() if v >= 35 else None
        self.wait_last()

    def wait_last(self) -> None:
        """Read log messages until STDERR_LAST; raise DaemonError on STDERR_ERROR."""
        while True:
            tag = self.r_u64()
            if tag == LAST:
                return
            if tag == NEXT:
                self.logs.append(self.r_str())
            elif tag == ERROR:
                raise DaemonError(self._read_error())
            elif tag == START:
                self.r_u64(), self.r_u64(), self.r_u64(), self.r_str()
                self._read_fields()
                self.r_u64()
            elif tag == STOP:
                self.r_u64()
            elif tag == RESULT:
                self.r_u64(), self.r_u64()
                self._read_fields()
            elif not self._other_tag(tag):
                raise AssertionError(f"unknown log tag {tag:#x}")

    def _other_tag(self, tag: int) -> bool:
        """Handle a tag ``wait_last`` does not know; False if unknown here too."""
        return False

    def _read_fields(self) -> None:
        for _ in range(self.r_u64()):
            if self.r_u64() == 0:
                self.r_u64()
            else:
                self.r_str()

    def _read_error(self) -> str:
        if self.version >= 26:
            assert self.r_str() == "Error"
            self.r_u64()
            self.r_str()
            msg = self.r_str()
            assert self.r_u64() == 0
            for _ in range(self.r_u64()):
                self.r_u64(), self.r_str()
            return msg
        msg = self.r_str()
        self.exit_status = self.r_u64()
        return msg

    def set_options(self, overrides=(), verbosity=3) -> None:
        body = self.u64(19) + self.u64(0) * 3 + self.u64(verbosity) + self.u64(1)
        body += self.u64(0) + self.u64(1) + self.u64(0) + self.u64(0) * 2
        body += self.u64(2) + self.u64(1)
        body += self.u64(len(overrides)) + b"".join(self.s(k) + self.s(v) for k, v in overrides)
        self.send(body)
        self.wait_last()

    def op(self, code: int, payload: bytes = b"") -> None:
        self.send(self.u64(code) + payload)
        self.wait_last()

    def is_valid_path(self, path: str) -> bool:
        self.op(1, self.s(path))
        return self.r_u64() != 0

    def query_path_info(self, path: str):
        self.op(26, self.s(path))
        if self.version >= 17 and not self.r_u64():
            return None
        info = {"deriver": self.r_str(), "narHash": self.r_str(),
                "references": self.r_strs(), "registrationTime": self.r_u64(),
                "narSize": self.r_u64()}
        if self.version >= 16:
            info.update(ultimate=bool(self.r_u64()), sigs=self.r_strs(), ca=self.r_str())
        return info

    def query_valid_paths(self, paths, substitute: bool | None = None) -> list[str]:
        """QueryValidPaths (31); ``substitute`` is sent only from 1.27 on."""
        flag = self.u64(bool(substitute)) if self.version >= 27 else b""
        self.op(31, self.strs(paths) + flag)
        return self.r_strs()

    def query_substitutable_path_infos(self, paths) -> int:
        """QuerySubstitutablePathInfos (30): a set before 1.22, a map with CAs
        after; returns the number of infos (their bodies are skipped)."""
        paths = list(paths)
        if self.version >= 22:
            arg = self.u64(len(paths)) + b"".join(self.s(p) + self.s("") for p in paths)
        else:
            arg = self.strs(paths)
        self.op(30, arg)
        count = self.r_u64()
        for _ in range(count):
            self.r_str(), self.r_str(), self.r_strs(), self.r_u64(), self.r_u64()
        return count

    def nar_from_path(self, path: str, nar_len: int) -> bytes:
        self.op(38, self.s(path))
        return self.read(nar_len)

    def close(self) -> None:
        self.sock.close()
