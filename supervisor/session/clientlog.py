"""Log messages and activities a session sends its client during long work.

They travel in-band on the RPC channel before the final reply and the
worker relays them as STDERR_NEXT / START_ACTIVITY / RESULT /
STOP_ACTIVITY frames.  Activity ids are unique per connection: the
session's pid in the high half, a counter in the low half (as CppNix does
with its own pid).  Process: session.
"""

from __future__ import annotations

import os

from nixwarden.shared.rpc import schema


class ClientLog:
    def __init__(self, channel):
        self.channel = channel
        self._next = (os.getpid() << 32) + 1
        self.gone = False

    def _send(self, msg) -> None:
        if self.gone:
            return
        try:
            self.channel.send(msg)
        except OSError:
            self.gone = True  # the worker (and so the client) went away

    def log(self, level: int, text: str) -> None:
        self._send(schema.LogLine(level, text))

    def start(self, level: int, activity_type: int, text: str = "",
              fields: tuple = (), parent: int = 0) -> int:
        act = self._next
        self._next += 1
        self._send(schema.StartActivity(act, level, activity_type, text, list(fields), parent))
        return act

    def result(self, act: int, result_type: int, fields: tuple) -> None:
        self._send(schema.ActivityResult(act, result_type, list(fields)))

    def stop(self, act: int) -> None:
        self._send(schema.StopActivity(act))
