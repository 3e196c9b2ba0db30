"""Import and boundary rules, enforced on the source (STYLE.md §4, 1.1, 1.7, 3.8).

Every .py under shared/, worker/ and supervisor/ is parsed with ``ast``:

* ``shared`` imports only the standard library, msgspec and itself;
* ``worker`` never imports ``nixwarden.supervisor`` or ``sqlite3``;
* ``supervisor`` never imports ``nixwarden.worker`` or ``nixwarden.shared.wire``;
* only the store database (``supervisor/store/db.py``) and the narinfo disk
  cache (``supervisor/store/narinfo_cache.py``) import ``sqlite3``;
* nothing imports pickle-like modules, and nothing under ``supervisor/``
  calls a ``loads``/``load`` of them, ``eval``/``exec``, or a
  ``Connection.recv()`` (which unpickles);
* the RPC schema's type ids: requests even, replies odd, all unique.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"shared": "nixwarden.shared", "worker": "nixwarden.worker",
            "supervisor": "nixwarden.supervisor"}
STDLIB = frozenset(sys.stdlib_module_names)
PICKLE_LIKE = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle",
               "copyreg", "jsonpickle"}


def _module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(REPO)
    parts = list(rel.with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts.pop()
    return ".".join(parts), is_pkg


def _sources():
    for top in PACKAGES:
        for path in sorted((REPO / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


SOURCES = list(_sources())


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute names of everything ``path`` imports (modules and from-names)."""
    tree = ast.parse(path.read_text(), str(path))
    module, is_pkg = _module_name(path)
    package = module if is_pkg else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    for node in ast.walk(tree):      # importlib.import_module("x") / __import__("x")
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and _call_name(node) in ("import_module", "__import__"):
            found.append((node.args[0].value, node.lineno))
    return found


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _top(name: str) -> str:
    return name.split(".")[0]


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO)}:{line}"


def test_sources_found():
    assert len(SOURCES) > 30
    names = {_module_name(p)[0] for p in SOURCES}
    assert {"nixwarden.shared.rpc.schema", "nixwarden.worker.zygote",
            "nixwarden.supervisor.store.db"} <= names


@pytest.mark.parametrize("path", [p for p in SOURCES if p.parts[len(REPO.parts)] == "shared"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_shared_imports_only_stdlib_msgspec_and_itself(path):
    bad = [(name, _where(path, line)) for name, line in _imports(path)
           if not (_top(name) in STDLIB or _top(name) == "msgspec"
                   or _within(name, "nixwarden.shared") or name == "__future__"
                   or _is_from_name_of_allowed(name))]
    assert not bad


def _is_from_name_of_allowed(name: str) -> bool:
    # "from os import path" yields "os.path"; "from __future__ import x".
    return _top(name) in STDLIB or name.startswith("__future__")


@pytest.mark.parametrize("path", [p for p in SOURCES if p.parts[len(REPO.parts)] == "worker"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_worker_never_imports_supervisor_or_sqlite(path):
    bad = [(name, _where(path, line)) for name, line in _imports(path)
           if _within(name, "nixwarden.supervisor") or _top(name) == "sqlite3"]
    assert not bad


@pytest.mark.parametrize("path", [p for p in SOURCES if p.parts[len(REPO.parts)] == "supervisor"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_supervisor_never_imports_worker_or_wire(path):
    bad = [(name, _where(path, line)) for name, line in _imports(path)
           if _within(name, "nixwarden.worker") or _within(name, "nixwarden.shared.wire")]
    assert not bad


def test_only_database_modules_import_sqlite3():
    users = {str(p.relative_to(REPO)) for p in SOURCES
             for name, _ in _imports(p) if _top(name) == "sqlite3"}
    assert users <= {"supervisor/store/db.py", "supervisor/store/narinfo_cache.py"}


def test_nothing_imports_pickle_like_modules():
    bad = [(name, _where(p, line)) for p in SOURCES for name, line in _imports(p)
           if _top(name) in PICKLE_LIKE]
    assert not bad


@pytest.mark.parametrize("path", [p for p in SOURCES if p.parts[len(REPO.parts)] == "supervisor"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_supervisor_never_deserialises_objects(path):
    """No pickle/marshal loads, no eval/exec, no multiprocessing
    ``Connection.recv()`` / ``Queue.get`` style object transport (STYLE 1.7)."""
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        owner = node.func.value if isinstance(node.func, ast.Attribute) else None
        owner_name = owner.id if isinstance(owner, ast.Name) else ""
        if name in ("loads", "load") and owner_name in PICKLE_LIKE:
            bad.append(_where(path, node.lineno))
        elif isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile"):
            bad.append(_where(path, node.lineno))
        elif name == "recv" and not node.args and not node.keywords:
            bad.append(_where(path, node.lineno))     # Connection.recv() unpickles
        elif name in ("Queue", "SimpleQueue", "JoinableQueue", "Manager", "Pipe") \
                and owner_name in ("multiprocess", "multiprocessing", "self._ctx", "ctx"):
            bad.append(_where(path, node.lineno))
    assert not bad


def _schema_from_source():
    """shared/rpc/schema.py of this tree (not the installed copy); it imports
    only typing and msgspec."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "_layering_schema", REPO / "shared" / "rpc" / "schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tagged(schema) -> list[type]:
    import msgspec
    return [obj for obj in vars(schema).values()
            if isinstance(obj, type) and issubclass(obj, msgspec.Struct)
            and obj.__module__ == schema.__name__ and not obj.__name__.startswith("_")
            and obj.__struct_config__.tag is not None]


def test_rpc_type_ids():
    schema = _schema_from_source()
    requests = set(schema.Request.__args__)
    tagged = _tagged(schema)
    ids = [cls.__struct_config__.tag for cls in tagged]
    assert all(type(i) is int for i in ids), ids
    assert len(ids) == len(set(ids)), "duplicate RPC type ids"
    for cls in tagged:
        want = 0 if cls in requests else 1
        assert cls.__struct_config__.tag % 2 == want, (cls.__name__, cls.__struct_config__.tag)
    assert requests <= set(tagged) and set(schema.Reply.__args__) <= set(tagged)
    assert not requests & set(schema.Reply.__args__)
    assert set(schema.TYPE_IDS.values()) <= set(ids)


def test_rpc_schema_is_closed_and_strict():
    """Every message type is frozen and forbids unknown fields; every request
    type is in the Request union (nothing decodable outside it)."""
    schema = _schema_from_source()
    for cls in _tagged(schema):
        cfg = cls.__struct_config__
        assert cfg.frozen and cfg.forbid_unknown_fields, cls.__name__
        if cfg.tag % 2 == 0:
            assert cls in schema.Request.__args__, cls.__name__
