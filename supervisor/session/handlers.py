"""One function per RPC request: check it, then run it on the store.

Each handler gets the session and a decoded request and returns a reply
from ``shared.rpc.schema``.  Every store path is re-parsed against the
session's store directory (``Session.store_path``); identity and trust
come from the session, never from the request.  Process: session.

Trust: requests come from an unprivileged worker that may be hostile;
their fields are claims, checked here before any store access.
"""

from __future__ import annotations

import re

from nixwarden.shared.errors import StoreRefusal, WorkerViolation
from nixwarden.shared.logtypes import error_line, warning_line
from nixwarden.shared.rpc import codec, schema
from nixwarden.shared.storepath import StorePath
from nixwarden.supervisor.session.loop import dispatch
from nixwarden.supervisor.store.adding import drain


_SHA256_HEX = re.compile("sha256:([0-9a-fA-F]{64})")


def _hex_hash(db_hash: str) -> str:
    """The DB's ``sha256:<hex>`` (or any prefixed form) as bare hex."""
    plain = _SHA256_HEX.fullmatch(db_hash)  # what Nix writes
    if plain is not None:
        return plain.group(1).lower()
    from nixwarden.shared.hashes import Hash
    return Hash.parse(db_hash).to_base16()


def path_info_msg(info) -> schema.PathInfo:
    return schema.PathInfo(
        path=info.path, deriver=info.deriver, nar_hash_hex=_hex_hash(info.nar_hash),
        references=list(info.references), registration_time=info.registration_time,
        nar_size=info.nar_size, ultimate=info.ultimate, sigs=list(info.sigs),
        ca=info.ca)


def checked_path(session, text: str) -> str:
    """A store path the worker sent, checked and in canonical form."""
    return session.full(session.store_path(text))


def checked_paths(session, texts) -> list[str]:
    return [checked_path(session, t) for t in texts]


RESTRICTED_SETTING = "ignoring the client-specified setting"


def on_set_options(session, req: schema.SetOptions):
    # The fixed fields apply to every client, trusted or not (spec §5.16).
    session.settings = session.settings.with_values({
        "keep-failed": req.keep_failed, "keep-going": req.keep_going,
        "fallback": req.try_fallback, "max-jobs": req.max_build_jobs,
        "max-silent-time": req.max_silent_time, "cores": req.build_cores,
        "substitute": req.use_substitutes})
    session.settings, warnings = session.settings.with_overrides(
        req.overrides, trusted=session.identity.trusted)
    session.writer.set_policy(session.settings)
    session.reset_substituters()
    shown = []
    for text in warnings:
        if text.startswith(RESTRICTED_SETTING):
            session.client_log.log(6, text)  # debug level, as nix-daemon 2.4-2.23
        else:
            shown.append(text)
    return schema.Warnings(shown)


def on_is_valid_path(session, req: schema.IsValidPath):
    return schema.Bool(session.db.is_valid(checked_path(session, req.path)))


def on_query_valid_paths(session, req: schema.QueryValidPaths):
    paths = checked_paths(session, req.paths)
    if req.substitute and session.can_substitute():
        missing = [p for p in paths
                   if not p.endswith(".drv") and p not in session.db.valid_subset([p])]
        if missing:
            for path, error in session.substitute(missing).items():
                if error is not None and path in missing:
                    session.client_log.log(1, warning_line(error))
    return schema.Paths(sorted(session.db.valid_subset(paths)))


def on_query_path_info(session, req: schema.QueryPathInfo):
    info = session.db.query_path_info(checked_path(session, req.path))
    return schema.MaybePathInfo(None if info is None else path_info_msg(info))


def on_query_referrers(session, req: schema.QueryReferrers):
    return schema.Paths(session.db.query_referrers(checked_path(session, req.path)))


def on_query_path_from_hash_part(session, req: schema.QueryPathFromHashPart):
    text = req.hash_part
    if len(text) != 32:
        return schema.OptPath(None)
    try:
        StorePath(text, "x")
    except ValueError:
        return schema.OptPath(None)
    return schema.OptPath(session.db.query_path_from_hash_part(text, session.layout.store_dir))


def on_query_all_valid_paths(session, req: schema.QueryAllValidPaths):
    return schema.Paths(session.db.query_all_valid_paths())


def on_query_deriver(session, req: schema.QueryDeriver):
    path = checked_path(session, req.path)
    if not session.db.is_valid(path):
        raise StoreRefusal(f"path '{path}' is not valid")
    return schema.OptPath(session.db.query_deriver(path))


def on_query_valid_derivers(session, req: schema.QueryValidDerivers):
    return schema.Paths(session.db.query_valid_derivers(checked_path(session, req.path)))


def on_query_derivation_output_map(session, req: schema.QueryDerivationOutputMap):
    drv = session.store_path(req.drv_path)
    if not drv.is_derivation:
        raise StoreRefusal(f"path '{req.drv_path}' is not a derivation")
    full = session.full(drv)
    if not session.db.is_valid(full):
        raise StoreRefusal(f"path '{full}' is not valid")
    from nixwarden.supervisor.build import ca
    from nixwarden.supervisor.store.drvoutputs import read_drv
    outputs = ca.output_map(session.db, session.store_dir,
                            lambda p: read_drv(session.writer.store_fd, session.store_dir, p),
                            full)
    return schema.OutputMap(sorted(outputs.items()))


def on_query_substitutable_paths(session, req: schema.QuerySubstitutablePaths):
    paths = checked_paths(session, req.paths)
    if not session.can_substitute():
        return schema.Paths([])
    return schema.Paths(sorted(session.substituters.query_substitutable(paths)))


def on_query_substitutable_path_infos(session, req: schema.QuerySubstitutablePathInfos):
    paths = checked_paths(session, [p for p, _ in req.paths])
    if not session.can_substitute():
        return schema.SubstitutableInfos([])
    infos = session.substituters.query_infos(paths, dict(req.paths))
    return schema.SubstitutableInfos(sorted(
        (i.path, i.deriver, sorted(i.references), i.download_size, i.nar_size)
        for i in infos.values()))


def on_query_missing(session, req: schema.QueryMissing):
    from nixwarden.supervisor.session.missing import query_missing
    for target in req.targets:
        path_text, bang, outputs = target.partition("!")
        session.store_path(path_text)
        if bang and not outputs:
            raise WorkerViolation(f"derived path '{target}' names no outputs")
    return query_missing(session, req.targets)


def on_add_temp_root(session, req: schema.AddTempRoot):
    session.temp_roots.add(checked_path(session, req.path))
    return schema.Ok()


def _check_drv_hash(text: str) -> str:
    from nixwarden.shared.hashes import Hash, HashAlgo
    try:
        return f"sha256:{Hash.parse(text, HashAlgo.SHA256).to_base16()}"
    except ValueError as exc:
        raise StoreRefusal(str(exc)) from None


def on_query_realisation(session, req: schema.QueryRealisation):
    session.db.ensure_ca_schema()
    found = session.db.query_realisation(_check_drv_hash(req.drv_hash), req.output)
    if found is None:
        return schema.NoRealisation()
    path, sigs, dependents = found
    session.temp_roots.add(path)
    return schema.Realisation(path, list(sigs), [list(d) for d in dependents])


def on_register_drv_output(session, req: schema.RegisterDrvOutput):
    path = checked_path(session, req.out_path)
    if not session.settings.feature_enabled("ca-derivations"):
        raise StoreRefusal("experimental Nix feature 'ca-derivations' is disabled; use "
                           "'--extra-experimental-features ca-derivations' to override")
    if not session.db.is_valid(path):
        raise StoreRefusal(f"path '{path}' is not valid")
    dependents = [(_check_drv_hash(drv_hash), name, checked_path(session, dep_path))
                  for drv_hash, name, dep_path in req.dependents]
    session.db.ensure_ca_schema()
    session.db.register_realisation(_check_drv_hash(req.drv_hash), req.output, path,
                                    req.signatures, dependents)
    return schema.Ok()


def on_check_nar_readable(session, req: schema.CheckNarReadable):
    path = checked_path(session, req.path)
    if not session.db.is_valid(path):
        raise StoreRefusal(f"path '{path}' is not valid")
    session.temp_roots.add(path)
    return schema.Ok()


# --- adding paths ----------------------------------------------------------------

def _claimed_paths(session, path: str, deriver: str | None, references: list[str]):
    """The path, deriver (None if none) and sorted unique references a
    NAR's metadata claims, each checked."""
    return (checked_path(session, path),
            checked_path(session, deriver) if deriver else None,
            tuple(sorted(set(checked_paths(session, references)))))


def _nar_claim(session, req):
    from nixwarden.shared.hashes import Hash, HashAlgo
    from nixwarden.shared.storepath import ContentAddress
    from nixwarden.supervisor.store.adding import NarClaim
    path, deriver, refs = _claimed_paths(session, req.path, req.deriver, req.references)
    try:
        nar_hash = Hash.parse(req.nar_hash, HashAlgo.SHA256)
        ca = ContentAddress.parse(req.ca) if req.ca else None
    except ValueError as exc:
        raise StoreRefusal(str(exc)) from None
    trusted = session.identity.trusted
    return NarClaim(path, deriver, nar_hash, refs, req.registration_time, req.nar_size,
                    req.ultimate and trusted, tuple(req.sigs), ca)


def on_add_to_store_nar(session, req: schema.AddToStoreNar):
    chunks = session.stream()
    try:
        claim = _nar_claim(session, req)
    except StoreRefusal:
        drain(chunks)
        raise
    trusted = session.identity.trusted
    session.writer.add_nar(claim, chunks, repair=req.repair and trusted,
                           check_sigs=not (req.dont_check_sigs and trusted))
    session.note_added(claim.path)
    return schema.Ok()


def on_add_nar_batch(session, req: schema.AddNarBatch):
    """AddMultipleToStore's paths, streamed by the worker without waiting
    (see ``schema.AddNarBatch``): each goes through the rules as a single
    AddToStoreNar would (its handler reads its whole NAR, failing or not).
    As in CppNix, the first failure ends the additions: the paths before it
    stay, the NARs after it are read and dropped."""
    failure = None
    while True:
        item = codec.decode_request(session.channel.recv_frame())
        if isinstance(item, schema.EndNarBatch):
            return failure or schema.Ok()
        if not isinstance(item, schema.AddToStoreNar):
            raise WorkerViolation(f"{type(item).__name__} inside a NAR batch")
        if failure is not None:
            drain(session.stream())
            continue
        reply = dispatch(session, item)
        if isinstance(reply, schema.Failure):
            failure = reply
            if session.broken:  # an internal error: the session ends
                return failure


def on_add_to_store(session, req: schema.AddToStore):
    from nixwarden.shared.storepath import ContentAddressMethod
    chunks = session.stream()
    try:
        method = ContentAddressMethod.parse(req.method)
        refs = checked_paths(session, req.references)
    except ValueError as exc:
        drain(chunks)
        raise StoreRefusal(str(exc)) from None
    info = session.writer.add_content(req.name, method, refs, chunks, nar_input=req.nar_input,
                                      repair=req.repair and session.identity.trusted)
    session.note_added(info.path)
    return path_info_msg(info)


def on_add_signatures(session, req: schema.AddSignatures):
    path = checked_path(session, req.path)
    if not session.db.is_valid(path):
        raise StoreRefusal(f"path '{path}' is not valid")
    session.db.add_signatures(path, req.sigs)
    return schema.Ok()


def on_stray_stream(session, req):
    raise WorkerViolation(f"{type(req).__name__} outside an upload")


def on_import_path(session, req: schema.ImportPath):
    from nixwarden.supervisor.store.adding import NarClaim

    def read_claim(nar_hash, nar_size):
        meta = codec.decode_request(session.channel.recv_frame())
        if isinstance(meta, schema.ImportAbandoned):
            raise StoreRefusal("the client's export record was refused after its NAR")
        if not isinstance(meta, schema.ImportPathMeta):
            raise WorkerViolation(f"{type(meta).__name__} where ImportPathMeta belongs")
        path, deriver, refs = _claimed_paths(session, meta.path, meta.deriver,
                                             meta.references)
        imported.append(path)
        return NarClaim(path, deriver, nar_hash, refs, 0, nar_size, False, (), None)

    imported: list[str] = []
    session.writer.import_nar(session.stream(), read_claim,
                              check_sigs=not session.identity.trusted)
    session.note_added(imported[0])
    return schema.Ok()


# --- building ---------------------------------------------------------------------

def _show_paths(paths) -> str:
    return ", ".join(f"'{p}'" for p in sorted(paths))


def check_targets(session, targets: list[str]) -> list[str]:
    for text in targets:
        path, bang, outputs = text.partition("!")
        sp = session.store_path(path)
        if bang and (not sp.is_derivation or not outputs):
            raise WorkerViolation(f"bad derived path '{text}'")
    return targets


def realise(session, targets: list[str], mode: int):
    from nixwarden.supervisor.build.realise import Realiser
    if mode == 1 and not session.identity.trusted:
        raise StoreRefusal("repairing is not allowed because you are not in 'trusted-users'")
    if mode not in (0, 1, 2):
        raise WorkerViolation(f"unknown build mode {mode}")
    return Realiser(session).build(check_targets(session, targets), mode)


def _result_msg(outcome) -> schema.BuildResult:
    outputs = [(name, path, outcome.output_ids.get(name, ""))
               for name, path in sorted(outcome.outputs.items())]
    return schema.BuildResult(outcome.status, outcome.error, outcome.times_built, False,
                              outcome.start_time, outcome.stop_time, outputs)


def on_build_paths(session, req: schema.BuildPaths):
    return build_paths_reply(session, req, realise(session, req.targets, req.mode))


def build_paths_reply(session, req: schema.BuildPaths, results):
    """The answer to BuildPaths from the goals' outcomes, as Nix 2.8 gives it."""
    if req.with_results:
        return schema.BuildResults([_result_msg(o) for _, o in results])
    failed = [(t.partition("!")[0], o) for t, o in results if not o.ok]
    if not failed:
        return schema.Ok()
    bits = 0
    for _, o in failed:
        bits |= o.exit_bits
    status = (bits | 0x60) if bits else 1
    # As Nix 2.8's Store::buildPaths: only derivation goals carry an error of
    # their own; a path that could not be substituted fails without one.
    errors = [str(o.error) for t, o in results if not o.ok and "!" in t]
    if len(failed) == 1 and errors:
        raise StoreRefusal(errors[0], status)
    for error in errors:
        session.client_log.log(0, error_line(error))
    raise StoreRefusal(f"build of {_show_paths(p for p, _ in failed)} failed", status)


def on_ensure_path(session, req: schema.EnsurePath):
    path = checked_path(session, req.path)
    if not session.db.is_valid(path):
        error = session.substitute([path]).get(path) if session.can_substitute() else None
        if error is not None or not session.db.is_valid(path):
            raise StoreRefusal(str(error) if error else
                               f"path '{path}' does not exist and cannot be created")
    session.temp_roots.add(path)
    return schema.Ok()


def on_add_indirect_root(session, req: schema.AddIndirectRoot):
    from nixwarden.supervisor.store import roots
    roots.add_indirect_root(session.layout.gcroots_dir, req.link)
    return schema.Ok()



# --- garbage collection --------------------------------------------------------------

def on_find_roots(session, req: schema.FindRoots):
    from nixwarden.supervisor.store.gcroots import RootFinder
    roots = RootFinder(session.layout, session.db,
                       log=lambda text: session.client_log.log(3, text)).all(
        censor=not session.identity.trusted)
    return schema.Roots(sorted((link, path) for path, links in roots.items() for link in links))


def on_collect_garbage(session, req: schema.CollectGarbage):
    from nixwarden.supervisor.store import gc
    if req.action not in (gc.RETURN_LIVE, gc.RETURN_DEAD, gc.DELETE_DEAD, gc.DELETE_SPECIFIC):
        raise WorkerViolation(f"unknown GC action {req.action}")
    if req.ignore_liveness:
        raise StoreRefusal("you are not allowed to ignore liveness")
    paths = checked_paths(session, req.paths)
    s = session.settings
    collector = gc.Collector(session.layout, session.db,
                             keep_outputs=bool(s.get("keep-outputs")),
                             keep_derivations=bool(s.get("keep-derivations")),
                             log=lambda text: session.client_log.log(3, text))
    done, freed = collector.collect(req.action, paths, req.max_freed)
    return schema.GcResult(done, freed)


def on_add_perm_root(session, req: schema.AddPermRoot):
    from nixwarden.supervisor.store import roots
    path = checked_path(session, req.path)
    link = roots.check_link_path(req.link)
    if session.store_dir.is_in_store(link):
        raise StoreRefusal(f"creating a garbage collector root ({link}) in the Nix store "
                           "is forbidden (are you running nix-build inside the store?)")
    session.temp_roots.add(path)
    roots.make_perm_root(link, path, session.store_dir)
    roots.add_indirect_root(session.layout.gcroots_dir, link)
    return schema.Strings([link])



# --- maintenance -----------------------------------------------------------------------

def on_optimise_store(session, req: schema.OptimiseStore):
    from nixwarden.supervisor.store import optimise
    optimise.optimise_store(session.layout, session.db, session.client_log.log,
                            acts=session.client_log, add_temp_root=session.temp_roots.add)
    return schema.Ok()


def on_verify_store(session, req: schema.VerifyStore):
    from nixwarden.supervisor.store import verify
    if req.repair and not session.identity.trusted:
        raise StoreRefusal("you are not privileged to repair paths")
    errors = verify.verify_store(session.layout, session.db, check_contents=req.check_contents,
                                 repair=req.repair,
                                 log=lambda level, text: session.client_log.log(level, text),
                                 repair_path=lambda p: _repair_path(session, p))
    return schema.Bool(errors)


def _repair_path(session, path: str) -> bool:
    """Re-fetch a damaged path, else rebuild it from its valid deriver (as
    Nix's repairPath); True when it was repaired."""
    if session.can_substitute() and session.substitute([path], repair=True).get(path) is None:
        return True
    deriver = session.db.query_deriver(path)
    if not deriver or not session.db.is_valid(deriver):
        return False
    # What the repairing derivation goal reports first (as Nix 2.8).
    session.client_log.log(3, f"checking path '{path}'...")
    session.client_log.log(0, f"path '{path}' is corrupted or missing!")
    from nixwarden.supervisor.build.realise import Realiser
    return Realiser(session).repair_outputs(deriver)


def on_add_build_log(session, req: schema.AddBuildLog):
    from nixwarden.supervisor.build.buildlog import store_build_log
    drv = session.store_path(req.drv_path)
    store_build_log(session.layout.log_dir, drv.base, session.stream(),
                    compress=bool(session.settings.get("compress-build-log")))
    return schema.Ok()


def refuse_build_log(session, req: schema.AddBuildLog):
    drain(session.stream())  # keep the stream in sync before refusing
    raise StoreRefusal("you are not privileged to add logs")



def on_build_derivation(session, req: schema.BuildDerivation):
    """BuildDerivation (spec worker-protocol §5.32): trusted clients may build
    anything; untrusted ones only content-addressed derivations, which are
    written to the store first so the path is ours, not the client's."""
    from nixwarden.shared.derivation import (Derivation, DerivationError, DerivationOutput,
                                             DerivationType)
    from nixwarden.shared.derivation_hash import derivation_store_path, fixed_output_path
    from nixwarden.supervisor.build.realise import Realiser
    drv_sp = session.store_path(req.drv_path)
    if not drv_sp.is_derivation:
        raise StoreRefusal(f"path '{req.drv_path}' is not a derivation")
    try:
        outputs = {o.name: DerivationOutput(o.path or None, o.hash_algo, o.hash)
                   for o in req.outputs}
        drv = Derivation(outputs, {}, tuple(checked_paths(session, req.input_srcs)), req.platform,
                         req.builder, tuple(req.args), dict(req.env),
                         drv_sp.name[:-len(".drv")])
        kind = drv.type()
    except (DerivationError, ValueError) as exc:
        raise StoreRefusal(str(exc)) from None
    drv_path = session.full(drv_sp)
    if not session.identity.trusted:
        if kind not in (DerivationType.FIXED, DerivationType.FLOATING, DerivationType.IMPURE):
            raise StoreRefusal("you are not privileged to build input-addressed derivations")
        drv_path = session.full(derivation_store_path(drv, session.store_dir))
    for name, out in drv.outputs.items():
        if out.content_hash is not None:
            want = session.store_dir.print(fixed_output_path(drv, session.store_dir, name))
            if out.path != want:
                raise StoreRefusal(f"derivation '{drv_path}' has incorrect output "
                                   f"'{out.path}', should be '{want}'")
    if req.mode == 1 and not session.identity.trusted:
        raise StoreRefusal("repairing is not allowed because you are not in 'trusted-users'")
    return _result_msg(Realiser(session).build_basic(drv_path, drv, req.mode))



def on_goodbye(session, req: schema.Goodbye):
    """Advisory: remembered only as the session's exit status (``--stdio``)."""
    session.exit_status = 1 if req.status else 0
    return None
