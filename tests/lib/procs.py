"""Finding a daemon's processes through /proc (by parent pid and title)."""

from __future__ import annotations

import os


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    out = []
    for child in children(pid):
        out += [child] + descendants(child)
    return out


def title(pid: int) -> str:
    """A process's title (argv[0] as setproctitle sets it), or ''."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""
