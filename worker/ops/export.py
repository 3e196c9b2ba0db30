"""The legacy export format ops: ExportPath (16) and ImportPaths (27).

Spec worker-protocol §2.16, §5.14, §5.23.  ExportPath streams one export
record to the client in STDERR_WRITE chunks (the worker dumps the NAR from
the read-only store itself); ImportPaths pulls a stream of records with
STDERR_READ and forwards each NAR and its trailing metadata to the
session.  Process: worker.
"""

from __future__ import annotations

import os

from nixwarden.shared import limits, nar
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.hashes import Hash, HashAlgo, HashSink
from nixwarden.shared.rpc import schema
from nixwarden.shared.wire import primitives as w
from nixwarden.shared.wire.ops import EXPORT_MAGIC, Op, Stderr
from nixwarden.worker.ops import op, read_path, read_paths, w_opt_path
from nixwarden.worker.sources import PullSource, nar_chunks


def _write_chunk(ctx, data: bytes) -> None:
    ctx.conn.write(w.w_u64(Stderr.WRITE) + w.w_bytes(data))
    ctx.conn.flush()


@op(Op.EXPORT_PATH)
def export_path(ctx):
    path = yield from read_path()
    yield from w.u64()  # "sign", obsolete

    def run():
        sp = ctx.store_dir.parse(ctx.check_path(path))
        info = ctx.store.query_path_info(path)
        if info is None:
            raise StoreRefusal(f"path '{path}' is not valid")
        ctx.store.check_nar_readable(path)
        sink = HashSink(HashAlgo.SHA256)
        for chunk in nar.dump(os.path.join(ctx.real_store_dir, sp.base)):
            sink.update(chunk)
            _write_chunk(ctx, chunk)
        got = sink.finish()
        if got != Hash(HashAlgo.SHA256, bytes.fromhex(info.nar_hash_hex)):
            raise StoreRefusal(f"hash of path '{path}' has changed from "
                               f"'sha256:{info.nar_hash_hex}' to '{got.to_prefixed('base16')}'!")
        _write_chunk(ctx, w.w_u64(EXPORT_MAGIC) + w.w_str(path)
                     + w.w_string_set(info.references) + w_opt_path(info.deriver)
                     + w.w_u64(0))
        return w.w_u64(1)
    return run


def _read_trailer():
    magic = yield from w.u64()
    if magic != EXPORT_MAGIC:
        # Everything was pulled (STDERR_READ), so the stream is still in
        # sync: the op fails and the connection goes on, as with nix-daemon.
        raise StoreRefusal("Nix archive cannot be imported; wrong format")
    path = yield from read_path()
    refs = yield from read_paths()
    deriver = yield from read_path()
    if (yield from w.u64()):
        yield from w.string(limits.MAX_STORE_PATH)  # legacy signature, ignored
    return path, refs, deriver


@op(Op.IMPORT_PATHS)
def import_paths(ctx):
    yield from ()

    def run():
        source = PullSource(ctx.conn)
        imported = []
        while source.run(w.u64()) == 1:
            path = ctx.store.import_path(nar_chunks(source), lambda: _meta(ctx, source))
            imported.append(path)
        return w.w_strings(imported)
    return run


def _meta(ctx, source) -> schema.ImportPathMeta:
    path, refs, deriver = source.run(_read_trailer())
    ctx.check_path(path)
    ctx.check_paths(refs)
    if deriver:
        ctx.check_path(deriver)
    return schema.ImportPathMeta(path, refs, deriver or None)
