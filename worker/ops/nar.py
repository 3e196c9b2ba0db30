"""NarFromPath (op 38): the NAR of a valid path, streamed raw (spec §5.34).

The session confirms that the path is valid; the worker then serialises
it itself from the read-only store, so NAR bytes never cross the RPC
channel.  Process: worker.
"""

from __future__ import annotations

import os

from nixwarden.shared import nar
from nixwarden.shared.wire.ops import Op
from nixwarden.worker.ops import op, read_path


@op(Op.NAR_FROM_PATH)
def nar_from_path(ctx):
    path = yield from read_path()

    def run():
        sp = ctx.store_dir.parse(ctx.check_path(path))
        ctx.store.check_nar_readable(path)
        real = os.path.join(ctx.real_store_dir, sp.base)
        chunks = nar.dump(real)
        first = next(chunks)  # fail before STDERR_LAST if the path is unreadable
        ctx.logger.last()
        ctx.conn.write_now(first)
        for chunk in chunks:
            ctx.conn.write_now(chunk)
        return None
    return run
