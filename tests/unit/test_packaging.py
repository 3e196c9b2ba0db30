"""The distribution installs and runs (DESIGN.md §5: one distribution,
console script ``nixwarden``, package-dir mapping to ``nixwarden.*``).

``pip install .`` and ``pip install -e .`` each go into a fresh virtual
environment made from a copy of the tree (so no build output lands in the
repository).  Dependencies are not downloaded: the fresh environment sees
the test environment's site-packages through a .pth file placed after its
own, and pip runs with ``--no-deps --no-build-isolation``.  The checks make
sure that the ``nixwarden`` modules come from the fresh install, not from
the test environment (``nixwarden`` is a namespace package, so a broken
install could otherwise be masked).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


CHECK = """
import sys, nixwarden.worker, nixwarden.supervisor, nixwarden.shared
import nixwarden.shared.rpc.schema, nixwarden.worker.ops, nixwarden.supervisor.store.db
import nixwarden.supervisor.session.process
for m in (nixwarden.worker, nixwarden.supervisor, nixwarden.shared,
          nixwarden.supervisor.store.db):
    print(m.__file__)
"""


def _copy_tree(dest: Path) -> Path:
    src = dest / "src"
    ignore = shutil.ignore_patterns(".git", "*.egg-info", "__pycache__",
                                    ".pytest_cache", "tests")
    shutil.copytree(REPO, src, ignore=ignore)
    return src


def _make_venv(dest: Path) -> Path:
    venv = dest / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    purelib = subprocess.run(
        [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True).stdout.strip()
    deps = _dependency_dir(dest / "deps")
    # "zz" sorts after the install's own .pth files; the path goes at the end.
    Path(purelib, "zz-test-deps.pth").write_text(f"{deps}\n")
    return venv


def _dependency_dir(deps: Path) -> Path:
    """Symlinks to the test environment's packages, nixwarden left out (else
    it would mask the fresh install), plus ``wheel`` for setuptools."""
    deps.mkdir()
    ours = Path(sysconfig.get_path("purelib"))
    for entry in ours.iterdir():
        if entry.name.startswith(("nixwarden", "__")) or entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)
    if not (deps / "wheel").exists():
        wheel = Path(_find_wheel())
        for entry in wheel.parent.iterdir():    # the package and its metadata
            if entry.name == "wheel" or entry.name.startswith("wheel-"):
                (deps / entry.name).symlink_to(entry)
    return deps


def _find_wheel() -> str:
    """Debian's python3-wheel, so that building needs no network."""
    for python in ("/usr/bin/python3", shutil.which("python3") or ""):
        if not python or not os.path.exists(python):
            continue
        proc = subprocess.run(
            [python, "-c", "import os, wheel; print(os.path.dirname(wheel.__file__))"],
            capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout.strip()
    pytest.skip("the 'wheel' package is needed to build without network access")


def _pip_install(venv: Path, *args: str) -> None:
    proc = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps",
         "--no-build-isolation", "--no-index", *args],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _check(venv: Path, expected_root: Path) -> None:
    version = subprocess.run([str(venv / "bin/nixwarden"), "--version"],
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout == "nixwarden (Nix) 2.8.0\n"
    imported = subprocess.run([str(venv / "bin/python"), "-c", CHECK],
                              capture_output=True, text=True, timeout=60, cwd="/")
    assert imported.returncode == 0, imported.stderr
    for line in imported.stdout.split():
        assert Path(line).resolve().is_relative_to(expected_root.resolve()), line
    help_text = subprocess.run([str(venv / "bin/nixwarden"), "daemon", "--help"],
                               capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and "nixwarden daemon" in help_text.stdout


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_pip_install(tmp_path, editable):
    src = _copy_tree(tmp_path)
    venv = _make_venv(tmp_path)
    if editable:
        _pip_install(venv, "-e", str(src))
        expected = src
    else:
        _pip_install(venv, str(src))
        expected = venv
    _check(venv, expected)
    # The console script runs the fresh install's interpreter.
    first = (venv / "bin/nixwarden").read_text().splitlines()[0]
    assert first == f"#!{venv / 'bin/python'}" or first.startswith(f"#!{venv}/bin/python")
