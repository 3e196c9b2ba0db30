"""A session's frame loop: read a request, check it, run it, answer.

Fails closed (STYLE.md 1.5): a malformed frame, an unknown type or a
request outside the rules is a ``WorkerViolation``: one log line (pid,
uid, type, reason), the session ends, its temporary roots go with it, and
the worker loses its channel and closes the client.  A ``StoreRefusal``
is a legitimate answer and the session continues.  Process: session.

Trust: every frame comes from an unprivileged worker and is decoded
strictly by ``shared.rpc.codec``; nothing is unpickled or evaluated.
"""

from __future__ import annotations

import logging
import os

from nixwarden.shared.errors import StoreRefusal, WorkerViolation
from nixwarden.shared.rpc import codec, schema
from nixwarden.shared.rpc.channel import Channel, ChannelClosed
from nixwarden.supervisor.session.clientlog import ClientLog

log = logging.getLogger("nixwarden.session")


def dispatch(session, request):
    """Run one request through the rules table and return the reply."""
    rule = session.rules.get(type(request))
    if rule is None:
        raise WorkerViolation(f"no rule for {type(request).__name__}")
    if rule.trusted_only and not session.identity.trusted:
        return schema.Failure(rule.refusal, 1)
    handler = rule.handler
    if rule.untrusted is not None and not session.identity.trusted:
        handler = rule.untrusted
    try:
        return handler(session, request)
    except StoreRefusal as exc:
        return schema.Failure(exc.message, exc.exit_status)
    except (WorkerViolation, ChannelClosed):
        raise
    except Exception as exc:
        # A bug on our side: tell the client what failed, then end this
        # session (its state may be inconsistent); the daemon carries on.
        log.exception("internal error serving %s", type(request).__name__)
        session.broken = True
        return schema.Failure(f"internal error in nixwarden: {exc}", 1)


def serve(session, channel: Channel) -> int:
    """Serve the worker until it closes its channel; return an exit code."""
    session.channel = channel
    session.client_log = ClientLog(channel)
    while True:
        request = None
        try:
            payload = channel.recv_frame()
        except ChannelClosed:
            return session.exit_status
        except (WorkerViolation, OSError) as exc:
            _violation(session, "frame", exc)
            return 2
        try:
            request = codec.decode_request(payload)
            reply = dispatch(session, request)
        except ChannelClosed:
            log.info("connection closed during an upload; nothing was added")
            return 0
        except WorkerViolation as exc:
            name = type(request).__name__ if request is not None else "frame"
            _violation(session, name, exc)
            return 2
        session.requests += 1
        if reply is None:  # advisory messages get no answer
            continue
        try:
            channel.send(reply)
        except OSError:
            return 0
        if session.broken:
            return 3


def _violation(session, what: str, exc: Exception) -> None:
    ident = session.identity
    log.error("worker violation: session pid=%d uid=%s request=%s: %s",
              os.getpid(), ident.uid, what, exc)
