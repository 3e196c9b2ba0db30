"""The session side fails closed against a hostile worker (DESIGN.md §2 rules 3-6,
STYLE.md 1.5, 1.6 and 3.5).

A real session process is started the way the supervisor starts one
(tests/fakes/session_harness.py: SessionPool fork, session_main,
SessionHandle.assign) on a temporary store made by the real
``nix-store --add``; the test plays the worker on the session's RPC
channel.  Each violation must end the session with a non-zero status and
one log line naming the reason, leave the database and the store
byte-identical, and leave another session on the same store working.

The last tests crash workers of a full daemon (SIGSEGV): only that
connection ends, and after more than ``limits.ZYGOTE_MAX_CRASHES`` crashes
the zygote is replaced by a fresh process while the daemon keeps serving.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import msgspec
import pytest

from conftest import needs_nix, needs_root
from lib.nixenv import NixEnv, new_root
from lib.wclient import WClient

from nixwarden.shared import limits
from nixwarden.shared.rpc import codec, schema
from nixwarden.shared.rpc.channel import Channel, open_pipes
from lib.procs import children as _children, title as _title

pytestmark = [needs_root, needs_nix, pytest.mark.root]

HARNESS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fakes",
                       "session_harness.py")
VIOLATION = "worker violation: session pid="


class _Boom:
    """A pickle payload that would create a file if anything unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class FakeWorker:
    """One real session process and the worker end of its RPC channel."""

    def __init__(self, env, uid: int = 1000, trusted: bool = False):
        (s_in, s_out), (self.rpc_in, self.rpc_out) = open_pipes()
        self.stderr_path = os.path.join(env.root, f"session-{time.time_ns()}.err")
        self._err = open(self.stderr_path, "wb")
        penv = dict(env.env)
        penv.pop("NIX_REMOTE", None)
        self.proc = subprocess.Popen(
            [sys.executable, HARNESS, "--rpc-in", str(s_in), "--rpc-out", str(s_out),
             "--uid", str(uid), "--trusted", str(int(trusted))],
            pass_fds=[s_in, s_out], env=penv, stdout=subprocess.PIPE,
            stderr=self._err, stdin=subprocess.DEVNULL)
        os.close(s_in)
        os.close(s_out)
        line = self.proc.stdout.readline().decode()
        assert line.startswith("session "), (line, self.stderr())
        self.session_pid = int(line.split()[1])
        self.channel = Channel(self.rpc_in, self.rpc_out)
        self.logs: list[str] = []

    def request(self, message):
        """Send ``message``; return its reply (in-band log lines are kept in
        ``self.logs``)."""
        self.channel.send(message)
        while True:
            reply = codec.decode_reply(self.channel.recv_frame())
            if not isinstance(reply, schema.LogLine):
                return reply
            self.logs.append(reply.text)

    def send_raw(self, data: bytes) -> None:
        self.channel.send_frame(data)

    def end_requests(self) -> None:
        """Close the request pipe, as a worker does when its client leaves."""
        if self.rpc_out >= 0:
            os.close(self.rpc_out)
            self.rpc_out = -1

    def frame(self, payload: bytes) -> None:
        self.send_raw(codec.HEADER.pack(len(payload)) + payload)

    def session_exit(self, timeout: float = 20.0) -> int:
        """Wait for the session to end; return its exit status."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"session did not exit:\n{self.stderr()}")
        lines = [l for l in out.decode().splitlines() if l.startswith("exit ")]
        assert lines, (out, self.stderr())
        return int(lines[-1].split()[1])

    def channel_closed(self) -> bool:
        """After the session's end the worker sees EOF on its channel."""
        readable, _, _ = select.select([self.rpc_in], [], [], 10)
        return bool(readable) and os.read(self.rpc_in, 1) == b""

    def stderr(self) -> str:
        self._err.flush()
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace")

    def close(self) -> None:
        self.end_requests()
        os.close(self.rpc_in)
        try:
            self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
        self._err.close()

    def kill(self) -> None:
        for pid in (self.session_pid, self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def store_state(env) -> tuple:
    """Bytes of the database and a listing of the store (names, modes, sizes)."""
    with open(os.path.join(env.root, "var/nix/db/db.sqlite"), "rb") as f:
        db = hashlib.sha256(f.read()).hexdigest()
    listing = []
    for top, dirs, files in os.walk(env.store_dir):
        for name in sorted(dirs + files):
            st = os.lstat(os.path.join(top, name))
            listing.append((os.path.relpath(os.path.join(top, name), env.store_dir),
                            st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid))
    return db, sorted(listing)


@pytest.fixture(scope="module")
def store():
    env = NixEnv(new_root())
    env.path = env.add_text("hello", "hello\n")
    yield env
    shutil.rmtree(env.root, ignore_errors=True)


@pytest.fixture
def workers(store):
    started = []

    def start(**kw):
        w = FakeWorker(store, **kw)
        started.append(w)
        return w
    yield start
    for w in started:
        w.close()


@pytest.fixture(scope="module")
def bystander(store):
    """A session on the same store that must outlive every violation."""
    w = FakeWorker(store, uid=1001)
    yield w
    w.close()


def test_harness_serves_valid_requests(store, workers):
    w = workers()
    assert w.request(schema.IsValidPath(store.path)) == schema.Bool(True)
    reply = w.request(schema.QueryPathInfo(store.path))
    assert reply.info.path == store.path
    w.end_requests()
    assert w.session_exit() == 0


def _violations(store, tmp_marker):
    sd = store.store_dir
    base = os.path.basename(store.path)
    other = "/nix/store/" + base if sd != "/nix/store" else "/other/store/" + base
    enc = msgspec.msgpack.encode
    return {
        "pickle": lambda w: w.frame(pickle.dumps(_Boom(tmp_marker))),
        "oversized-header": lambda w: w.send_raw(codec.HEADER.pack(limits.RPC_FRAME_MAX + 1)),
        "max-header": lambda w: w.send_raw(codec.HEADER.pack(0xFFFFFFFF)),
        "truncated-then-eof": lambda w: (w.send_raw(codec.HEADER.pack(100) + b"\x92\x04"),
                                         w.end_requests()),
        "header-only-then-eof": lambda w: (w.send_raw(b"\x05\x00"),
                                           w.end_requests()),
        "unknown-type-id": lambda w: w.frame(enc([98, store.path])),
        "reply-type-as-request": lambda w: w.frame(enc([1])),
        "missing-field": lambda w: w.frame(enc([4])),
        "extra-field": lambda w: w.frame(enc([4, store.path, "extra"])),
        "wrong-type": lambda w: w.frame(enc([4, 12345])),
        "map-not-array": lambda w: w.frame(enc({"t": 4, "path": store.path})),
        "trailing-bytes": lambda w: w.frame(enc([4, store.path]) + b"\x00"),
        "empty-frame": lambda w: w.frame(b""),
        "path-outside-store": lambda w: w.channel.send(schema.IsValidPath("/etc/passwd")),
        "path-dotdot": lambda w: w.channel.send(
            schema.QueryPathInfo(f"{sd}/../../../etc/passwd")),
        "path-other-store-dir": lambda w: w.channel.send(schema.QueryPathInfo(other)),
        "path-in-list": lambda w: w.channel.send(
            schema.QueryValidPaths([store.path, "/etc/shadow"], False)),
        "temp-root-outside-store": lambda w: w.channel.send(schema.AddTempRoot("/etc")),
        "abandon-outside-import": lambda w: w.channel.send(schema.ImportAbandoned()),
        "batch-end-outside-batch": lambda w: w.channel.send(schema.EndNarBatch()),
        "query-inside-batch": lambda w: (w.channel.send(schema.AddNarBatch()),
                                         w.channel.send(schema.IsValidPath(store.path))),
        "nested-batch": lambda w: (w.channel.send(schema.AddNarBatch()),
                                   w.channel.send(schema.AddNarBatch())),
    }


VIOLATION_CASES = [
    "pickle", "oversized-header", "max-header", "truncated-then-eof",
    "header-only-then-eof", "unknown-type-id", "reply-type-as-request",
    "missing-field", "extra-field", "wrong-type", "map-not-array",
    "trailing-bytes", "empty-frame", "path-outside-store", "path-dotdot",
    "path-other-store-dir", "path-in-list",
    "temp-root-outside-store", "abandon-outside-import",
    "batch-end-outside-batch", "query-inside-batch", "nested-batch",
]


@pytest.mark.parametrize("case", VIOLATION_CASES)
def test_violation_ends_only_that_session(store, workers, bystander, tmp_path, case):
    marker = str(tmp_path / "unpickled")
    w = workers()
    assert w.request(schema.IsValidPath(store.path)) == schema.Bool(True)
    before = store_state(store)

    _violations(store, marker)[case](w)

    status = w.session_exit()
    err = w.stderr()
    assert status != 0, err
    assert w.channel_closed()
    violation_lines = [l for l in err.splitlines() if VIOLATION in l]
    assert len(violation_lines) == 1, err
    assert f"pid={w.session_pid} " in violation_lines[0]
    assert "uid=1000" in violation_lines[0]
    assert store_state(store) == before
    assert not os.path.exists(marker), "the session unpickled worker bytes"
    # Another session on the same store is unaffected.
    assert bystander.request(schema.IsValidPath(store.path)) == schema.Bool(True)
    assert bystander.request(schema.QueryAllValidPaths()) == schema.Paths([store.path])
    assert VIOLATION not in bystander.stderr()


def test_violation_reasons_are_named(store, workers, tmp_path):
    expected = {
        "oversized-header": "exceeds the limit",
        "truncated-then-eof": "closed mid-frame",
        "path-outside-store": "bad store path",
        "path-other-store-dir": "bad store path",
        "missing-field": "malformed RPC request",
        "pickle": "malformed RPC request",
    }
    cases = _violations(store, str(tmp_path / "m"))
    for case, reason in expected.items():
        w = workers()
        cases[case](w)
        assert w.session_exit() != 0
        line = [l for l in w.stderr().splitlines() if VIOLATION in l]
        assert line and reason in line[0], (case, w.stderr())


def test_dotdot_path_is_canonicalised_never_followed(store, workers):
    """``X/../X`` names X after Nix's lexical canonPath; the session answers
    for the canonical path only (an escaping ``..`` is a violation, above)."""
    w = workers()
    base = os.path.basename(store.path)
    reply = w.request(schema.QueryPathInfo(f"{store.path}/../{base}"))
    assert reply.info is not None and reply.info.path == store.path
    reply = w.request(schema.QueryValidPaths([f"{store.store_dir}/./{base}"], False))
    assert reply == schema.Paths([store.path])
    w.end_requests()
    assert w.session_exit() == 0


def test_rpc_channel_cannot_carry_descriptors(store, workers, tmp_path):
    """The RPC channel is two pipes: SCM_RIGHTS cannot be sent on it at all,
    and the session holds no socket a worker could reach."""
    secret = tmp_path / "passed-fd-target"
    secret.write_text("x")
    w = workers()
    assert w.request(schema.IsValidPath(store.path)) == schema.Bool(True)
    fd = os.open(secret, os.O_RDONLY)
    carrier = os.dup(w.rpc_out)
    try:
        with pytest.raises(OSError) as refused:
            socket.send_fds(socket.socket(fileno=carrier),
                            [codec.encode(schema.IsValidPath(store.path))], [fd])
        assert refused.value.errno == errno.ENOTSOCK
    finally:
        os.close(fd)
        os.close(carrier)
    targets = [os.readlink(f"/proc/{w.session_pid}/fd/{n}")
               for n in os.listdir(f"/proc/{w.session_pid}/fd")]
    assert str(secret) not in targets
    assert not [t for t in targets if t.startswith("socket:")], targets
    mine = {os.readlink(f"/proc/self/fd/{n}") for n in (w.rpc_in, w.rpc_out)}
    assert mine <= set(targets), "the session holds the other ends of our pipes"
    assert w.request(schema.IsValidPath(store.path)) == schema.Bool(True)
    w.end_requests()
    assert w.session_exit() == 0


IDENTITY_WORDS = {"uid", "gid", "pid", "user", "users", "trust", "trusted", "identity",
                  "cred", "creds", "credentials", "privileged", "peer"}


def test_schema_carries_no_identity_fields():
    """Identity and trust are the session's; no request can claim them (1.4)."""
    assert schema.Request.__args__
    for cls in schema.Request.__args__:
        for name in cls.__struct_fields__:
            words = set(name.lower().split("_"))
            assert not words & IDENTITY_WORDS and "uid" not in name.lower() \
                and "trust" not in name.lower(), \
                f"{cls.__name__}.{name} looks like an identity field"


def test_untrusted_session_trust_is_fixed(store, workers):
    """SetOptions cannot make an untrusted session trusted."""
    w = workers(trusted=False)
    req = schema.SetOptions(False, False, False, 3, 1, 0, False, 0, True,
                            [("trusted-users", "*"), ("sandbox", "false")])
    reply = w.request(req)
    assert isinstance(reply, schema.Warnings)
    # The restricted-setting notices travel as debug-level log lines (as 2.8).
    assert any("'trusted-users'" in l and "not a trusted user" in l for l in w.logs)
    assert any("'sandbox'" in l for l in w.logs)
    w.logs.clear()
    reply = w.request(req)
    assert any("'trusted-users'" in l for l in w.logs)


# --- full daemon: crashed workers ----------------------------------------------

@pytest.fixture
def daemon_store(nixenv):
    nixenv.path = nixenv.add_text("hello", "hello\n")
    return nixenv






def _zygote(daemon_pid: int) -> int:
    def find():
        found = [p for p in _children(daemon_pid) if _title(p) == "nixwarden worker-zygote"]
        return found[0] if len(found) == 1 else None
    return _wait_for(find, what="the worker zygote")


def _wait_for(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _serving_worker(daemon_pid: int, uid: int, exclude=()) -> int:
    def find():
        zyg = _zygote(daemon_pid)
        found = [p for p in _children(zyg)
                 if _title(p) == f"nixwarden worker uid={uid}" and p not in exclude]
        return found[0] if len(found) == 1 else None
    return _wait_for(find, what="the serving worker")


def test_crashed_worker_ends_only_its_connection(daemon_store, nixwarden):
    store = daemon_store
    first = WClient(store.socket_path, 35)
    w1 = _serving_worker(nixwarden.proc.pid, 0)
    second = WClient(store.socket_path, 35)
    w2 = _serving_worker(nixwarden.proc.pid, 0, exclude={w1})
    assert second.is_valid_path(store.path)
    before = store_state(store)

    os.kill(w1, signal.SIGSEGV)
    with pytest.raises((EOFError, ConnectionError)):
        first.is_valid_path(store.path)
    first.close()

    assert second.is_valid_path(store.path)
    third = WClient(store.socket_path, 35)
    assert third.is_valid_path(store.path)
    assert nixwarden.proc.poll() is None
    assert os.path.exists(f"/proc/{w2}")
    assert store_state(store) == before
    second.close()
    third.close()


def test_zygote_replaced_after_too_many_crashes(daemon_store, nixwarden):
    store = daemon_store
    daemon_pid = nixwarden.proc.pid
    old = _zygote(daemon_pid)
    crashed = set()
    deadline = time.monotonic() + 60
    while _zygote_alive(daemon_pid, old) and time.monotonic() < deadline:
        ready = [p for p in _children(old)
                 if _title(p) == "nixwarden worker (ready)" and p not in crashed]
        for pid in ready:
            try:
                os.kill(pid, signal.SIGSEGV)
                crashed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    assert len(crashed) >= limits.ZYGOTE_MAX_CRASHES
    assert len(crashed) <= limits.ZYGOTE_MAX_CRASHES + limits.WORKER_POOL + 2
    new = _wait_for(lambda: _new_zygote(daemon_pid, old), what="a new zygote")
    assert new != old
    assert nixwarden.proc.poll() is None
    client = WClient(store.socket_path, 35)
    assert client.is_valid_path(store.path)
    assert client.trusted == 1
    client.close()
    log = nixwarden.output()
    assert "asking for a fresh zygote" in log
    assert "starting a new one" in log


def _zygote_alive(daemon_pid: int, pid: int) -> bool:
    return pid in _children(daemon_pid) and _title(pid) == "nixwarden worker-zygote"


def _new_zygote(daemon_pid: int, old: int):
    found = [p for p in _children(daemon_pid)
             if _title(p) == "nixwarden worker-zygote" and p != old]
    return found[0] if found else None
