"""The supervisor imports, before it forks sessions, every module the
session code imports inside functions (``session.process.SESSION_MODULES``).

A module missed there is imported afresh by every session that needs it:
the substitution modules took ~85 ms a connection, the signature code
(cryptography) several ms and 4 MiB of private memory.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _function_level_imports() -> set[str]:
    """The nixwarden modules imported inside a function anywhere under
    supervisor/ (``from pkg import name`` counts as ``pkg.name`` when that
    is a module)."""
    found: set[str] = set()
    for path in (REPO / "supervisor").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found.update(a.name for a in node.names if a.name.startswith("nixwarden."))
                elif isinstance(node, ast.ImportFrom) \
                        and (node.module or "").startswith("nixwarden"):
                    for alias in node.names:
                        sub = f"{node.module}.{alias.name}"
                        is_module = (_is_package(node.module)
                                     and importlib.util.find_spec(sub) is not None)
                        found.add(sub if is_module else node.module)
    return found


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def test_the_source_scan_finds_the_lazy_imports():
    found = _function_level_imports()
    # Known function-level imports (a scan that found nothing would pass anything).
    assert "nixwarden.supervisor.store.substitute" in found
    assert "nixwarden.supervisor.build.realise" in found
    assert "nixwarden.supervisor.store.gc" in found  # from ...store import gc


def test_supervisor_has_every_session_module_loaded_before_forking():
    wanted = sorted(_function_level_imports() - {
        # Not session code: the --stdio forwarder runs instead of a daemon.
        "nixwarden.supervisor.forward",
    })
    probe = (
        "import sys\n"
        "import nixwarden.supervisor.__main__\n"  # what the supervisor imports
        "from nixwarden.supervisor.session.process import preload\n"
        "preload()\n"
        "missing = [m for m in sys.argv[1:] if m not in sys.modules]\n"
        "print('\\n'.join(missing))\n")
    out = subprocess.run([sys.executable, "-c", probe, *wanted], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [], f"add to session.process.SESSION_MODULES: {out}"
