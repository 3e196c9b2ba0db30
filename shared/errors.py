"""The few error kinds nixwarden distinguishes (STYLE.md 2.8).

Imports nothing.  Each kind has exactly one handling:

* ``ClientProtocolError``: the Nix client broke the worker protocol.  The
  worker reports it to the client if the stream is still in sync, else it
  closes the connection.
* ``WorkerViolation``: a worker sent the supervisor side something outside
  the RPC schema or outside what its session permits.  The session logs one
  line, rolls back, and ends the connection.
* ``StoreRefusal``: a legitimate "no" from the store (invalid path, missing
  trust, failed build).  It travels back to the client as a Nix error.

Anything else is a bug and ends the process that raised it.
"""


class ClientProtocolError(Exception):
    """The client sent bytes that do not follow the worker protocol.

    ``in_sync`` says whether the request was fully consumed, so that an
    error can be reported and the session continue (True), or the stream
    position is unknown and the connection must close (False).
    """

    def __init__(self, message: str, *, in_sync: bool = False):
        super().__init__(message)
        self.in_sync = in_sync


class WorkerViolation(Exception):
    """A worker broke the RPC contract: end its connection, change nothing."""


class StoreRefusal(Exception):
    """A store operation was refused or failed; reported to the client.

    ``exit_status`` is what Nix 2.3 clients (old error format) receive and
    what build failures use to carry Nix's 100-104 codes.
    """

    def __init__(self, message: str, exit_status: int = 1):
        super().__init__(message)
        self.message = message
        self.exit_status = exit_status
