"""GC-root ops that clients send during ordinary queries and builds.

AddTempRoot (11) and the obsolete SyncWithGC (13).  Process: worker.
"""

from __future__ import annotations

import os

from nixwarden.shared import limits
from nixwarden.shared.wire import primitives as w
from nixwarden.shared.wire.ops import Op
from nixwarden.worker.ops import op, read_path


@op(Op.ADD_TEMP_ROOT)
def add_temp_root(ctx):
    path = yield from read_path()

    def run():
        ctx.store.add_temp_root(ctx.check_path(path))
        return w.w_u64(1)
    return run


@op(Op.ADD_INDIRECT_ROOT)
def add_indirect_root(ctx):
    link = yield from w.string(limits.MAX_STORE_PATH)

    def run():
        ctx.store.add_indirect_root(os.path.normpath(os.path.join("/", link)))
        return w.w_u64(1)
    return run


@op(Op.SYNC_WITH_GC)
def sync_with_gc(ctx):
    yield from ()

    def run():
        return w.w_u64(1)
    return run


@op(Op.FIND_ROOTS)
def find_roots(ctx):
    yield from ()

    def run():
        roots = ctx.store.find_roots()
        return w.w_u64(len(roots)) + b"".join(w.w_str(link) + w.w_str(path)
                                              for link, path in roots)
    return run


@op(Op.COLLECT_GARBAGE)
def collect_garbage(ctx):
    action = yield from w.u32()
    paths = yield from w.strings(max_len=limits.MAX_STORE_PATH)
    ignore_liveness = yield from w.boolean()
    max_freed = yield from w.u64()
    for _ in range(3):
        yield from w.u64()  # obsolete fields

    def run():
        result = ctx.store.collect_garbage(action, ctx.check_paths(paths), ignore_liveness,
                                           max_freed)
        return w.w_string_set(result.paths) + w.w_u64(result.bytes_freed) + w.w_u64(0)
    return run


@op(Op.ADD_PERM_ROOT)
def add_perm_root(ctx):
    path = yield from w.string(limits.MAX_STORE_PATH)
    link = yield from w.string(limits.MAX_STORE_PATH)

    def run():
        ctx.check_path(path)
        return w.w_str(ctx.store.add_perm_root(path, os.path.normpath(os.path.join("/", link))))
    return run
