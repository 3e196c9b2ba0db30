"""The worker's op table: one handler per worker-protocol op.

A handler is a generator function taking the ``OpContext``: it reads the
op's complete request with the sans-IO readers (``yield from``) and
returns a ``run`` callable that performs the op through ``StoreAPI`` and
returns the response bytes that follow STDERR_LAST (or ``None`` when it
has written its response itself, as NarFromPath does).  Reading always
finishes before any work, so a refused request leaves the stream in sync
(spec worker-protocol §5.0).  Process: worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator

from nixwarden.shared import limits
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.storepath import BadStorePath, StoreDir
from nixwarden.shared.wire import primitives as w
from nixwarden.shared.wire.ops import Op, ProtocolVersion

Run = Callable[[], "bytes | None"]
Handler = Callable[["OpContext"], Generator[int, bytes, Run]]

OPS: dict[int, Handler] = {}  # keyed by the op's number, as it arrives


def op(code: Op):
    """Register ``fn`` as the handler of ``code``."""
    def register(fn: Handler) -> Handler:
        OPS[int(code)] = fn
        return fn
    return register


@dataclass
class OpContext:
    """What a handler may use: the connection's version and its store."""

    version: ProtocolVersion
    store: object  # StoreAPI
    store_dir: StoreDir
    real_store_dir: str
    logger: object  # ClientLogger
    conn: object  # ClientConnection

    def check_path(self, text: str) -> str:
        """Check that ``text`` is a store path; return it unchanged.

        Raises:
            StoreRefusal: with Nix's message for a path outside the store.
        """
        try:
            self.store_dir.parse(text)
        except BadStorePath as exc:
            raise StoreRefusal(str(exc)) from None
        return text

    def check_paths(self, texts) -> list[str]:
        return [self.check_path(t) for t in texts]


def read_path() -> Generator[int, bytes, str]:
    """Read a store path string (checked later, once the request is whole)."""
    return (yield from w.string(limits.MAX_STORE_PATH))


def read_paths() -> Generator[int, bytes, list[str]]:
    return (yield from w.strings(max_len=limits.MAX_STORE_PATH))


def w_opt_path(path: str | None) -> bytes:
    return w.w_str(path or "")


def register_all() -> None:
    """Import every op module so its handlers register themselves."""
    from nixwarden.worker.ops import (  # noqa: F401
        add, build, export, maintenance, nar, options, queries, roots)
