"""The closed vocabulary between a worker and its session (STYLE.md 1.2).

One frozen msgspec Struct per request and per reply, each with a numeric
type id written out in this file; requests are even, replies odd (as in
OpenSSH's monitor.h).  Requests are store verbs with typed arguments,
never SQL, file-system paths outside the store, settings blobs or "call
function X".  Identity and trust never travel in a message: the session
holds them.  Adding a type here is a security change and is reviewed as
one.

Store paths travel as their full printed form; the session parses and
checks every one against its store directory before use.
"""

from __future__ import annotations

from typing import Union

import msgspec


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True,
           tag_field="t", array_like=True):
    pass


# --- requests (worker -> session) ----------------------------------------------

class SetOptions(_Msg, tag=2):
    keep_failed: bool
    keep_going: bool
    try_fallback: bool
    verbosity: int
    max_build_jobs: int
    max_silent_time: int
    verbose_build: bool
    build_cores: int
    use_substitutes: bool
    overrides: list[tuple[str, str]]


class IsValidPath(_Msg, tag=4):
    path: str


class QueryValidPaths(_Msg, tag=6):
    paths: list[str]
    substitute: bool


class QueryPathInfo(_Msg, tag=8):
    path: str


class QueryReferrers(_Msg, tag=10):
    path: str


class QueryPathFromHashPart(_Msg, tag=12):
    hash_part: str


class QueryAllValidPaths(_Msg, tag=14):
    pass


class QueryDeriver(_Msg, tag=16):
    path: str


class QueryValidDerivers(_Msg, tag=18):
    path: str


class QueryDerivationOutputMap(_Msg, tag=20):
    drv_path: str


class QuerySubstitutablePaths(_Msg, tag=22):
    paths: list[str]


class QuerySubstitutablePathInfos(_Msg, tag=24):
    paths: list[tuple[str, str]]  # (store path, content address or "")


class QueryMissing(_Msg, tag=26):
    targets: list[str]  # derived paths in the >= 1.30 syntax: path, drv!*, drv!a,b


class AddTempRoot(_Msg, tag=28):
    path: str


class QueryRealisation(_Msg, tag=30):
    drv_hash: str  # "sha256:<hex>", the hash modulo of the derivation
    output: str


class RegisterDrvOutput(_Msg, tag=70):
    """A realisation a client claims: checked (the path must be valid) by the session."""
    drv_hash: str
    output: str
    out_path: str
    signatures: list[str]
    # (drv hash, output, path) of the input realisations it depends on
    dependents: list[tuple[str, str, str]] = []


class CheckNarReadable(_Msg, tag=32):
    """Before NarFromPath: is this a valid path the worker may dump?"""
    path: str


class AddToStoreNar(_Msg, tag=34):
    """A NAR with claimed metadata; the NAR follows as Chunk frames and End.

    Every claim (hash, size, content address, signatures) is checked by
    the session while it restores; ``ultimate`` and ``dont_check_sigs``
    count only for trusted sessions.
    """
    path: str
    deriver: str | None
    nar_hash: str  # as the client sent it: any of Nix's hash encodings
    references: list[str]
    registration_time: int
    nar_size: int
    ultimate: bool
    sigs: list[str]
    ca: str | None
    repair: bool
    dont_check_sigs: bool


class AddToStore(_Msg, tag=36):
    """Content to add under a content address; Chunk frames and End follow.

    ``method`` is a content-address method with algorithm ("text:sha256",
    "fixed:sha256", "fixed:r:sha256", ...); ``nar_input`` says whether the
    chunks are a NAR (else the raw contents of one regular file).
    """
    name: str
    method: str
    references: list[str]
    repair: bool
    nar_input: bool


class Chunk(_Msg, tag=38):
    """A piece of the bulk data of the current AddToStore/AddToStoreNar.
    Decoded as a read-only view of the frame, not a copy."""
    data: memoryview


class End(_Msg, tag=40):
    """The end of the current bulk data."""


class AddSignatures(_Msg, tag=42):
    path: str
    sigs: list[str]


class ImportPath(_Msg, tag=44):
    """One path of the legacy export format: its NAR follows as Chunk frames
    and End, then ``ImportPathMeta`` (the format puts the metadata last)."""


class ImportPathMeta(_Msg, tag=46):
    path: str
    references: list[str]
    deriver: str | None


class ImportAbandoned(_Msg, tag=74):
    """In place of ``ImportPathMeta``: the client's record was refused after
    its NAR (a wrong export magic); the session discards the received NAR
    and answers ``Failure``.  Anywhere else it is a violation."""


class AddNarBatch(_Msg, tag=76):
    """AddMultipleToStore: ``AddToStoreNar`` requests follow, each with its
    NAR (Chunk frames and End), sent without waiting for answers, then
    ``EndNarBatch``.  The session runs each as a single AddToStoreNar; after
    the first failure it reads and drops the rest.  It sends nothing until
    ``EndNarBatch`` (the worker is not reading meanwhile), then one answer:
    ``Ok``, or the first ``Failure``."""


class EndNarBatch(_Msg, tag=78):
    """The end of an ``AddNarBatch``; anywhere else a violation."""


class BuildPaths(_Msg, tag=48):
    """Build or ensure derived paths (">= 1.30" syntax); mode 0 normal, 1 repair, 2 check."""
    targets: list[str]
    mode: int
    with_results: bool


class EnsurePath(_Msg, tag=50):
    path: str


class BasicOutput(msgspec.Struct, frozen=True, forbid_unknown_fields=True,
                  array_like=True):
    """One output of a BuildDerivation request (not a message of its own)."""
    name: str
    path: str
    hash_algo: str
    hash: str


class BuildDerivation(_Msg, tag=54):
    """A derivation sent whole by the client (remote building); the session
    recomputes and checks everything it claims."""
    drv_path: str
    outputs: list[BasicOutput]
    input_srcs: list[str]
    platform: str
    builder: str
    args: list[str]
    env: list[tuple[str, str]]
    mode: int


class AddIndirectRoot(_Msg, tag=56):
    """Record ``link`` (an absolute file-system path, not a store path) as an
    indirect GC root."""
    link: str


class FindRoots(_Msg, tag=58):
    pass


class CollectGarbage(_Msg, tag=60):
    action: int  # 0 return live, 1 return dead, 2 delete dead, 3 delete specific
    paths: list[str]
    ignore_liveness: bool
    max_freed: int


class AddPermRoot(_Msg, tag=62):
    path: str
    link: str


class OptimiseStore(_Msg, tag=64):
    pass


class VerifyStore(_Msg, tag=66):
    check_contents: bool
    repair: bool


class AddBuildLog(_Msg, tag=68):
    """A build log for ``drv_path``; the log follows as Chunk frames and End."""
    drv_path: str


class Goodbye(_Msg, tag=72):
    """Advisory, last message of a worker: how its client's session ended
    (0 clean, 1 protocol error).  Only decides a ``--stdio`` daemon's exit
    status; it triggers nothing privileged."""
    status: int


Request = Union[
    SetOptions, IsValidPath, QueryValidPaths, QueryPathInfo, QueryReferrers,
    QueryPathFromHashPart, QueryAllValidPaths, QueryDeriver, QueryValidDerivers,
    QueryDerivationOutputMap, QuerySubstitutablePaths,
    QuerySubstitutablePathInfos, QueryMissing, AddTempRoot, QueryRealisation,
    CheckNarReadable, AddToStoreNar, AddToStore, Chunk, End, AddSignatures,
    ImportPath, ImportPathMeta, BuildPaths, EnsurePath, BuildDerivation,
    AddIndirectRoot, FindRoots, CollectGarbage, AddPermRoot, OptimiseStore,
    VerifyStore, AddBuildLog, RegisterDrvOutput, Goodbye, ImportAbandoned,
    AddNarBatch, EndNarBatch,
]


# --- replies and in-band messages (session -> worker) --------------------------

class Ok(_Msg, tag=1):
    pass


class Bool(_Msg, tag=3):
    value: bool


class Paths(_Msg, tag=5):
    paths: list[str]


class OptPath(_Msg, tag=7):
    path: str | None


class PathInfo(_Msg, tag=9):
    path: str
    deriver: str | None
    nar_hash_hex: str  # sha256 of the NAR, 64 lowercase hex characters
    references: list[str]
    registration_time: int
    nar_size: int
    ultimate: bool
    sigs: list[str]
    ca: str | None


class MaybePathInfo(_Msg, tag=11):
    info: PathInfo | None


class OutputMap(_Msg, tag=13):
    outputs: list[tuple[str, str | None]]  # (output name, path or None)


class SubstitutableInfos(_Msg, tag=15):
    infos: list[tuple[str, str | None, list[str], int, int]]
    # (path, deriver, references, download size, nar size)


class Missing(_Msg, tag=17):
    will_build: list[str]
    will_substitute: list[str]
    unknown: list[str]
    download_size: int
    nar_size: int


class Warnings(_Msg, tag=19):
    lines: list[str]


class Strings(_Msg, tag=21):
    items: list[str]


class Failure(_Msg, tag=23):
    """The request was refused or failed: the worker sends STDERR_ERROR."""
    message: str
    exit_status: int


class LogLine(_Msg, tag=25):
    """In-band log line for the client, sent before the final reply."""
    level: int
    text: str


class BuildResult(_Msg, tag=27):
    status: int
    error_msg: str
    times_built: int
    is_non_deterministic: bool
    start_time: int
    stop_time: int
    built_outputs: list[tuple[str, str, str]]  # (output name, path, "sha256:<hex>" drv hash)


class BuildResults(_Msg, tag=29):
    results: list[BuildResult]


class StartActivity(_Msg, tag=31):
    """In-band: an activity begins (spec worker-protocol §4.2, §4.4)."""
    id: int
    level: int
    type: int
    text: str
    fields: list[int | str]
    parent: int


class StopActivity(_Msg, tag=33):
    id: int


class ActivityResult(_Msg, tag=35):
    id: int
    type: int
    fields: list[int | str]


class Roots(_Msg, tag=37):
    roots: list[tuple[str, str]]  # (link, store path)


class GcResult(_Msg, tag=39):
    paths: list[str]
    bytes_freed: int


class Realisation(_Msg, tag=41):
    """A known realisation: its output path, signatures and the
    realisations it depends on, as (``<drv hash>!<output>``, path)."""
    out_path: str
    signatures: list[str]
    dependents: list[tuple[str, str]]


class NoRealisation(_Msg, tag=43):
    """The realisation asked for is not known."""


Reply = Union[
    Ok, Bool, Paths, OptPath, PathInfo, MaybePathInfo, OutputMap, SubstitutableInfos,
    Missing, Warnings, Strings, Failure, LogLine, BuildResult, BuildResults,
    StartActivity, StopActivity, ActivityResult, Roots, GcResult, Realisation, NoRealisation,
]

#: Every type id, for review: requests even, replies odd.
TYPE_IDS: dict[type, int] = {
    cls: cls.__struct_config__.tag
    for cls in (*Request.__args__, *Reply.__args__)
}
