"""Ops that put data into the store (spec worker-protocol §5.6, §5.7, §5.33, §5.35, §5.40).

AddToStore (both formats), AddTextToStore, AddToStoreNar (inline,
STDERR_READ and framed transfer), AddMultipleToStore and AddSignatures.
The worker reads the client's data and forwards it unchanged to the
session as bounded chunks; it never keeps a NAR in memory and never
decides whether data is acceptable: the session parses, hashes and checks
everything again.  Process: worker.
"""

from __future__ import annotations

from nixwarden.shared import limits
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.rpc import schema
from nixwarden.shared.wire import primitives as w
from nixwarden.shared.wire.ops import Op, ProtocolVersion
from nixwarden.worker.ops import op, read_path, read_paths
from nixwarden.worker.ops.queries import w_path_info
from nixwarden.worker.sources import (FramedSource, InlineSource, PullSource,
                                      nar_chunks)

NEW_ADD_TO_STORE = ProtocolVersion(1, 25)
NAR_PULLED = ProtocolVersion(1, 21)
NAR_FRAMED = ProtocolVersion(1, 23)


def _check_refs(ctx, refs: list[str]) -> list[str]:
    return ctx.check_paths(refs)


@op(Op.ADD_TO_STORE)
def add_to_store(ctx):
    if ctx.version >= NEW_ADD_TO_STORE:
        return (yield from _add_to_store_new(ctx))
    return (yield from _add_to_store_old(ctx))


def _add_to_store_new(ctx):
    name = yield from w.string(limits.MAX_STORE_PATH)
    method = yield from w.string(64)
    refs = yield from read_paths()
    repair = yield from w.boolean()

    def run():
        source = FramedSource(ctx.conn)
        nar_input = method.startswith(("fixed:r:", "fixed:git:"))
        req = schema.AddToStore(name, method, refs, repair, nar_input)
        try:
            _check_refs(ctx, refs)
        except StoreRefusal:
            source.drain()
            raise
        info = ctx.store.add_to_store(req, source.chunks())
        return w.w_str(info.path) + w_path_info(info, ctx.version)
    return run


def _add_to_store_old(ctx):
    name = yield from w.string(limits.MAX_STORE_PATH)
    fixed = yield from w.boolean()
    recursive = yield from w.u8()
    algo = yield from w.string(64)

    def run():
        if recursive > 1:
            raise StoreRefusal(f"unsupported FileIngestionMethod with value of {recursive}; "
                               "you may need to upgrade nix-daemon")
        method = f"fixed:r:{algo}" if recursive else f"fixed:{algo}"
        if not fixed:
            method = "fixed:r:sha256"
        req = schema.AddToStore(name, method, [], False, True)
        info = ctx.store.add_to_store(req, nar_chunks(InlineSource(ctx.conn)))
        return w.w_str(info.path)
    return run


@op(Op.ADD_TEXT_TO_STORE)
def add_text_to_store(ctx):
    name = yield from w.string(limits.MAX_STORE_PATH)
    text = yield from w.raw_bytes()
    refs = yield from read_paths()

    def run():
        req = schema.AddToStore(name, "text:sha256", _check_refs(ctx, refs), False, False)
        return w.w_str(ctx.store.add_to_store(req, iter([text])).path)
    return run


def read_path_info_fields():
    """The fields of an AddToStoreNar request after the path (spec §5.35)."""
    deriver = yield from read_path()
    nar_hash = yield from w.string(256)
    refs = yield from read_paths()
    registration_time = yield from w.u64()
    nar_size = yield from w.u64()
    ultimate = yield from w.boolean()
    sigs = yield from w.strings(max_len=limits.MAX_STORE_PATH)
    ca = yield from w.string(limits.MAX_STORE_PATH)
    return deriver, nar_hash, refs, registration_time, nar_size, ultimate, sigs, ca


def _nar_request(ctx, path, fields, repair, dont_check_sigs) -> schema.AddToStoreNar:
    deriver, nar_hash, refs, reg_time, nar_size, ultimate, sigs, ca = fields
    ctx.check_path(path)
    if deriver:
        ctx.check_path(deriver)
    return schema.AddToStoreNar(path, deriver or None, nar_hash, _check_refs(ctx, refs),
                                reg_time, nar_size, ultimate, sigs, ca or None,
                                repair, dont_check_sigs)


@op(Op.ADD_TO_STORE_NAR)
def add_to_store_nar(ctx):
    path = yield from read_path()
    fields = yield from read_path_info_fields()
    repair = yield from w.boolean()
    dont_check_sigs = yield from w.boolean()

    def run():
        if ctx.version >= NAR_FRAMED:
            source = FramedSource(ctx.conn)
            chunks = source.chunks()
        else:
            source = PullSource(ctx.conn) if ctx.version >= NAR_PULLED else InlineSource(ctx.conn)
            chunks = nar_chunks(source)
        _forward_nar(ctx, path, fields, repair, dont_check_sigs, chunks)
        return b""
    return run


def _forward_nar(ctx, path, fields, repair, dont_check_sigs, chunks) -> None:
    """Send one NAR with its claims to the session; a request refused before
    sending still consumes its NAR, so the stream stays in sync."""
    try:
        req = _nar_request(ctx, path, fields, repair, dont_check_sigs)
    except StoreRefusal:
        for _ in chunks:
            pass
        raise
    ctx.store.add_to_store_nar(req, chunks)


@op(Op.ADD_MULTIPLE_TO_STORE)
def add_multiple_to_store(ctx):
    repair = yield from w.boolean()
    dont_check_sigs = yield from w.boolean()

    def items(source):
        count = source.run(w.count())
        for _ in range(count):
            path = source.run(read_path())
            fields = source.run(read_path_info_fields())
            fields = fields[:5] + (False,) + fields[6:]  # ultimate is cleared (spec §6)
            # A refused claim ends the batch; the rest of the stream,
            # this NAR included, is drained below.
            yield (_nar_request(ctx, path, fields, repair, dont_check_sigs),
                   nar_chunks(source))

    def run():
        source = FramedSource(ctx.conn)
        try:
            ctx.store.add_nars(items(source))
        finally:
            source.drain()
        return b""
    return run


@op(Op.ADD_SIGNATURES)
def add_signatures(ctx):
    path = yield from read_path()
    sigs = yield from w.strings(max_len=limits.MAX_STORE_PATH)

    def run():
        ctx.store.add_signatures(ctx.check_path(path), sigs)
        return w.w_u64(1)
    return run
