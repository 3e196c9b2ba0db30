"""System accounts the tests create when they are missing (root only)."""

from __future__ import annotations

import pwd
import subprocess


def ensure_user(name: str) -> pwd.struct_passwd:
    """A system account with its own group, no home and no password."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                        "/nonexistent", "--user-group", name], check=True)
        return pwd.getpwnam(name)
