"""The state one session holds for its connection.

Identity and trust are fixed when the session is assigned and never
change; settings start as the daemon's and change only through SetOptions
(filtered by trust).  Process: session.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nixwarden.shared.errors import WorkerViolation
from nixwarden.shared.storepath import BadStorePath, StoreDir, StorePath
from nixwarden.supervisor.store.db import StoreDB
from nixwarden.supervisor.store.layout import StoreLayout
from nixwarden.supervisor.store.locks import TempRoots
from nixwarden.supervisor.session.rules import RULES
from nixwarden.supervisor.trust import Identity


@dataclass
class Session:
    identity: Identity
    settings: object  # supervisor.config.Settings
    layout: StoreLayout
    db: StoreDB
    temp_roots: TempRoots
    writer: object = None  # supervisor.store.adding.StoreWriter
    channel: object = None  # shared.rpc.channel.Channel, set by the loop
    client_log: object = None  # session.clientlog.ClientLog, set by the loop
    _substituters: object = None  # store.substitute.Substituters, made on first use
    store_dir: StoreDir = field(init=False)
    requests: int = 0
    broken: bool = False  # an internal error: the session ends after its reply
    exit_status: int = 0  # from the worker's advisory Goodbye (--stdio)
    rules: dict = field(default_factory=lambda: RULES)  # what this connection may ask
    restriction: object = None  # session.restricted.Restriction of a recursive Nix session
    new_zygote: object = None  # () -> spawner.ZygoteHandle, for recursive Nix

    def __post_init__(self) -> None:
        self.store_dir = StoreDir(self.layout.store_dir)

    def store_path(self, text: str) -> StorePath:
        """Parse a store path the worker sent; a bad one is a violation.

        The worker validates paths before it asks, so a path that fails
        here means the worker is not the code we shipped.
        """
        try:
            return self.store_dir.parse(text)
        except BadStorePath as exc:
            raise WorkerViolation(f"bad store path from worker: {exc}") from None

    def full(self, sp: StorePath) -> str:
        return self.store_dir.print(sp)

    def note_added(self, path: str) -> None:
        """A client added ``path`` (valid now): a recursive Nix session
        records it for its build; a plain connection has nothing to do."""
        if self.restriction is not None:
            self.restriction.note(path)

    def reset_substituters(self) -> None:
        """Forget the binary caches; the next use opens them from the current
        settings (most connections never substitute, so nothing is loaded
        before it is needed)."""
        if self._substituters is not None:
            self._substituters.close()
            self._substituters = None

    def can_substitute(self) -> bool:
        """Substitution is on and some binary cache is configured."""
        return bool(self.settings.get("substitute")) and bool(self.settings.get("substituters"))

    @property
    def substituters(self):
        if self._substituters is None:
            from nixwarden.supervisor.store.substitute import Substituters
            self._substituters = Substituters(
                self.settings, self.store_dir, self.layout.state_dir,
                log=lambda level, text: self.client_log.log(level, text)
                if self.client_log else None)
        return self._substituters

    def substitute(self, paths, *, repair: bool = False, cas=None) -> dict:
        """Fetch ``paths`` (and their closures) from the binary caches.

        ``cas``: known content addresses (path -> text), which let a cache
        of another store directory serve those paths.
        """
        kwargs = {"cas": cas} if cas else {}
        return self.substituters.substitute(paths, self.writer, self.client_log,
                                            repair=repair, **kwargs)

    def stream(self):
        """The bulk data following the current request: Chunk payloads until End.

        Raises:
            WorkerViolation: anything but Chunk or End, or a malformed frame.
            ChannelClosed: the worker went away mid-stream (client vanished).
        """
        from nixwarden.shared.rpc import codec, schema
        while True:
            msg = codec.decode_request(self.channel.recv_frame(bulk=True))
            if isinstance(msg, schema.End):
                return
            if not isinstance(msg, schema.Chunk):
                raise WorkerViolation(f"{type(msg).__name__} inside bulk data")
            yield msg.data
