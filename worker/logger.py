"""Log-channel frames to the client (spec worker-protocol §4).

Formats STDERR_NEXT lines, activities and the two error formats, filtered
by the verbosity the client asked for.  Process: worker.
"""

from __future__ import annotations

from nixwarden.shared.logtypes import warning_line
from nixwarden.shared.wire import primitives as w
from nixwarden.shared.wire.ops import ProtocolVersion, Stderr, Verbosity

STRUCTURED_ERRORS = ProtocolVersion(1, 26)
ACTIVITIES = ProtocolVersion(1, 20)
_LAST = w.w_u64(Stderr.LAST)


class ClientLogger:
    """Encodes log messages for one client connection."""

    def __init__(self, conn, version: ProtocolVersion):
        self.conn = conn
        self.version = version
        self.verbosity = int(Verbosity.INFO)
        self._next_activity = 1

    def log(self, level: int, text: str) -> None:
        """Send a log line if the client's verbosity admits ``level``."""
        if level <= self.verbosity:
            self.conn.write(w.w_u64(Stderr.NEXT) + w.w_str(text + "\n"))

    def warn(self, message: str) -> None:
        self.log(Verbosity.WARN, warning_line(message))

    def start_activity(self, level: int, activity_type: int, text: str,
                       fields: tuple = (), parent: int = 0) -> int:
        """Open an activity (protocol >= 1.20) and return its id."""
        act = self._next_activity
        self._next_activity += 1
        if self.version < ACTIVITIES:
            self.log(level, text + "...")
            return act
        body = w.w_u64(act) + w.w_u64(level) + w.w_u64(activity_type) + w.w_str(text)
        body += _fields(fields) + w.w_u64(parent)
        self.conn.write(w.w_u64(Stderr.START_ACTIVITY) + body)
        return act

    def start_activity_as(self, act: int, level: int, activity_type: int, text: str,
                          fields: tuple = (), parent: int = 0) -> None:
        """Open an activity whose id the session chose."""
        if self.version < ACTIVITIES:
            self.log(level, text + "...")
            return
        body = w.w_u64(act) + w.w_u64(level) + w.w_u64(activity_type) + w.w_str(text)
        self.conn.write(w.w_u64(Stderr.START_ACTIVITY) + body + _fields(fields)
                        + w.w_u64(parent))

    def result(self, act: int, result_type: int, fields: tuple = ()) -> None:
        if self.version >= ACTIVITIES:
            self.conn.write(w.w_u64(Stderr.RESULT) + w.w_u64(act) + w.w_u64(result_type)
                            + _fields(fields))

    def stop_activity(self, act: int) -> None:
        if self.version >= ACTIVITIES:
            self.conn.write(w.w_u64(Stderr.STOP_ACTIVITY) + w.w_u64(act))

    def last(self) -> None:
        """End the work phase successfully; the response follows."""
        self.conn.write(_LAST)

    def error(self, message: str, exit_status: int = 1) -> None:
        """End the work phase with an error in the client's format."""
        if self.version >= STRUCTURED_ERRORS:
            body = (w.w_str("Error") + w.w_u64(0) + w.w_str("Error")
                    + w.w_str(message) + w.w_u64(0) + w.w_u64(0))
        else:
            body = w.w_str(message) + w.w_u64(exit_status or 1)
        self.conn.write(w.w_u64(Stderr.ERROR) + body)


def _fields(fields: tuple) -> bytes:
    out = [w.w_u64(len(fields))]
    for value in fields:
        if isinstance(value, int):
            out.append(w.w_u64(0) + w.w_u64(value))
        else:
            out.append(w.w_u64(1) + w.w_str(value))
    return b"".join(out)
