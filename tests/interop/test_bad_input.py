"""Hostile and broken clients against a nixwarden socket daemon.

Each case sends something wrong after a good handshake (or drops the
connection) and checks what that client sees: an error and a closed
connection, never a hang.  After each case another client must still get
correct answers, and the supervisor must still be running.  Spec
worker-protocol §5.0 (when the stream cannot be delimited: one
STDERR_ERROR, then close), STYLE.md §3.2 (garbage invariant).
"""

from __future__ import annotations

import random
import shutil
import socket
import struct
import threading
import time

import pytest

from conftest import needs_nix
from lib.nixenv import NixEnv, new_root, start_nixwarden
from lib.wclient import ERROR, DaemonError, WClient

pytestmark = [needs_nix, pytest.mark.interop, pytest.mark.usefixtures("check_unaffected")]

u64 = WClient.u64
s = WClient.s


@pytest.fixture(scope="module")
def served():
    root = new_root()
    env = NixEnv(root)
    path = env.add_text("good.txt", "good\n")
    nar = env.run("nix-store", "--dump", path, remote="local").stdout
    daemon = start_nixwarden(env)
    yield env, daemon, path, nar
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def check_unaffected(served):
    """After the test: the supervisor runs and a new client is served."""
    yield
    env, daemon, path, nar = served
    assert daemon.proc.poll() is None, daemon.output()
    c = WClient(env.socket_path)
    assert c.is_valid_path(path) is True
    assert c.nar_from_path(path, len(nar)) == nar
    c.close()


def read_to_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the daemon sends until it closes; fails after ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"daemon did not close the connection; got {data!r}")
    return data


def error_then_close(c: WClient, message: str | None = None) -> None:
    """The daemon sends one STDERR_ERROR (with ``message``) and closes."""
    with pytest.raises(DaemonError) as err:
        c.wait_last()
    if message is not None:
        assert str(err.value) == message
    assert c.rbuf + read_to_eof(c.sock) == b""


# --- malformed requests -----------------------------------------------------------

def test_unknown_op(served):
    env = served[0]
    c = WClient(env.socket_path)
    c.send(u64(99))
    error_then_close(c, "invalid operation 99")


def test_huge_op_code(served):
    """As nix-daemon 2.8 (without its colour codes): an error, then close."""
    env = served[0]
    c = WClient(env.socket_path)
    c.send(u64(1 << 63))
    error_then_close(c, "serialised integer 9223372036854775808 is too large for type 'j'")


def test_op_nixwarden_does_not_implement(served):
    from nixwarden.shared.wire.ops import Op
    from nixwarden.worker.ops import OPS, register_all
    register_all()
    missing = sorted(set(Op) - set(OPS))
    if not missing:
        pytest.skip("every op is implemented")
    env = served[0]
    c = WClient(env.socket_path)
    c.send(u64(missing[0]))
    error_then_close(c, f"operation '{missing[0].name}' is not supported by nixwarden yet")


@pytest.mark.parametrize("minor", [21, 38])
def test_absurd_string_length(served, minor):
    """A 2^60-byte path: refused at once, nothing allocated, connection closed."""
    env = served[0]
    c = WClient(env.socket_path, minor)
    start = time.monotonic()
    c.send(u64(1) + u64(1 << 60) + b"x" * 64)
    error_then_close(c)
    assert time.monotonic() - start < 5


def test_absurd_list_length(served):
    env = served[0]
    c = WClient(env.socket_path)
    c.send(u64(31) + u64(1 << 60) + s("x") * 4)  # QueryValidPaths
    error_then_close(c)


@pytest.mark.parametrize("pad", [b"\0\0\0\x01", b"\x80\0\0\0"])
def test_non_zero_padding(served, pad):
    env = served[0]
    c = WClient(env.socket_path)
    c.send(u64(1) + u64(12) + b"/nix/store/x" + pad)
    error_then_close(c)


def test_truncated_request_then_half_close(served):
    """EOF inside a request: the daemon closes without waiting for more."""
    env = served[0]
    c = WClient(env.socket_path)
    c.send(u64(26) + u64(100) + b"/nix/store/abc")
    c.sock.shutdown(socket.SHUT_WR)
    data = c.rbuf + read_to_eof(c.sock)
    assert data == b"" or data[:8] == u64(ERROR)


def test_truncated_frame_header(served):
    env = served[0]
    c = WClient(env.socket_path)
    c.send(b"\x01\0\0")  # three bytes of an op code
    c.sock.shutdown(socket.SHUT_WR)
    data = c.rbuf + read_to_eof(c.sock)
    assert data == b"" or data[:8] == u64(ERROR)  # the client cannot read it anyway


def test_disconnect_mid_request(served):
    env = served[0]
    for payload in (u64(26) + u64(100) + b"/nix/sto", u64(31) + u64(3) + s("a"), u64(19)):
        c = WClient(env.socket_path)
        c.send(payload)
        c.close()


def test_disconnect_during_handshake(served):
    env = served[0]
    for payload in (b"", struct.pack("<Q", 0x6E697863), struct.pack("<Q", 0x6E697863)[:5]):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(env.socket_path)
        sock.sendall(payload)
        sock.close()


def test_disconnect_while_reading_a_nar(served):
    env, _, path, _ = served
    c = WClient(env.socket_path)
    c.send(u64(38) + s(path))
    c.close()


# --- load -------------------------------------------------------------------------

def test_fifty_concurrent_clients(served):
    env, _, path, nar = served
    errors, results = [], []
    barrier = threading.Barrier(50)

    def client(i):
        try:
            c = WClient(env.socket_path, [21, 32, 35, 37, 38][i % 5])
            barrier.wait(timeout=30)
            info = c.query_path_info(path)
            got = c.nar_from_path(path, len(nar))
            results.append((info["narSize"], got == nar, c.is_valid_path(path)))
            c.close()
        except Exception as exc:  # collected and reported below
            errors.append(repr(exc))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert results == [(len(nar), True, True)] * 50


# --- garbage invariant ------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_after_handshake(served, seed):
    """Seeded garbage: each connection ends (error or EOF), never hangs; the
    supervisor survives (checked after each seed by check_unaffected)."""
    env = served[0]
    rng = random.Random(seed)
    codes = [1, 4, 5, 6, 11, 18, 19, 23, 26, 29, 30, 31, 33, 38, 40, 41, 43]
    for _ in range(10):
        c = WClient(env.socket_path, rng.choice([21, 26, 32, 35, 38]))
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300)))
        if rng.random() < 0.6:  # a real op code keeps it past the dispatcher
            junk = u64(rng.choice(codes)) + junk
        c.send(junk)
        c.sock.shutdown(socket.SHUT_WR)
        read_to_eof(c.sock)
        c.close()
