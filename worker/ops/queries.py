"""Query ops: validity, path infos, referrers, derivers, outputs, missing.

Spec worker-protocol §5.1-§5.5, §5.15, §5.18-§5.29, §5.36, §5.37, §5.39.
Obsolete ops that old clients still send are answered from the same
store calls as their successors.  Process: worker.
"""

from __future__ import annotations

import json

from nixwarden.shared import limits
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.wire import primitives as w
from nixwarden.shared.wire.ops import Op, ProtocolVersion
from nixwarden.worker.ops import op, read_path, read_paths, w_opt_path

PATH_INFO_SIGS = ProtocolVersion(1, 16)
PATH_INFO_VALID_FLAG = ProtocolVersion(1, 17)
SUBST_INFOS_MAP = ProtocolVersion(1, 22)
VALID_PATHS_SUBSTITUTE = ProtocolVersion(1, 27)
DERIVED_PATH_NEW_SYNTAX = ProtocolVersion(1, 30)
REALISATION_JSON = ProtocolVersion(1, 31)


def w_path_info(info, version: ProtocolVersion) -> bytes:
    """Encode an UnkeyedValidPathInfo for ``version`` (spec §2.11)."""
    out = (w_opt_path(info.deriver) + w.w_str(info.nar_hash_hex)
           + w.w_string_set(info.references)
           + w.w_u64(info.registration_time) + w.w_u64(info.nar_size))
    if version >= PATH_INFO_SIGS:
        out += (w.w_bool(info.ultimate) + w.w_string_set(info.sigs)
                + w.w_str(info.ca or ""))
    return out


def _valid_info(ctx, path: str):
    info = ctx.store.query_path_info(ctx.check_path(path))
    if info is None:
        raise StoreRefusal(f"path '{path}' is not valid")
    return info


def _single_path_op(code: Op, answer):
    """Register an op whose request is one store path."""
    @op(code)
    def handler(ctx):
        path = yield from read_path()
        return lambda: answer(ctx, ctx.check_path(path))
    handler.__name__ = code.name.lower()
    return handler


_single_path_op(Op.IS_VALID_PATH,
                lambda ctx, p: w.w_bool(ctx.store.is_valid_path(p)))
_single_path_op(Op.QUERY_REFERRERS,
                lambda ctx, p: w.w_string_set(ctx.store.query_referrers(p)))
_single_path_op(Op.QUERY_REFERENCES,
                lambda ctx, p: w.w_string_set(_valid_info(ctx, p).references))
_single_path_op(Op.QUERY_PATH_HASH,
                lambda ctx, p: w.w_str(_valid_info(ctx, p).nar_hash_hex))
_single_path_op(Op.QUERY_DERIVER,
                lambda ctx, p: w_opt_path(_valid_info(ctx, p).deriver))
_single_path_op(Op.QUERY_VALID_DERIVERS,
                lambda ctx, p: w.w_string_set(ctx.store.query_valid_derivers(p)))
_single_path_op(Op.HAS_SUBSTITUTES,
                lambda ctx, p: w.w_bool(bool(ctx.store.query_substitutable_paths([p]))))


def _output_map(ctx, drv: str) -> list[tuple[str, str | None]]:
    return ctx.store.query_derivation_output_map(drv)


_single_path_op(Op.QUERY_DERIVATION_OUTPUTS, lambda ctx, p: w.w_string_set(
    path for _, path in _output_map(ctx, p) if path))
_single_path_op(Op.QUERY_DERIVATION_OUTPUT_NAMES, lambda ctx, p: w.w_string_set(
    name for name, _ in _output_map(ctx, p)))
_single_path_op(Op.QUERY_DERIVATION_OUTPUT_MAP, lambda ctx, p: w.w_string_map(
    {name: path or "" for name, path in _output_map(ctx, p)}))


@op(Op.QUERY_PATH_INFO)
def query_path_info(ctx):
    path = yield from read_path()

    def run():
        info = ctx.store.query_path_info(ctx.check_path(path))
        if ctx.version < PATH_INFO_VALID_FLAG:
            if info is None:
                raise StoreRefusal(f"path '{path}' is not valid")
            return w_path_info(info, ctx.version)
        if info is None:
            return w.w_bool(False)
        return w.w_bool(True) + w_path_info(info, ctx.version)
    return run


@op(Op.QUERY_SUBSTITUTABLE_PATH_INFO)
def query_substitutable_path_info(ctx):
    path = yield from read_path()

    def run():
        infos = ctx.store.query_substitutable_path_infos([(ctx.check_path(path), "")])
        if not infos:
            return w.w_u64(0)
        return w.w_u64(1) + _w_subst_info(infos[0])
    return run


def _w_subst_info(info) -> bytes:
    _, deriver, references, download_size, nar_size = info
    return (w_opt_path(deriver) + w.w_string_set(references)
            + w.w_u64(download_size) + w.w_u64(nar_size))


@op(Op.QUERY_SUBSTITUTABLE_PATH_INFOS)
def query_substitutable_path_infos(ctx):
    if ctx.version >= SUBST_INFOS_MAP:
        pairs = yield from w.string_pairs(max_len=limits.MAX_STRING)
    else:
        pairs = [(p, "") for p in (yield from read_paths())]

    def run():
        for path, _ in pairs:
            ctx.check_path(path)
        infos = ctx.store.query_substitutable_path_infos(pairs)
        infos = sorted(infos, key=lambda i: i[0])
        return w.w_u64(len(infos)) + b"".join(
            w.w_str(i[0]) + _w_subst_info(i) for i in infos)
    return run


@op(Op.QUERY_VALID_PATHS)
def query_valid_paths(ctx):
    paths = yield from read_paths()
    substitute = False
    if ctx.version >= VALID_PATHS_SUBSTITUTE:
        substitute = yield from w.boolean()
    return lambda: w.w_string_set(
        ctx.store.query_valid_paths(ctx.check_paths(paths), substitute))


@op(Op.QUERY_SUBSTITUTABLE_PATHS)
def query_substitutable_paths(ctx):
    paths = yield from read_paths()
    return lambda: w.w_string_set(
        ctx.store.query_substitutable_paths(ctx.check_paths(paths)))


@op(Op.QUERY_ALL_VALID_PATHS)
def query_all_valid_paths(ctx):
    yield from ()
    return lambda: w.w_string_set(ctx.store.query_all_valid_paths())


@op(Op.QUERY_PATH_FROM_HASH_PART)
def query_path_from_hash_part(ctx):
    hash_part = yield from w.string(limits.MAX_STORE_PATH)
    return lambda: w_opt_path(ctx.store.query_path_from_hash_part(hash_part))


def normalise_derived_path(text: str, version: ProtocolVersion) -> str:
    """Turn a pre-1.30 "path with outputs" into the >= 1.30 syntax (spec §2.8)."""
    if version >= DERIVED_PATH_NEW_SYNTAX:
        return text
    path, bang, outputs = text.partition("!")
    if bang:
        return text
    return f"{path}!*" if path.endswith(".drv") else path


def check_derived_path(ctx, text: str) -> str:
    path, _, _ = text.partition("!")
    ctx.check_path(path)
    return text


@op(Op.QUERY_MISSING)
def query_missing(ctx):
    targets = yield from w.strings(max_len=limits.MAX_STRING)

    def run():
        norm = [check_derived_path(ctx, normalise_derived_path(t, ctx.version))
                for t in targets]
        m = ctx.store.query_missing(norm)
        return (w.w_string_set(m.will_build) + w.w_string_set(m.will_substitute)
                + w.w_string_set(m.unknown) + w.w_u64(m.download_size)
                + w.w_u64(m.nar_size))
    return run


def parse_drv_output(text: str) -> tuple[str, str]:
    """``sha256:<hex>!<output>`` -> (hash, output)."""
    drv_hash, bang, output = text.rpartition("!")
    if not bang or not drv_hash or not output:
        raise StoreRefusal(f"invalid derivation output id '{text}'")
    return drv_hash, output


def realisation_json(drv_hash: str, output: str, path: str, sigs, dependents=()) -> str:
    """A realisation as Nix 2.4-2.34 send it (spec §2.9 b): keys sorted, compact."""
    deps = {dep_id: dep_path.rsplit("/", 1)[1] for dep_id, dep_path in dependents}
    return json.dumps({"dependentRealisations": deps, "id": f"{drv_hash}!{output}",
                       "outPath": path.rsplit("/", 1)[1], "signatures": sorted(sigs)},
                      separators=(",", ":"), sort_keys=True)


@op(Op.QUERY_REALISATION)
def query_realisation(ctx):
    output_id = yield from w.string(limits.MAX_STORE_PATH)

    def run():
        drv_hash, output = parse_drv_output(output_id)
        found = ctx.store.query_realisation(drv_hash, output)
        if found is None:
            return w.w_strings([])
        if ctx.version < REALISATION_JSON:
            return w.w_strings([found.out_path])
        return w.w_strings([realisation_json(drv_hash, output, found.out_path,
                                             found.signatures, found.dependents)])
    return run


@op(Op.REGISTER_DRV_OUTPUT)
def register_drv_output(ctx):
    if ctx.version < REALISATION_JSON:
        output_id = yield from w.string(limits.MAX_STORE_PATH)
        base = yield from w.string(limits.MAX_STORE_PATH)
        fields = (output_id, f"{ctx.store_dir}/{base}", [])
    else:
        text = yield from w.string(limits.MAX_STRING)
        fields = text

    def run():
        if isinstance(fields, str):
            try:
                obj = json.loads(fields)
                output_id = obj["id"]
                path = f"{ctx.store_dir}/{obj['outPath']}"
                sigs = [str(x) for x in obj.get("signatures", [])]
                dependents = [(*parse_drv_output(str(dep_id)),
                               ctx.check_path(f"{ctx.store_dir}/{dep_path}"))
                              for dep_id, dep_path in
                              (obj.get("dependentRealisations") or {}).items()]
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StoreRefusal(f"invalid realisation: {exc}") from None
        else:
            (output_id, path, sigs), dependents = fields, []
        drv_hash, output = parse_drv_output(output_id)
        ctx.store.register_drv_output(drv_hash, output, ctx.check_path(path), sigs,
                                      dependents)
        return b""
    return run
