"""What every side-by-side benchmark starts with and prints with.

``bootstrap()`` re-runs the benchmark under the nixwarden venv when it was
started with a plain python, then puts ``tests/`` on ``sys.path`` (for
``lib``).  ``row`` formats one result line with the nixwarden / nix-daemon
ratio.  Not collected by pytest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
DEFAULT_VENV_PYTHON = "/opt/nixwarden/venv/bin/python"


def bootstrap() -> None:
    try:
        import nixwarden.supervisor  # noqa: F401
    except ImportError:
        if os.path.exists(DEFAULT_VENV_PYTHON) and sys.executable != DEFAULT_VENV_PYTHON:
            os.execv(DEFAULT_VENV_PYTHON, [DEFAULT_VENV_PYTHON] + sys.argv)
        sys.exit("bench: nixwarden is not importable (run tests/run once, or use "
                 f"{DEFAULT_VENV_PYTHON})")
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)


def require_root_and_nix() -> None:
    if os.geteuid() != 0:
        sys.exit("bench: run as root (nixwarden drops its workers to the nixwarden account)")
    if shutil.which("nix-daemon") is None or shutil.which("nix-store") is None:
        sys.exit("bench: needs the real Nix (apt-get install nix-bin)")


def nix_version() -> str:
    out = subprocess.run(["nix-daemon", "--version"], capture_output=True, text=True)
    return out.stdout.strip().split()[-1] if out.returncode == 0 else "?"


def row(label: str, nw: float, nd: float, fmt: str = "{:.2f}", width: int = 44) -> str:
    """``label``, both values and nixwarden / nix-daemon."""
    ratio = nw / nd if nd else float("nan")
    return f"{label:<{width}} {fmt.format(nw):>12} {fmt.format(nd):>12} {ratio:>8.2f}"
