"""Helpers for the build tests: Nix expressions without nixpkgs, build users.

Derivations are written with the bare ``derivation`` primitive and
``/bin/sh`` as builder (dash on the host when unsandboxed, the static
busybox of ``sandbox-paths`` inside the sandbox), so no nixpkgs is needed.
Unsandboxed builders get ``PATH=/path-not-set`` like with Nix, so they
name host tools by absolute path (``/bin/cat``, ``/bin/sleep``).
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess

BUILD_GROUP = "nixbld"

#: ``mk name script attrs``: a derivation running ``/bin/sh -c script``.
PRELUDE = """\
let
  mk = name: script: attrs: derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // attrs);
in
"""


def write_expr(path: str, body: str) -> str:
    """Write ``PRELUDE`` + ``body`` (a Nix attribute set using ``mk``) to ``path``."""
    with open(path, "w") as f:
        f.write(PRELUDE + body)
    return path


def ensure_build_users(count: int = 4) -> list[int]:
    """Group ``nixbld`` with members ``nixbld1..count`` (created if missing,
    root only); returns the uids of all members of the group."""
    try:
        grp.getgrnam(BUILD_GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", BUILD_GROUP], check=True)
    for i in range(1, count + 1):
        name = f"{BUILD_GROUP}{i}"
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                            "/var/empty", "--shell", "/usr/sbin/nologin", "-g", BUILD_GROUP,
                            "-G", BUILD_GROUP, name], check=True)
        if name not in grp.getgrnam(BUILD_GROUP).gr_mem:
            subprocess.run(["gpasswd", "-a", name, BUILD_GROUP], check=True,
                           stdout=subprocess.DEVNULL)
    return sorted(pwd.getpwnam(n).pw_uid for n in grp.getgrnam(BUILD_GROUP).gr_mem)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc/*/stat parent links)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def proc_uid(pid: int) -> int | None:
    """The real uid of ``pid`` (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
