"""SetOptions (op 19): the client's per-connection settings (spec §5.16).

The worker only decodes; the session applies the fixed fields for every
client and filters the overrides by the connection's trust.
Process: worker.
"""

from __future__ import annotations

from nixwarden.shared import limits
from nixwarden.shared.rpc import schema
from nixwarden.shared.wire import primitives as w
from nixwarden.shared.wire.ops import Op, ProtocolVersion
from nixwarden.worker.ops import op

OVERRIDES = ProtocolVersion(1, 12)


@op(Op.SET_OPTIONS)
def set_options(ctx):
    keep_failed = yield from w.boolean()
    keep_going = yield from w.boolean()
    try_fallback = yield from w.boolean()
    verbosity = yield from w.u32()
    max_build_jobs = yield from w.u32()
    max_silent_time = yield from w.u32()
    yield from w.u64()  # useBuildHook, obsolete
    build_verbosity = yield from w.u32()
    yield from w.u64()  # logType, obsolete
    yield from w.u64()  # printBuildTrace, obsolete
    build_cores = yield from w.u32()
    use_substitutes = yield from w.boolean()
    overrides = []
    if ctx.version >= OVERRIDES:
        overrides = yield from w.string_pairs(limits.MAX_OVERRIDES)
    req = schema.SetOptions(
        keep_failed, keep_going, try_fallback, verbosity, max_build_jobs,
        max_silent_time, build_verbosity == 0, build_cores, use_substitutes,
        overrides)

    def run():
        ctx.logger.verbosity = verbosity
        for line in ctx.store.set_options(req):
            ctx.logger.warn(line)
        return b""
    return run
