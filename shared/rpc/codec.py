"""RPC frame encoding: a 4-byte length, then a msgpack payload of one schema type.

Sans-IO.  Decoding is strict: the payload must be exactly one message of
the expected union (requests on the session side, replies on the worker
side), with no unknown fields, no missing fields and the declared types;
anything else is a ``WorkerViolation``.  Nothing is unpickled.
"""

from __future__ import annotations

import struct

import msgspec

from nixwarden.shared import limits
from nixwarden.shared.errors import WorkerViolation
from nixwarden.shared.rpc import schema

HEADER = struct.Struct("<I")

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(schema.Request)
_reply_decoder = msgspec.msgpack.Decoder(schema.Reply)


def encode(message) -> bytearray:
    """Return one whole frame (header and payload) for ``message``."""
    frame = bytearray(HEADER.size)
    _encoder.encode_into(message, frame, HEADER.size)  # no second copy for the header
    length = len(frame) - HEADER.size
    if length > limits.RPC_FRAME_MAX:
        raise ValueError(f"RPC message of {length} bytes is too large")
    HEADER.pack_into(frame, 0, length)
    return frame


#: A Chunk's payload before its data's msgpack bin header: the array of
#: two (tag, data), as ``encode(schema.Chunk(...))`` writes it.
_CHUNK_PREFIX = bytes(encode(schema.Chunk(memoryview(b""))))[HEADER.size:-2]


def chunk_frame_head(length: int) -> bytes:
    """Everything of ``encode(schema.Chunk(data))`` before ``data`` itself,
    for ``length`` bytes of data: a sender can then write the data from
    where it lies (``os.writev``) instead of copying it into a frame."""
    if length < 0x100:
        bin_head = b"\xc4" + length.to_bytes(1, "big")
    elif length < 0x10000:
        bin_head = b"\xc5" + length.to_bytes(2, "big")
    else:
        bin_head = b"\xc6" + length.to_bytes(4, "big")
    payload = len(_CHUNK_PREFIX) + len(bin_head) + length
    if payload > limits.RPC_FRAME_MAX:
        raise ValueError(f"RPC message of {payload} bytes is too large")
    return HEADER.pack(payload) + _CHUNK_PREFIX + bin_head


def frame_length(header: bytes) -> int:
    """Check a frame header and return the payload length it announces."""
    (length,) = HEADER.unpack(header)
    if length > limits.RPC_FRAME_MAX:
        raise WorkerViolation(f"RPC frame of {length} bytes exceeds the limit")
    return length


def decode_request(payload: bytes):
    """Decode a worker's request, or raise ``WorkerViolation``."""
    try:
        return _request_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WorkerViolation(f"malformed RPC request: {exc}") from None


def decode_reply(payload: bytes):
    """Decode a session's reply (the worker side's strictness is the same)."""
    try:
        return _reply_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WorkerViolation(f"malformed RPC reply: {exc}") from None
