"""Build ops: BuildPaths (9), BuildPathsWithResults (46), EnsurePath (10),
BuildDerivation (36).  Spec worker-protocol §2.8, §2.10, §2.12, §5.8,
§5.9, §5.32, §5.42.

The worker decodes derived paths and derivations and encodes build
results per protocol version; the session plans and runs the builds and
decides what each client may ask.  Process: worker.
"""

from __future__ import annotations

from nixwarden.shared import limits
from nixwarden.shared.rpc import schema
from nixwarden.shared.wire import primitives as w
from nixwarden.shared.wire.ops import Op, ProtocolVersion
from nixwarden.worker.ops import op, read_path, read_paths
from nixwarden.worker.ops.queries import (check_derived_path, normalise_derived_path,
                                          realisation_json)

BUILD_MODE = ProtocolVersion(1, 15)
BUILT_OUTPUTS = ProtocolVersion(1, 28)
TIMES = ProtocolVersion(1, 29)
DERIVED_PATH_NEW_SYNTAX = ProtocolVersion(1, 30)
CPU_TIMES = ProtocolVersion(1, 37)
DUMMY_DRV_HASH = "sha256:" + "0" * 64


def _read_targets(ctx):
    targets = yield from w.strings(max_len=limits.MAX_STRING)
    mode = 0
    if ctx.version >= BUILD_MODE:
        mode = yield from w.u8()
    return targets, mode


def _normalised(ctx, targets: list[str]) -> list[str]:
    return [check_derived_path(ctx, normalise_derived_path(t, ctx.version)) for t in targets]


def w_build_result(result: schema.BuildResult, version: ProtocolVersion) -> bytes:
    """Encode a BuildResult with the fields ``version`` carries (spec §2.10)."""
    out = w.w_u64(result.status) + w.w_str(result.error_msg)
    if version >= TIMES:
        out += (w.w_u64(result.times_built) + w.w_bool(result.is_non_deterministic)
                + w.w_u64(result.start_time) + w.w_u64(result.stop_time))
    if version >= CPU_TIMES:
        out += w.w_u64(0) + w.w_u64(0)  # cpuUser, cpuSystem: not measured
    if version >= BUILT_OUTPUTS:
        realisations = {}
        for name, path, drv_hash in result.built_outputs:
            drv_hash = drv_hash or DUMMY_DRV_HASH
            realisations[f"{drv_hash}!{name}"] = realisation_json(drv_hash, name, path, [])
        out += w.w_string_map(realisations)
    return out


def _w_derived_path(text: str, version: ProtocolVersion) -> bytes:
    if version < DERIVED_PATH_NEW_SYNTAX and text.endswith("!*"):
        text = text[:-2]
    return w.w_str(text)


@op(Op.BUILD_PATHS)
def build_paths(ctx):
    targets, mode = yield from _read_targets(ctx)

    def run():
        ctx.store.build_paths(_normalised(ctx, targets), mode)
        return w.w_u64(1)
    return run


@op(Op.BUILD_PATHS_WITH_RESULTS)
def build_paths_with_results(ctx):
    targets, mode = yield from _read_targets(ctx)

    def run():
        norm = _normalised(ctx, targets)
        results = ctx.store.build_paths_with_results(norm, mode)
        return w.w_u64(len(results)) + b"".join(
            _w_derived_path(t, ctx.version) + w_build_result(r, ctx.version)
            for t, r in zip(targets, results))
    return run


@op(Op.ENSURE_PATH)
def ensure_path(ctx):
    path = yield from read_path()

    def run():
        ctx.store.ensure_path(ctx.check_path(path))
        return w.w_u64(1)
    return run


def _read_basic_derivation():
    n = yield from w.count(limits.MAX_LIST_ITEMS)
    outputs = []
    for _ in range(n):
        name = yield from w.string(limits.MAX_STORE_PATH)
        path = yield from w.string(limits.MAX_STORE_PATH)
        algo = yield from w.string(64)
        digest = yield from w.string(256)
        outputs.append(schema.BasicOutput(name, path, algo, digest))
    srcs = yield from read_paths()
    platform = yield from w.string(256)
    builder = yield from w.string(limits.MAX_STRING)
    args = yield from w.strings()
    env = yield from w.string_pairs()
    return outputs, srcs, platform, builder, args, env


@op(Op.BUILD_DERIVATION)
def build_derivation(ctx):
    drv_path = yield from read_path()
    outputs, srcs, platform, builder, args, env = yield from _read_basic_derivation()
    mode = yield from w.u8()

    def run():
        ctx.check_path(drv_path)
        ctx.check_paths(srcs)
        for o in outputs:
            if o.path:
                ctx.check_path(o.path)
        req = schema.BuildDerivation(drv_path, outputs, srcs, platform, builder,
                                     args, env, mode)
        return w_build_result(ctx.store.build_derivation(req), ctx.version)
    return run
