"""The RPC channel's bulk path: Chunk frames written from pieces, read into one buffer.

Real pipes (``open_pipes``), a writer thread where a frame exceeds the
pipe's capacity, and the strict codec on the receiving side.
"""

from __future__ import annotations

import fcntl
import os
import threading

import pytest

from nixwarden.shared import limits, nar
from nixwarden.shared.errors import WorkerViolation
from nixwarden.shared.rpc import codec, schema
from nixwarden.shared.rpc.channel import Channel, ChannelClosed, open_pipes

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@pytest.fixture
def channel_pair():
    session_ends, worker_ends = open_pipes()
    session, worker = Channel(*session_ends), Channel(*worker_ends)
    yield session, worker
    session.close()
    worker.close()


def _in_thread(fn):
    thread = threading.Thread(target=fn)
    thread.start()
    return thread


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 70000, 1 << 20])
def test_chunk_frame_head_is_what_encode_writes(size):
    data = os.urandom(size)
    assert codec.chunk_frame_head(size) + data == bytes(codec.encode(schema.Chunk(data)))


def test_chunk_frame_head_refuses_oversized_frames():
    with pytest.raises(ValueError, match="too large"):
        codec.chunk_frame_head(limits.RPC_FRAME_MAX)


def test_pieces_arrive_as_one_chunk(channel_pair):
    session, worker = channel_pair
    fcntl.fcntl(worker.write_fd, F_SETPIPE_SZ, 4096)  # many partial writev calls
    pieces = [os.urandom(n) for n in (1, 4095, 30000, 7, 65536, 100000)]
    writer = _in_thread(lambda: (worker.send_chunk(pieces), worker.send(schema.End())))
    payload = session.recv_frame(bulk=True)
    msg = codec.decode_request(payload)
    writer.join()
    assert isinstance(msg, schema.Chunk) and bytes(msg.data) == b"".join(pieces)
    assert msg.data.readonly
    assert isinstance(codec.decode_request(session.recv_frame(bulk=True)), schema.End)


def test_small_frames_after_a_bulk_read_stay_in_sync(channel_pair):
    session, worker = channel_pair
    worker.send_chunk([b"abc"])
    worker.send(schema.IsValidPath("/nix/store/x"))
    worker.send(schema.End())
    assert bytes(codec.decode_request(session.recv_frame(bulk=True)).data) == b"abc"
    assert codec.decode_request(session.recv_frame()) == schema.IsValidPath("/nix/store/x")
    assert isinstance(codec.decode_request(session.recv_frame(bulk=True)), schema.End)


def test_frame_larger_than_the_preallocation_is_joined(channel_pair):
    session, worker = channel_pair
    data = os.urandom(Channel.PREALLOCATE + 12345)
    writer = _in_thread(lambda: worker.send_chunk([data]))
    msg = codec.decode_request(session.recv_frame(bulk=True))
    writer.join()
    assert bytes(msg.data) == data


@pytest.mark.parametrize("bulk", [False, True])
def test_truncated_frame_is_a_violation(channel_pair, bulk):
    session, worker = channel_pair
    frame = bytes(codec.encode(schema.Chunk(b"x" * 100000)))
    writer = _in_thread(lambda: (os.write(worker.write_fd, frame[:70000]),
                                 os.close(worker.write_fd)))
    with pytest.raises(WorkerViolation, match="closed mid-frame"):
        session.recv_frame(bulk=bulk)
    writer.join()
    worker.write_fd = -1


def test_clean_end_between_frames(channel_pair):
    session, worker = channel_pair
    os.close(worker.write_fd)
    worker.write_fd = -1
    with pytest.raises(ChannelClosed):
        session.recv_frame(bulk=True)


def _one_file_nar(data: bytes) -> bytes:
    def s(b: bytes) -> bytes:
        return len(b).to_bytes(8, "little") + b + bytes(-len(b) % 8)
    return b"".join(s(x) for x in (b"nix-archive-1", b"(", b"type", b"regular",
                                   b"contents", data, b")"))


def test_nar_parser_shares_read_only_input_and_copies_writable_input():
    body = b"0123456789abcdef" * 64
    buf = bytearray(_one_file_nar(body))
    shared = [e for e in nar.NarParser().feed(memoryview(buf).toreadonly())
              if isinstance(e, nar.Contents)]
    copied = [e for e in nar.NarParser().feed(memoryview(buf))
              if isinstance(e, nar.Contents)]
    start = buf.index(body)
    buf[start:start + 4] = b"XXXX"  # the owner breaks its promise, to tell them apart
    assert bytes(shared[0].data).startswith(b"XXXX")
    assert bytes(copied[0].data) == body
