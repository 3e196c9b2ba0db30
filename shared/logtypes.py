"""Log levels, activity types and result types of Nix's logger.

Both sides need them: the worker encodes them on the wire, the session
emits activities while it builds (spec worker-protocol §2.17, §4.4).
Imports nothing but the standard library.
"""

from __future__ import annotations

from enum import IntEnum


class ActivityType(IntEnum):
    UNKNOWN = 0
    COPY_PATH = 100
    FILE_TRANSFER = 101
    REALISE = 102
    COPY_PATHS = 103
    BUILDS = 104
    BUILD = 105
    OPTIMISE_STORE = 106
    VERIFY_PATHS = 107
    SUBSTITUTE = 108
    QUERY_PATH_INFO = 109
    POST_BUILD_HOOK = 110
    BUILD_WAITING = 111


class ResultType(IntEnum):
    FILE_LINKED = 100
    BUILD_LOG_LINE = 101
    UNTRUSTED_PATH = 102
    CORRUPTED_PATH = 103
    SET_PHASE = 104
    PROGRESS = 105
    SET_EXPECTED = 106
    POST_BUILD_LOG_LINE = 107


class Verbosity(IntEnum):
    """Log levels as Nix >= 2.4 numbers them (spec §2.17)."""

    ERROR = 0
    WARN = 1
    NOTICE = 2
    INFO = 3
    TALKATIVE = 4
    CHATTY = 5
    DEBUG = 6
    VOMIT = 7


#: Nix's ``ANSI_WARNING`` (also what ``hintfmt`` highlights with) and
#: ``ANSI_NORMAL``.
ANSI_WARNING = "\x1b[35;1m"
ANSI_NORMAL = "\x1b[0m"

#: The prefixes of Nix's ``showErrorInfo`` (colours included: the client
#: strips them when its stderr is not a terminal).
ANSI_ERROR_PREFIX = f"\x1b[31;1merror:{ANSI_NORMAL} "
ANSI_WARNING_PREFIX = f"{ANSI_WARNING}warning:{ANSI_NORMAL} "


def error_line(message: str) -> str:
    """An error as Nix's ``logError`` shows it (a log line at level ERROR)."""
    return ANSI_ERROR_PREFIX + message


def warning_line(message: str) -> str:
    """A warning as Nix's ``warn`` shows it (a log line at level WARN)."""
    return ANSI_WARNING_PREFIX + message
