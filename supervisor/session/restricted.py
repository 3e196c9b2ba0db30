"""What a recursive Nix connection may ask: the store as one build sees it.

A builder of a derivation that requires ``recursive-nix`` talks to the
daemon through a socket in its build directory (``build/recursive.py``).
Its session is untrusted and sees only the build's input closure and the
paths added during the build (by this connection or by earlier ones of the
same build), as Nix 2.8's ``RestrictedStore``: other paths are unknown,
path infos are censored, and roots, GC, signatures and logs are out of
reach.  Every path a client adds or builds is reported to the build
(``Restriction.note``), which lets the builder's outputs refer to it.
Process: a recursive session (``session/recursive_process.py``).

Trust: the client is the builder, i.e. code from a derivation; every
request is checked against the allowed set before the normal handler runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import msgspec

from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.rpc import schema
from nixwarden.supervisor.session import handlers as h
from nixwarden.supervisor.session.rules import RULES, Rule

#: Nix's ``getUri()`` of the store behind a RestrictedStore.
STORE_URI = "local"


@dataclass
class Restriction:
    """The paths one build's recursive connections may see."""

    allowed: set[str]
    report_fd: int  # the build learns of added paths here, one per line

    def note(self, path: str) -> None:
        if path not in self.allowed:
            self.allowed.add(path)
            os.write(self.report_fd, path.encode() + b"\n")


def _unsupported(op: str):
    def handler(session, req):
        raise StoreRefusal(f"operation '{op}' is not supported by store '{STORE_URI}'")
    return handler


def _error(text: str):
    def handler(session, req):
        raise StoreRefusal(text)
    return handler


def _allowed(session, text: str) -> str | None:
    path = h.checked_path(session, text)
    return path if path in session.restriction.allowed else None


def _on_is_valid_path(session, req: schema.IsValidPath):
    path = _allowed(session, req.path)
    return schema.Bool(path is not None and session.db.is_valid(path))


def _on_query_valid_paths(session, req: schema.QueryValidPaths):
    wanted = [p for p in h.checked_paths(session, req.paths) if p in session.restriction.allowed]
    return schema.Paths(sorted(session.db.valid_subset(wanted)))


def _on_query_path_info(session, req: schema.QueryPathInfo):
    path = _allowed(session, req.path)
    info = session.db.query_path_info(path) if path else None
    if info is None:
        return schema.MaybePathInfo(None)
    censored = replace(info, deriver=None, registration_time=0, ultimate=False, sigs=())
    return schema.MaybePathInfo(h.path_info_msg(censored))


def _on_query_deriver(session, req: schema.QueryDeriver):
    path = _allowed(session, req.path)
    if path is None or not session.db.is_valid(path):
        raise StoreRefusal(f"path '{h.checked_path(session, req.path)}' is not valid")
    return schema.OptPath(None)  # censored, as path infos are


def _on_query_all_valid_paths(session, req):
    return schema.Paths(sorted(session.restriction.allowed))


def _on_query_derivation_output_map(session, req: schema.QueryDerivationOutputMap):
    if _allowed(session, req.path) is None:
        raise StoreRefusal(f"cannot query output map for unknown path "
                           f"'{h.checked_path(session, req.path)}' in recursive Nix")
    return h.on_query_derivation_output_map(session, req)


def _on_query_missing(session, req: schema.QueryMissing):
    allowed, unknown = [], []
    for target in req.targets:
        path = target.partition("!")[0]
        (allowed if _allowed(session, path) else unknown).append(target)
    missing = h.on_query_missing(session, schema.QueryMissing(allowed))
    unknown_paths = {h.checked_path(session, t.partition("!")[0]) for t in unknown}
    return msgspec.structs.replace(missing, unknown=sorted(set(missing.unknown) | unknown_paths))


def _on_query_realisation(session, req: schema.QueryRealisation):
    found = h.on_query_realisation(session, req)
    if isinstance(found, schema.Realisation) and \
            found.out_path not in session.restriction.allowed:
        return schema.NoRealisation()
    return found


def _on_check_nar_readable(session, req: schema.CheckNarReadable):
    if _allowed(session, req.path) is None:
        raise StoreRefusal(f"cannot dump unknown path '{h.checked_path(session, req.path)}' "
                           "in recursive Nix")
    return h.on_check_nar_readable(session, req)


def _on_ensure_path(session, req: schema.EnsurePath):
    if _allowed(session, req.path) is None:
        raise StoreRefusal(f"cannot substitute unknown path '{h.checked_path(session, req.path)}' "
                           "in recursive Nix")
    return schema.Ok()  # an allowed path is valid already


def _on_build_paths(session, req: schema.BuildPaths):
    if req.mode != 0:
        raise StoreRefusal("unsupported build mode")
    for target in h.check_targets(session, req.targets):
        if _allowed(session, target.partition("!")[0]) is None:
            raise StoreRefusal(f"cannot build '{target}' in recursive Nix because path "
                               "is unknown")
    results = h.realise(session, req.targets, req.mode)
    built = {p for _, outcome in results for p in outcome.outputs.values() if p}
    for path in sorted(session.db.closure(built)):
        session.restriction.note(path)
    return h.build_paths_reply(session, req, results)


def _ok(session, req):
    return schema.Ok()


#: RULES with the RestrictedStore's behaviour.  Requests not named here
#: (SetOptions, the additions, Goodbye, the stream frames and the
#: trusted-only ones, which stay refused) run as for any untrusted client.
RESTRICTED_RULES: dict[type, Rule] = dict(RULES) | {
    schema.IsValidPath: Rule(_on_is_valid_path),
    schema.QueryValidPaths: Rule(_on_query_valid_paths),
    schema.QueryPathInfo: Rule(_on_query_path_info),
    schema.QueryReferrers: Rule(lambda session, req: schema.Paths([])),
    schema.QueryPathFromHashPart: Rule(_error("queryPathFromHashPart")),
    schema.QueryAllValidPaths: Rule(_on_query_all_valid_paths),
    schema.QueryDeriver: Rule(_on_query_deriver),
    schema.QueryValidDerivers: Rule(_unsupported("queryValidDerivers")),
    schema.QueryDerivationOutputMap: Rule(_on_query_derivation_output_map),
    schema.QuerySubstitutablePaths: Rule(lambda session, req: schema.Paths([])),
    schema.QuerySubstitutablePathInfos: Rule(
        lambda session, req: schema.SubstitutableInfos([])),
    schema.QueryMissing: Rule(_on_query_missing),
    schema.AddTempRoot: Rule(_ok),
    schema.QueryRealisation: Rule(_on_query_realisation),
    schema.RegisterDrvOutput: Rule(_error("registerDrvOutput")),
    schema.CheckNarReadable: Rule(_on_check_nar_readable),
    schema.BuildPaths: Rule(_on_build_paths),
    schema.EnsurePath: Rule(_on_ensure_path),
    schema.BuildDerivation: Rule(_unsupported("buildDerivation")),
    schema.AddIndirectRoot: Rule(_ok),
    schema.FindRoots: Rule(lambda session, req: schema.Roots([])),
    schema.CollectGarbage: Rule(lambda session, req: schema.GcResult([], 0)),
    schema.OptimiseStore: Rule(_ok),
    schema.VerifyStore: Rule(lambda session, req: schema.Bool(False)),
    schema.AddSignatures: Rule(_unsupported("addSignatures")),
    schema.AddBuildLog: Rule(_unsupported("addBuildLog")),
}
