"""What each connection may ask, as a table (STYLE.md 1.3).

Dispatch is a lookup: a request type without a rule is a violation; a
rule marked ``trusted_only`` refuses untrusted sessions with Nix's text.
Adding a row is a security change.  Process: session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nixwarden.shared.rpc import schema
from nixwarden.supervisor.session import handlers as h


@dataclass(frozen=True)
class Rule:
    handler: Callable
    trusted_only: bool = False
    refusal: str = ""
    untrusted: Callable | None = None  # what an untrusted session gets instead


RULES: dict[type, Rule] = {
    schema.SetOptions: Rule(h.on_set_options),
    schema.IsValidPath: Rule(h.on_is_valid_path),
    schema.QueryValidPaths: Rule(h.on_query_valid_paths),
    schema.QueryPathInfo: Rule(h.on_query_path_info),
    schema.QueryReferrers: Rule(h.on_query_referrers),
    schema.QueryPathFromHashPart: Rule(h.on_query_path_from_hash_part),
    schema.QueryAllValidPaths: Rule(h.on_query_all_valid_paths),
    schema.QueryDeriver: Rule(h.on_query_deriver),
    schema.QueryValidDerivers: Rule(h.on_query_valid_derivers),
    schema.QueryDerivationOutputMap: Rule(h.on_query_derivation_output_map),
    schema.QuerySubstitutablePaths: Rule(h.on_query_substitutable_paths),
    schema.QuerySubstitutablePathInfos: Rule(h.on_query_substitutable_path_infos),
    schema.QueryMissing: Rule(h.on_query_missing),
    schema.AddTempRoot: Rule(h.on_add_temp_root),
    schema.QueryRealisation: Rule(h.on_query_realisation),
    schema.CheckNarReadable: Rule(h.on_check_nar_readable),
    schema.AddToStoreNar: Rule(h.on_add_to_store_nar),
    schema.AddNarBatch: Rule(h.on_add_nar_batch),
    schema.AddToStore: Rule(h.on_add_to_store),
    schema.AddSignatures: Rule(h.on_add_signatures, trusted_only=True,
                               refusal="you are not privileged to add signatures"),
    schema.ImportPath: Rule(h.on_import_path),
    schema.BuildPaths: Rule(h.on_build_paths),
    schema.EnsurePath: Rule(h.on_ensure_path),
    schema.BuildDerivation: Rule(h.on_build_derivation),
    schema.AddIndirectRoot: Rule(h.on_add_indirect_root),
    schema.FindRoots: Rule(h.on_find_roots),
    schema.CollectGarbage: Rule(h.on_collect_garbage),
    schema.OptimiseStore: Rule(h.on_optimise_store),
    schema.Goodbye: Rule(h.on_goodbye),
    schema.RegisterDrvOutput: Rule(h.on_register_drv_output),
    schema.VerifyStore: Rule(h.on_verify_store),
    schema.AddBuildLog: Rule(h.on_add_build_log, untrusted=h.refuse_build_log),
    # CppNix refuses AddPermRoot for untrusted clients: the daemon would
    # create the link as root wherever the client names.
    schema.AddPermRoot: Rule(h.on_add_perm_root, trusted_only=True,
                             refusal="you are not privileged to create perm roots"),
    schema.ImportPathMeta: Rule(h.on_stray_stream),
    # Chunk and End are read by the upload handlers themselves; on their own
    # they are a violation.
    schema.Chunk: Rule(h.on_stray_stream),
    schema.End: Rule(h.on_stray_stream),
    schema.EndNarBatch: Rule(h.on_stray_stream),
}
