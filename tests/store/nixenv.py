"""Helpers for running the real CppNix tools directly on a scratch store.

Used by the interop tests in this directory (not a test module itself).
The store lives in a temporary directory with ``NIX_STORE_DIR``-style
overrides, so the logical store dir is ``<tmp>/store``; ``NIX_REMOTE=local``
makes ``nix-store`` open the SQLite database itself, concurrently with ours.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from nixwarden.supervisor.store.layout import StoreLayout

NIX32_CHARS = "0123456789abcdfghijklmnpqrsvwxyz"

needs_nix = pytest.mark.skipif(shutil.which("nix-store") is None,
                               reason="real nix-store not installed")


@dataclass
class NixEnv:
    root: str
    layout: StoreLayout
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, input: bytes | None = None
            ) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env, input=input,
                              capture_output=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} failed ({proc.returncode}):\n"
                                 f"{proc.stderr.decode(errors='replace')}")
        return proc

    def out(self, *args: str) -> str:
        return self.run(*args).stdout.decode().strip()

    def lines(self, *args: str) -> list[str]:
        return sorted(line for line in self.out(*args).splitlines() if line)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(list(args), env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, **kw)

    def store_path(self, name: str) -> str:
        """A fresh, syntactically valid store path (random hash part)."""
        h = "".join(random.choice(NIX32_CHARS) for _ in range(32))
        return f"{self.layout.store_dir}/{h}-{name}"

    def nar_hash_hex(self, path: str) -> str:
        """sha256 of the NAR of ``path`` as dumped by real Nix, in base16."""
        return hashlib.sha256(self.run("nix-store", "--dump", path).stdout).hexdigest()

    def nar_size(self, path: str) -> int:
        return len(self.run("nix-store", "--dump", path).stdout)


def make_nix_env(tmp: str) -> NixEnv:
    root = os.path.realpath(tmp)
    layout = StoreLayout(root + "/store", root + "/store", root + "/var/nix",
                         root + "/var/log/nix")
    os.makedirs(root + "/etc", exist_ok=True)
    os.makedirs(root + "/home", exist_ok=True)
    with open(root + "/etc/nix.conf", "w") as f:
        f.write("build-users-group =\nsandbox = false\nsubstituters =\n")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": root + "/home",
        "NIX_STORE_DIR": layout.store_dir,
        "NIX_STATE_DIR": layout.state_dir,
        "NIX_LOG_DIR": layout.log_dir,
        "NIX_CONF_DIR": root + "/etc",
        "NIX_USER_CONF_FILES": "/dev/null",
        "NIX_REMOTE": "local",
    }
    return NixEnv(root, layout, env)


def sri_to_hex(sri: str) -> str:
    """``sha256-<base64>`` (as printed by ``nix path-info --json``) to base16."""
    algo, b64 = sri.split("-", 1)
    assert algo == "sha256"
    return base64.b64decode(b64).hex()


def write_tree(real_path: str, files: dict[str, str]) -> None:
    """Create a store object: one file (key "") or a directory of files."""
    if list(files) == [""]:
        with open(real_path, "w") as f:
            f.write(files[""])
        return
    os.mkdir(real_path)
    for name, content in files.items():
        with open(os.path.join(real_path, name), "w") as f:
            f.write(content)
