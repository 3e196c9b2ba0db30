"""Twin stores for differential tests of store maintenance against real Nix.

Not a test module.  A scratch store is filled by real Nix, copied with
``cp -a`` (hard links kept), then real Nix works on the original; the
original is moved aside and the copy put in its place, so that nixwarden
works on a byte-identical store at the same path (store paths embed the
store directory, so the twins must share it).
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def snapshot(root: str) -> str:
    """Copy the whole scratch root next to it; returns the copy's path."""
    copy = root + ".twin"
    subprocess.run(["cp", "-a", root, copy], check=True)
    return copy


def swap_in(root: str, copy: str) -> str:
    """Move ``root`` aside (returned) and put ``copy`` in its place."""
    aside = root + ".nix"
    os.rename(root, aside)
    os.rename(copy, root)
    return aside


def plain(text: str) -> str:
    """A log line as a non-tty client prints it (colours stripped)."""
    return _ANSI.sub("", text)


class Lines:
    """A ``log(level, text)`` that keeps the lines a default client shows."""

    def __init__(self, max_level: int = 3):
        self.max_level = max_level
        self.all: list[tuple[int, str]] = []

    def __call__(self, level: int, text: str) -> None:
        self.all.append((level, text))

    @property
    def shown(self) -> list[str]:
        out: list[str] = []
        for level, text in self.all:
            if level <= self.max_level:
                out.extend(plain(text).splitlines())
        return out


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.decode().splitlines() if line]


def shape(real_store_dir: str) -> dict[str, tuple]:
    """Every object under the store: type, mode, mtime, link count, .links name.

    Keyed by path relative to the store (``.links/<h>`` entries included),
    so two twins compare equal iff content, metadata and the hard-link
    structure agree.
    """
    links_dir = os.path.join(real_store_dir, ".links")
    by_inode = {os.lstat(os.path.join(links_dir, n)).st_ino: n for n in os.listdir(links_dir)}
    out: dict[str, tuple] = {}
    for root, dirs, files in os.walk(real_store_dir):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, real_store_dir)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                body = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    body = f.read()
            else:
                body = None
            mtime = None if rel == ".links" else int(st.st_mtime)
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), mtime,
                        st.st_nlink if not stat.S_ISDIR(st.st_mode) else None,
                        by_inode.get(st.st_ino) if not stat.S_ISDIR(st.st_mode) else None,
                        body)
    return out


def db_rows(db_path: str) -> list[tuple]:
    """ValidPaths (path, hash, narSize) and Refs as paths, sorted."""
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute("select path, hash, narSize from ValidPaths order by path").fetchall()
        refs = conn.execute(
            "select a.path, b.path from Refs r join ValidPaths a on a.id = r.referrer"
            " join ValidPaths b on b.id = r.reference order by 1, 2").fetchall()
    finally:
        conn.close()
    return rows + [("ref",) + r for r in refs]


def sql(db_path: str, statement: str, *args) -> None:
    conn = sqlite3.connect(db_path)
    try:
        conn.execute(statement, args)
        conn.commit()
    finally:
        conn.close()


def corrupt(real_file: str, data: bytes) -> None:
    """Overwrite a store file in place (keeps its inode, mode and mtime)."""
    st = os.lstat(real_file)
    os.chmod(real_file, 0o644)
    with open(real_file, "wb") as f:
        f.write(data)
    os.chmod(real_file, stat.S_IMODE(st.st_mode))
    os.utime(real_file, (st.st_atime, st.st_mtime))
