"""Store maintenance ops: OptimiseStore (34), VerifyStore (35), AddBuildLog (45).

Spec worker-protocol §5.30, §5.31, §5.41.  The worker decodes; the
session decides who may do what (repair and build logs need trust).
Process: worker.
"""

from __future__ import annotations

from nixwarden.shared import limits
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.storepath import BadStorePath, StorePath
from nixwarden.shared.wire import primitives as w
from nixwarden.shared.wire.ops import Op
from nixwarden.worker.ops import op
from nixwarden.worker.sources import FramedSource


@op(Op.OPTIMISE_STORE)
def optimise_store(ctx):
    yield from ()

    def run():
        ctx.store.optimise_store()
        return w.w_u64(1)
    return run


@op(Op.VERIFY_STORE)
def verify_store(ctx):
    check_contents = yield from w.boolean()
    repair = yield from w.boolean()
    return lambda: w.w_bool(ctx.store.verify_store(check_contents, repair))


@op(Op.ADD_BUILD_LOG)
def add_build_log(ctx):
    base = yield from w.string(limits.MAX_STORE_PATH)

    def run():
        source = FramedSource(ctx.conn)
        try:
            StorePath.from_base(base)
        except (BadStorePath, ValueError) as exc:
            source.drain()
            raise StoreRefusal(str(exc)) from None
        ctx.store.add_build_log(f"{ctx.store_dir}/{base}", source.chunks())
        return w.w_u64(1)
    return run
