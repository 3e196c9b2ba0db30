"""``exportReferencesGraph``: closure files handed to a builder
(spec/local-store.md §8.3, spec/store-formats.md §17).

Holds the two renderings Nix 2.8 writes: the validity-registration text of
a closure (non-structured mode, one file per name in the build directory)
and the path-info JSON array (structured mode, merged into
``.attrs.json``), plus the checks Nix applies first (file names, store
paths, membership of the input closure).  Pure; run by the supervisor's
build code in the session that starts a build.  The closure itself comes
from a caller-supplied callback that reads the store database.

Trust: names and paths come from the client-supplied derivation.  Names
must match ``[A-Za-z_][A-Za-z0-9_.-]*`` (no ``/``, no leading dot), paths
must lie in the store and in the derivation's input closure, so a client
can neither write outside the build directory nor learn about paths it
did not already depend on.

Callback contract (``ClosureInfo``): called with a list of full store
paths, it returns one mapping per path of Nix's ``exportReferences`` of
them (their closure, plus the closure of the outputs of every ``.drv`` in
it), with keys ``path``, ``references`` (full paths), ``narHash`` (any
form ``Hash.parse`` reads, or a ``Hash``), ``narSize``, optionally ``ca``
(rendered content address or None), ``deriver`` (ignored: Nix writes
neither derivers nor hashes here) and ``valid`` (False for a path that
is not valid: JSON then holds only ``path`` and ``valid``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from nixwarden.shared.hashes import Hash
from nixwarden.shared.storepath import BadStorePath, StoreDir
from nixwarden.supervisor.build import BuildSetupError

ClosureInfo = Callable[[list[str]], Iterable[Mapping[str, Any]]]

#: Allowed file names (Nix's regex, matched in full).
GRAPH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")

#: Nix's tokenizeString separators.
_TOKENS = re.compile(r"[^ \t\n\r]+")


def check_graph_name(name: str) -> None:
    """Raise ``BuildSetupError`` unless ``name`` may name a graph file."""
    if not GRAPH_NAME.fullmatch(name):
        raise BuildSetupError(f"invalid file name '{name}' in 'exportReferencesGraph'")


def closure_entries(paths: Iterable[str], input_paths: Collection[str],
                    closure_info: ClosureInfo | None) -> dict[str, Mapping[str, Any]]:
    """Nix's ``exportReferences``: check, then ask the callback.

    Args:
        paths: full store paths to export.
        input_paths: the derivation's input closure (full paths).
        closure_info: see the module docstring (needed unless ``paths``
            is empty).
    Returns:
        path -> entry, sorted by path.
    Raises:
        BuildSetupError: a path outside the input closure.
        ValueError: no callback, or the callback broke its contract.
    """
    wanted = sorted(set(paths))
    for path in wanted:
        if path not in input_paths:
            raise BuildSetupError(
                f"cannot export references of path '{path}' because it is not "
                "in the input closure of the derivation")
    if not wanted:
        return {}
    entries = {e["path"]: e for e in _need(closure_info)(wanted)}
    missing = [p for p in wanted if p not in entries]
    for entry in entries.values():
        if entry.get("valid", True):
            missing += [r for r in entry["references"] if r not in entries]
    if missing:
        raise ValueError(f"closure callback omitted '{missing[0]}'")
    return dict(sorted(entries.items()))


def validity_text(entries: Mapping[str, Mapping[str, Any]]) -> str:
    """Validity-registration text without hashes or derivers (SF §17)."""
    lines: list[str] = []
    for path, entry in entries.items():
        refs = sorted(set(entry["references"]))
        lines += [path, "", str(len(refs)), *refs]
    return "".join(line + "\n" for line in lines)


def _closure_size(start: str, entries: Mapping[str, Mapping[str, Any]]) -> int:
    """Sum of ``narSize`` over the closure of ``start`` (Nix's getClosureSize)."""
    seen, todo, total = {start}, [start], 0
    while todo:
        entry = entries[todo.pop()]
        total += int(entry["narSize"])
        for ref in entry["references"]:
            if ref not in seen:
                seen.add(ref)
                todo.append(ref)
    return total


def _nar_hash_text(value: Hash | str) -> str:
    h = value if isinstance(value, Hash) else Hash.parse(value)
    return h.to_prefixed("nix32")


def path_info_json(entries: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Nix 2.8's ``pathInfoToJSON(paths, includeImpureInfo=false,
    showClosureSize=true)``, one object per entry in path order."""
    result: list[dict[str, Any]] = []
    for path, entry in entries.items():
        if not entry.get("valid", True):
            result.append({"path": path, "valid": False})
            continue
        obj: dict[str, Any] = {
            "path": path,
            "narHash": _nar_hash_text(entry["narHash"]),
            "narSize": int(entry["narSize"]),
            "references": sorted(set(entry["references"])),
        }
        if entry.get("ca"):
            obj["ca"] = entry["ca"]
        obj["closureSize"] = _closure_size(path, entries)
        result.append(obj)
    return result


def _graph_pairs(value: str) -> list[tuple[str, str]]:
    tokens = _TOKENS.findall(value)
    if len(tokens) % 2:
        raise BuildSetupError(f"odd number of tokens in 'exportReferencesGraph': '{value}'")
    return list(zip(tokens[::2], tokens[1::2]))


def graph_files(env_value: str, *, store_dir: StoreDir, input_paths: Collection[str],
                closure_info: ClosureInfo | None) -> dict[str, str]:
    """Non-structured mode: the files named by ``exportReferencesGraph``.

    Args:
        env_value: the derivation's ``exportReferencesGraph`` env value,
            ``name1 path1 name2 path2 ...``; a path may be a sub-path of
            a store path, as in Nix.
    Returns:
        file name -> validity-registration text, in the order Nix writes
        them (a repeated name keeps the last).
    Raises:
        BuildSetupError: odd token count, a bad name, a non-store path, a
            path outside the input closure (Nix's messages).
    """
    files: dict[str, str] = {}
    for name, path in _graph_pairs(env_value):
        check_graph_name(name)
        if not store_dir.is_in_store(path):
            raise BuildSetupError(f"'exportReferencesGraph' contains a non-store path '{path}'")
        try:
            full = store_dir.print(store_dir.to_store_path(path))
        except BadStorePath as e:
            raise BuildSetupError(str(e)) from None
        files[name] = validity_text(
            closure_entries([full], input_paths, closure_info))
    return files


def _need(closure_info: ClosureInfo | None) -> ClosureInfo:
    if closure_info is None:
        raise ValueError("exportReferencesGraph needs a closure_info callback")
    return closure_info


_JSON_TYPE = {type(None): "null", bool: "boolean", int: "number", float: "number",
              dict: "object", list: "array", str: "string"}


def json_type_name(value: Any) -> str:
    """nlohmann's name for the type of a parsed JSON value."""
    return _JSON_TYPE[type(value)]


def _json_elements(value: Any) -> list[Any]:
    """What nlohmann iterates over: array items, object values, or the scalar."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return [value[k] for k in sorted(value)]
    return [] if value is None else [value]


def _structured_paths(value: Any, store_dir: StoreDir) -> list[str]:
    paths = []
    for item in _json_elements(value):
        if not isinstance(item, str):
            raise BuildSetupError(
                f"[json.exception.type_error.302] type must be string, "
                f"but is {json_type_name(item)}")
        try:
            paths.append(store_dir.print(store_dir.parse(item)))
        except BadStorePath as e:
            raise BuildSetupError(str(e)) from None
    return paths


def structured_graphs(attrs: Mapping[str, Any], *, store_dir: StoreDir,
                      input_paths: Collection[str],
                      closure_info: ClosureInfo | None) -> dict[str, list[dict[str, Any]]]:
    """Structured mode: ``{name: path-info JSON}`` for ``exportReferencesGraph``.

    Nix only looks at an ``exportReferencesGraph`` *object*; each value is
    a list of store paths (a single string or null also work, as in 2.8).
    Names are not checked in this mode (they become JSON keys).

    Raises:
        BuildSetupError: a non-string element, a path that is not a store
            path, a path outside the input closure.
    """
    spec = attrs.get("exportReferencesGraph")
    if not isinstance(spec, dict):
        return {}
    graphs = {}
    for name in sorted(spec):
        paths = _structured_paths(spec[name], store_dir)
        graphs[name] = path_info_json(
            closure_entries(paths, input_paths, closure_info))
    return graphs
