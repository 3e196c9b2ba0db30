"""WClient with the ops that put data into the store (and take it out again).

Extends tests/lib/wclient.py (spec worker-protocol §4.5, §4.6, §5.6, §5.7,
§5.10, §5.14, §5.23, §5.33, §5.35, §5.36, §5.40): STDERR_READ is answered
from ``self.pull`` (bytes the daemon may ask for), STDERR_WRITE data is
collected in ``self.written``.
"""

from __future__ import annotations

from lib.wclient import WClient

READ, WRITE = 0x64617461, 0x64617416
EXPORT_MAGIC = 0x4558494E

OP_ADD_TO_STORE = 7
OP_ADD_TEXT_TO_STORE = 8
OP_ADD_TEMP_ROOT = 11
OP_EXPORT_PATH = 16
OP_IMPORT_PATHS = 27
OP_ADD_SIGNATURES = 37
OP_ADD_TO_STORE_NAR = 39
OP_QUERY_MISSING = 40
OP_ADD_MULTIPLE_TO_STORE = 44


class AddClient(WClient):
    def __init__(self, *args, **kwargs):
        self.pull = b""
        self.pulled_requests: list[int] = []
        self.written = bytearray()
        super().__init__(*args, **kwargs)

    def _other_tag(self, tag: int) -> bool:
        """The upload tags: answer a pull (READ), collect a push (WRITE)."""
        if tag == READ:
            n = self.r_u64()
            self.pulled_requests.append(n)
            data, self.pull = self.pull[:n], self.pull[n:]
            self.send(self.s(data))
        elif tag == WRITE:
            n = self.r_u64()
            self.written += self.read(n)
            self.read(-n % 8)
        else:
            return False
        return True

    # --- framing -------------------------------------------------------------------

    def send_frames(self, chunks, frame_size: int = 32768, end: bool = True) -> None:
        """Send an iterable of byte chunks as frames (and the zero frame)."""
        for chunk in chunks:
            for i in range(0, len(chunk), frame_size):
                part = chunk[i:i + frame_size]
                self.send(self.u64(len(part)) + part)
        if end:
            self.send(self.u64(0))

    # --- ops -----------------------------------------------------------------------

    def path_info_fields(self, *, deriver="", nar_hash="", refs=(), reg_time=0,
                         nar_size=0, ultimate=False, sigs=(), ca="") -> bytes:
        return (self.s(deriver) + self.s(nar_hash) + self.strs(sorted(refs))
                + self.u64(reg_time) + self.u64(nar_size) + self.u64(int(ultimate))
                + self.strs(sigs) + self.s(ca))

    def add_to_store_nar(self, path: str, nar: bytes, *, nar_hash: str | None = None,
                         nar_size: int | None = None, repair=False, dont_check_sigs=False,
                         frame_size=32768, chunks=None, **fields) -> None:
        """AddToStoreNar in the transport of the negotiated version."""
        import hashlib
        if nar_hash is None:
            nar_hash = hashlib.sha256(nar).hexdigest()
        if nar_size is None:
            nar_size = len(nar)
        head = (self.u64(OP_ADD_TO_STORE_NAR) + self.s(path)
                + self.path_info_fields(nar_hash=nar_hash, nar_size=nar_size, **fields)
                + self.u64(int(repair)) + self.u64(int(dont_check_sigs)))
        if self.version >= 23:
            self.send(head)
            self.send_frames(chunks if chunks is not None else [nar], frame_size)
        elif self.version >= 21:
            self.pull = nar
            self.send(head)
        else:
            self.send(head + nar)
        self.wait_last()

    def add_to_store(self, name: str, method: str, data: bytes, refs=(), repair=False,
                     frame_size=32768) -> dict:
        """The >= 1.25 AddToStore; returns the path info."""
        self.send(self.u64(OP_ADD_TO_STORE) + self.s(name) + self.s(method)
                  + self.strs(sorted(refs)) + self.u64(int(repair)))
        self.send_frames([data], frame_size)
        self.wait_last()
        path = self.r_str()
        info = {"path": path, "deriver": self.r_str(), "narHash": self.r_str(),
                "references": self.r_strs(), "registrationTime": self.r_u64(),
                "narSize": self.r_u64()}
        if self.version >= 16:
            info.update(ultimate=bool(self.r_u64()), sigs=self.r_strs(), ca=self.r_str())
        return info

    def add_to_store_old(self, name: str, fixed: bool, recursive: int, algo: str,
                         nar: bytes) -> str:
        """The < 1.25 AddToStore (raw NAR inline); returns the path."""
        self.send(self.u64(OP_ADD_TO_STORE) + self.s(name) + self.u64(int(fixed))
                  + self.u64(recursive) + self.s(algo) + nar)
        self.wait_last()
        return self.r_str()

    def add_text_to_store(self, name: str, text: bytes, refs=()) -> str:
        self.op(OP_ADD_TEXT_TO_STORE, self.s(name) + self.s(text) + self.strs(sorted(refs)))
        return self.r_str()

    def add_multiple(self, items, repair=False, dont_check_sigs=False, frame_size=32768) -> None:
        """``items``: [(path, nar, fields dict)] in dependency order."""
        import hashlib
        body = self.u64(len(items))
        for path, nar, fields in items:
            fields = dict(fields)
            fields.setdefault("nar_hash", hashlib.sha256(nar).hexdigest())
            fields.setdefault("nar_size", len(nar))
            body += self.s(path) + self.path_info_fields(**fields) + nar
        self.send(self.u64(OP_ADD_MULTIPLE_TO_STORE) + self.u64(int(repair))
                  + self.u64(int(dont_check_sigs)))
        self.send_frames([body], frame_size)
        self.wait_last()

    def import_paths(self, stream: bytes) -> list[str]:
        self.pull = stream
        self.op(OP_IMPORT_PATHS)
        return self.r_strs()

    def export_path(self, path: str) -> bytes:
        self.written = bytearray()
        self.op(OP_EXPORT_PATH, self.s(path) + self.u64(0))
        assert self.r_u64() == 1
        return bytes(self.written)

    def add_signatures(self, path: str, sigs) -> None:
        self.op(OP_ADD_SIGNATURES, self.s(path) + self.strs(sigs))
        assert self.r_u64() == 1

    def add_temp_root(self, path: str) -> None:
        self.op(OP_ADD_TEMP_ROOT, self.s(path))
        assert self.r_u64() == 1

    def query_missing(self, targets):
        self.op(OP_QUERY_MISSING, self.strs(targets))
        return (self.r_strs(), self.r_strs(), self.r_strs(), self.r_u64(), self.r_u64())


def export_record(nar: bytes, path: str, refs=(), deriver="") -> bytes:
    """One export record (spec §2.16), without the leading 1."""
    return (nar + WClient.u64(EXPORT_MAGIC) + WClient.s(path)
            + WClient.u64(len(refs)) + b"".join(WClient.s(r) for r in sorted(refs))
            + WClient.s(deriver) + WClient.u64(0))


def import_stream(records) -> bytes:
    return b"".join(WClient.u64(1) + r for r in records) + WClient.u64(0)
