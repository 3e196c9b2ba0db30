"""One client connection, from handshake to the end of the op loop.

Client phases (STYLE.md 2.4), in order and each entered once:

  HELLO      read magic, send server hello, read client version
  FEATURES   (>= 1.38) exchange feature sets
  SETUP      read affinity/reserveSpace, send version and trust, STDERR_LAST
  OPS        read an op code, read its request, run it, answer; repeat
  CLOSED     end of input at an op boundary, or an unrecoverable error

The only module that sequences client-socket I/O.  Process: worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nixwarden.shared import limits
from nixwarden.shared.errors import ClientProtocolError, StoreRefusal
from nixwarden.shared.storepath import StoreDir
from nixwarden.shared.wire import primitives as w
from nixwarden.shared.wire.ops import (
    MIN_CLIENT_VERSION, SERVER_FEATURES, SERVER_VERSION, WORKER_MAGIC_1,
    WORKER_MAGIC_2, Op, ProtocolVersion, TrustedFlag)
from nixwarden.worker.connection import ClientConnection, ClientGone
from nixwarden.worker.logger import ClientLogger
from nixwarden.worker.ops import OPS, OpContext

log = logging.getLogger("nixwarden.worker")

FEATURE_EXCHANGE = ProtocolVersion(1, 38)
AFFINITY = ProtocolVersion(1, 14)
RESERVE_SPACE = ProtocolVersion(1, 11)
DAEMON_VERSION = ProtocolVersion(1, 33)
TRUST_FLAG = ProtocolVersion(1, 35)
MAX_FEATURES = 64
MAX_FEATURE_LEN = 256

#: Ops after whose error the connection is closed.  Nix <= 2.23 clients
#: ignore the error of NarFromPath (RemoteStore::narFromPath drops the
#: exception returned by processStderr) and read on as if a NAR followed;
#: kept open, the connection would hang.  Closed, they fail with
#: "unexpected end-of-file", as with the C++ daemon, which drops the
#: connection there too (spec worker-protocol §5.34).
CLOSE_AFTER_ERROR = frozenset({Op.NAR_FROM_PATH})


@dataclass(frozen=True)
class ServerInfo:
    """What the handshake announces; fixed by the supervisor's assignment."""

    nix_version: str
    trusted: bool
    store_dir: str
    real_store_dir: str


def handshake(conn: ClientConnection, info: ServerInfo) -> tuple[ProtocolVersion, frozenset]:
    """Run the handshake (spec §3.2) and return the negotiated version and features."""
    magic = conn.read(w.u32(), at_boundary=True)
    if magic != WORKER_MAGIC_1:
        raise ClientProtocolError("protocol mismatch")
    conn.write(w.w_u64(WORKER_MAGIC_2) + w.w_u64(SERVER_VERSION.to_wire()))
    conn.flush()
    client = ProtocolVersion.from_wire(conn.read(w.u32()))
    version = min(client, SERVER_VERSION)
    if client.major != 1 or version < MIN_CLIENT_VERSION:
        raise ClientProtocolError("the Nix client version is too old")
    features = frozenset()
    if version >= FEATURE_EXCHANGE:
        theirs = conn.read(w.strings(MAX_FEATURES, MAX_FEATURE_LEN))
        conn.write(w.w_string_set(SERVER_FEATURES))
        conn.flush()
        features = SERVER_FEATURES & frozenset(theirs)
    if version >= AFFINITY and conn.read(w.u64()):
        conn.read(w.u64())
    if version >= RESERVE_SPACE:
        conn.read(w.u64())
    if version >= DAEMON_VERSION:
        conn.write(w.w_str(info.nix_version))
    if version >= TRUST_FLAG:
        flag = TrustedFlag.TRUSTED if info.trusted else TrustedFlag.NOT_TRUSTED
        conn.write(w.w_u64(flag))
    return version, features


def serve(conn: ClientConnection, store, info: ServerInfo, *,
          eof_is_error: bool = False) -> int:
    """Serve one client until it closes; return the number of ops served.

    Args:
        eof_is_error: end of input before the handshake is an error (with
            ``--stdio`` nix-daemon says so and exits 1).
    """
    try:
        version, _features = handshake(conn, info)
    except ClientGone:
        if eof_is_error:
            raise ClientProtocolError("unexpected end-of-file") from None
        return 0
    logger = ClientLogger(conn, version)
    store.logger = logger
    logger.last()
    conn.flush()
    ctx = OpContext(version, store, StoreDir(info.store_dir),
                    info.real_store_dir, logger, conn)
    served = 0
    while True:
        try:
            code = conn.read(w.u32(), at_boundary=True)
        except ClientGone:
            return served
        except ClientProtocolError as exc:  # an op code above 2^32
            _fail(ctx, str(exc))
            return served
        served += 1
        if not _serve_op(ctx, code):
            return served


def _serve_op(ctx: OpContext, code: int) -> bool:
    """Read and run one op; False when the connection must close."""
    handler = OPS.get(code)
    if handler is None:
        name = Op(code).name if code in Op._value2member_map_ else None
        text = (f"operation '{name}' is not supported by nixwarden yet" if name
                else f"invalid operation {code}")
        _fail(ctx, text)
        return False
    try:
        run = ctx.conn.read(handler(ctx))
    except ClientProtocolError as exc:
        _fail(ctx, str(exc))
        return False
    try:
        response = run()
    except StoreRefusal as exc:
        ctx.logger.error(exc.message, exc.exit_status)
        ctx.conn.flush()
        return code not in CLOSE_AFTER_ERROR
    if response is not None:
        ctx.logger.last()
        ctx.conn.write(response)
    ctx.conn.flush()
    return True


def _fail(ctx: OpContext, message: str) -> None:
    """Report an error that leaves the stream out of sync, then give up."""
    log.warning("closing connection: %s", message)
    try:
        ctx.logger.error(message)
        ctx.conn.flush()
    except OSError:
        pass
