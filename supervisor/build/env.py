"""The builder's environment, arguments and build-directory files, exactly
as Nix 2.8 prepares them (spec/local-store.md §8.2-§8.4).

Holds ``BuilderSetup`` and ``builder_env`` (Nix's ``initEnv``,
``initTmpDir``, ``writeStructuredAttrs`` and the ``exportReferencesGraph``
step of ``startBuilder``).  Pure: it computes the values and file contents;
the caller creates the build directory, writes ``files`` into it and
execs the builder.  Run by the supervisor's build code in the session that
starts a build.

Trust: the derivation is client-supplied.  Nothing of the daemon's own
environment reaches the builder except the ``impureEnvVars`` names of a
fixed-output or impure derivation, taken from ``impure_env`` (the caller
decides what that holds).  File names in ``files`` are fixed
(``.attr-<hash>``, ``.attrs.json``, ``.attrs.sh``) or checked graph names,
so none contains ``/`` or starts a path outside the build directory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from nixwarden.shared import base32
from nixwarden.shared.derivation import Derivation, DerivationType, encode_text
from nixwarden.shared.storepath import StoreDir
from nixwarden.supervisor.build import BuildSetupError
from nixwarden.supervisor.build.placeholders import input_rewrites, rewrite
from nixwarden.supervisor.build.refgraph import ClosureInfo, graph_files
from nixwarden.supervisor.build.structured import drv_label, structured_attrs, structured_files

#: Where the build directory appears inside the sandbox (``sandbox-build-dir``).
SANDBOX_BUILD_DIR = "/build"

_TOKENS = re.compile(r"[^ \t\n\r]+")


@dataclass(frozen=True)
class BuilderSetup:
    """What to give the builder.

    ``env``: the complete environment, sorted by name (Nix passes a
    ``std::map``); ``args``: the arguments after ``argv[0]`` (which is the
    base name of the builder); ``files``: build-directory file name ->
    contents, in the order Nix writes them.
    """

    env: dict[str, str]
    args: list[str]
    files: dict[str, bytes] = field(default_factory=dict)


def attr_file_name(name: str) -> str:
    """``.attr-<nix32(sha256(name))>``, the passAsFile file of ``name``."""
    return ".attr-" + base32.encode(hashlib.sha256(encode_text(name)).digest())


def _pass_as_file(drv: Derivation, env: dict[str, str], files: dict[str, bytes],
                  top: str, rewrites: Mapping[str, str]) -> None:
    """Non-structured mode: drv env entries, or files for passAsFile names."""
    pass_as_file = set(_TOKENS.findall(drv.env.get("passAsFile", "")))
    for name, value in drv.env.items():
        if name not in pass_as_file:
            env[name] = value
            continue
        file_name = attr_file_name(name)
        files[file_name] = encode_text(rewrite(value, rewrites))
        env[name + "Path"] = f"{top}/{file_name}"


def _impure_var_names(drv: Derivation, attrs: dict | None, label: str) -> list[str]:
    """``impureEnvVars`` as Nix's ``getStringsAttr`` reads it."""
    if attrs is None:
        return _TOKENS.findall(drv.env.get("impureEnvVars", ""))
    value = attrs.get("impureEnvVars", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BuildSetupError(
            f"attribute 'impureEnvVars' of derivation '{label}' must be a list of strings")
    return value


def _base_env(store_dir: StoreDir, cores: int) -> dict[str, str]:
    return {"PATH": "/path-not-set", "HOME": "/homeless-shelter",
            "NIX_STORE": str(store_dir), "NIX_BUILD_CORES": str(cores)}


def _finish_env(env: dict[str, str], rewrites: Mapping[str, str]) -> dict[str, str]:
    """Sort by name and rewrite names and values (Nix rewrites ``name=value``;
    no rewrite key contains ``=``, so doing both halves apart is the same)."""
    items = sorted(env.items(), key=lambda kv: encode_text(kv[0]))
    return {rewrite(k, rewrites): rewrite(v, rewrites) for k, v in items}


def builder_env(drv: Derivation, *, store_dir: str | StoreDir, build_top: str, cores: int,
                output_paths: Mapping[str, str], impure_env: Mapping[str, str],
                sandboxed: bool, input_paths: Collection[str] = (),
                closure_info: ClosureInfo | None = None, drv_path: str | None = None,
                sandbox_build_dir: str = SANDBOX_BUILD_DIR) -> BuilderSetup:
    """Environment, arguments and files for building ``drv`` (spec §8.3).

    Args:
        drv: the derivation (client-supplied).
        store_dir: the logical store directory.
        build_top: the build directory on the host.
        cores: the ``cores`` setting, as given to the builder.
        output_paths: output name -> path the builder writes it to (the
            final path, or a scratch path, spec §8.6); every output.
        impure_env: where ``impureEnvVars`` values come from (the daemon's
            environment in Nix); missing names give empty values.
        sandboxed: the builder runs in the sandbox, where the build
            directory is ``sandbox_build_dir``.  As in Nix 2.8,
            ``NIX_ATTRS_*_FILE`` still name the host directory.
        input_paths: the input closure; ``exportReferencesGraph`` may only
            name these.
        closure_info: ``refgraph.ClosureInfo``; needed only if the
            derivation uses ``exportReferencesGraph``.
        drv_path: the ``.drv`` path, for messages.
    Returns:
        A ``BuilderSetup``.
    Raises:
        BuildSetupError: the derivation is refused as Nix 2.8 refuses it.
        DerivationError: the derivation's outputs are inconsistent.
        ValueError: an output without a path, a broken callback.
    """
    store = store_dir if isinstance(store_dir, StoreDir) else StoreDir(store_dir)
    rewrites = input_rewrites(drv, output_paths)
    attrs = structured_attrs(drv, drv_path)
    env, files = _base_env(store, cores), {}
    top = sandbox_build_dir if sandboxed else build_top
    if attrs is None:
        _pass_as_file(drv, env, files, top, rewrites)
    _finish_init_env(drv, attrs, env, top, impure_env, drv_label(drv, drv_path))
    graph = dict(store_dir=store, input_paths=input_paths, closure_info=closure_info)
    if attrs is not None:
        _add_structured(drv, attrs, env, files, build_top, rewrites, graph, drv_path)
    else:
        for name, text in graph_files(drv.env.get("exportReferencesGraph", ""), **graph).items():
            files[name] = encode_text(text)
    args = [rewrite(a, rewrites) for a in drv.args]
    return BuilderSetup(_finish_env(env, rewrites), args, files)


def _finish_init_env(drv: Derivation, attrs: dict | None, env: dict[str, str], top: str,
                     impure_env: Mapping[str, str], label: str) -> None:
    """The rest of ``initTmpDir`` and ``initEnv``, after the drv's own env."""
    for name in ("NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"):
        env[name] = top
    kind = drv.type()
    if kind is DerivationType.FIXED:
        env["NIX_OUTPUT_CHECKED"] = "1"
    if kind in (DerivationType.FIXED, DerivationType.IMPURE):
        for name in _impure_var_names(drv, attrs, label):
            env[name] = impure_env.get(name, "")
    env["NIX_LOG_FD"] = "2"
    env["TERM"] = "xterm-256color"


def _add_structured(drv: Derivation, attrs: dict, env: dict[str, str],
                    files: dict[str, bytes], build_top: str, rewrites: Mapping[str, str],
                    graph: dict, drv_path: str | None) -> None:
    """``writeStructuredAttrs``: ``.attrs.sh`` then ``.attrs.json``."""
    texts = structured_files(drv, rewrites, drv_path=drv_path, attrs=attrs, **graph)
    assert texts is not None
    json_text, sh_text = texts
    files[".attrs.sh"] = encode_text(sh_text)
    env["NIX_ATTRS_SH_FILE"] = f"{build_top}/.attrs.sh"
    files[".attrs.json"] = encode_text(json_text)
    env["NIX_ATTRS_JSON_FILE"] = f"{build_top}/.attrs.json"
