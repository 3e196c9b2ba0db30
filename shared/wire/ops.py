"""Numbers of the Nix worker protocol: magics, versions, op codes, log tags.

All values are written out (STYLE.md 2.5); an op code not listed in
``Op`` is a protocol error.  Source: spec worker-protocol §1, §3.1, §4.2,
§4.4, §2.17.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from nixwarden.shared.logtypes import ActivityType, ResultType, Verbosity  # noqa: F401

WORKER_MAGIC_1 = 0x6E697863  # client hello, "cxin"
WORKER_MAGIC_2 = 0x6478696F  # server hello, "oixd"
EXPORT_MAGIC = 0x4558494E    # "NIXE", after each path of the export format


@dataclass(frozen=True, order=True)
class ProtocolVersion:
    """A worker-protocol version: ``major.minor``, ``(major << 8) | minor`` on the wire."""

    major: int
    minor: int

    @classmethod
    def from_wire(cls, value: int) -> "ProtocolVersion":
        return cls((value >> 8) & 0xFF, value & 0xFF)

    def to_wire(self) -> int:
        return (self.major << 8) | self.minor

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


#: What nixwarden announces: the newest released protocol (Nix 2.24-2.35).
#: 1.39 exists only as an unused macro in Nix 2.35 headers (spec §0).
SERVER_VERSION = ProtocolVersion(1, 38)

#: Oldest client accepted: Nix 2.3 speaks 1.21; the C++ daemon's floor was
#: 1.10.  Nothing older than 1.21 is tested, so nothing older is accepted.
MIN_CLIENT_VERSION = ProtocolVersion(1, 21)

#: Feature strings nixwarden offers in the 1.38 exchange (spec §3.2): none
#: yet, which is what Nix 2.24-2.34 daemons send.
SERVER_FEATURES: frozenset[str] = frozenset()


class Op(IntEnum):
    IS_VALID_PATH = 1
    HAS_SUBSTITUTES = 3
    QUERY_PATH_HASH = 4
    QUERY_REFERENCES = 5
    QUERY_REFERRERS = 6
    ADD_TO_STORE = 7
    ADD_TEXT_TO_STORE = 8
    BUILD_PATHS = 9
    ENSURE_PATH = 10
    ADD_TEMP_ROOT = 11
    ADD_INDIRECT_ROOT = 12
    SYNC_WITH_GC = 13
    FIND_ROOTS = 14
    EXPORT_PATH = 16
    QUERY_DERIVER = 18
    SET_OPTIONS = 19
    COLLECT_GARBAGE = 20
    QUERY_SUBSTITUTABLE_PATH_INFO = 21
    QUERY_DERIVATION_OUTPUTS = 22
    QUERY_ALL_VALID_PATHS = 23
    QUERY_FAILED_PATHS = 24
    CLEAR_FAILED_PATHS = 25
    QUERY_PATH_INFO = 26
    IMPORT_PATHS = 27
    QUERY_DERIVATION_OUTPUT_NAMES = 28
    QUERY_PATH_FROM_HASH_PART = 29
    QUERY_SUBSTITUTABLE_PATH_INFOS = 30
    QUERY_VALID_PATHS = 31
    QUERY_SUBSTITUTABLE_PATHS = 32
    QUERY_VALID_DERIVERS = 33
    OPTIMISE_STORE = 34
    VERIFY_STORE = 35
    BUILD_DERIVATION = 36
    ADD_SIGNATURES = 37
    NAR_FROM_PATH = 38
    ADD_TO_STORE_NAR = 39
    QUERY_MISSING = 40
    QUERY_DERIVATION_OUTPUT_MAP = 41
    REGISTER_DRV_OUTPUT = 42
    QUERY_REALISATION = 43
    ADD_MULTIPLE_TO_STORE = 44
    ADD_BUILD_LOG = 45
    BUILD_PATHS_WITH_RESULTS = 46
    ADD_PERM_ROOT = 47


class Stderr(IntEnum):
    """Tags of the log channel (spec §4.2)."""

    NEXT = 0x6F6C6D67
    READ = 0x64617461
    WRITE = 0x64617416
    LAST = 0x616C7473
    ERROR = 0x63787470
    START_ACTIVITY = 0x53545254
    STOP_ACTIVITY = 0x53544F50
    RESULT = 0x52534C54


class TrustedFlag(IntEnum):
    """The handshake's trust report (protocol >= 1.35)."""

    UNKNOWN = 0
    TRUSTED = 1
    NOT_TRUSTED = 2
