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
