"""The daemon's own log on stderr, in the chosen ``--log-format``.

Nix verbosity levels map onto Python logging levels; ``raw`` prints bare
lines (with a ``<N>`` syslog prefix when ``IN_SYSTEMD=1``), and
``internal-json`` prints Nix's ``@nix {...}`` records.  The ``bar`` formats
print plain lines too, as nix-daemon does when stderr is not a terminal.
Process: supervisor (workers and sessions inherit the configuration).
"""

from __future__ import annotations

import json
import logging
import sys

#: Nix verbosity (0 error .. 7 vomit) to Python logging level.
LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: 25, 3: logging.INFO,
          4: 15, 5: 12, 6: logging.DEBUG, 7: 5}
_SYSLOG = {logging.ERROR: 3, logging.WARNING: 4, 25: 5, logging.INFO: 6}


def python_level(verbosity: int) -> int:
    return LEVELS[max(0, min(7, verbosity))]


def nix_level(levelno: int) -> int:
    for nix, py in sorted(LEVELS.items()):
        if levelno >= py:
            return nix
    return 7


class RawFormatter(logging.Formatter):
    def __init__(self, systemd: bool):
        super().__init__()
        self.systemd = systemd

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR and not text.startswith("error"):
            text = f"error: {text}" if record.name != "nixwarden.containment" else text
        elif record.levelno == logging.WARNING and not text.startswith("warning"):
            text = f"warning: {text}"
        if self.systemd:
            return f"<{_SYSLOG.get(record.levelno, 7)}>{text}"
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {"action": "msg", "level": nix_level(record.levelno),
                "msg": record.getMessage()}
        return "@nix " + json.dumps(body)


def setup(verbosity: int, log_format: str, environ) -> str:
    """Configure the root logger; return the level name for child processes."""
    # Records need none of the caller's file, thread or process: skipping
    # their look-up (the logging HOWTO's "Optimization") keeps a connection's
    # "accepted connection" line cheap.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "internal-json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(RawFormatter(environ.get("IN_SYSTEMD") == "1"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = python_level(verbosity)
    root.setLevel(level)
    return logging.getLevelName(level) if isinstance(logging.getLevelName(level), str) \
        and not logging.getLevelName(level).startswith("Level") else str(level)
