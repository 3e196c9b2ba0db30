"""Helpers for the GC / maintenance differential tests (tests/interop/test_gc*.py,
test_maintenance.py): untrusted accounts, output normalisation and the
comparison of two ``run_both`` results.
"""

from __future__ import annotations

import os
import re

_PROC = re.compile(r"/proc/\d+/")
_TEMP = re.compile(r"\{temp:\d+\}")
_TRASH = re.compile(r"\.(nixwarden-)?trash-?[0-9a-f-]*")


def norm(value):
    """Replace pids (``/proc/<pid>/``, ``{temp:<pid>}``) so two runs compare."""
    if isinstance(value, str):
        return _TEMP.sub("{temp:PID}", _PROC.sub("/proc/PID/", value))
    if isinstance(value, (list, tuple)):
        return type(value)(norm(v) for v in value)
    if isinstance(value, dict):
        return {k: norm(v) for k, v in value.items()}
    return value


def assert_same(results: dict, *keys: str, store: bool = True, normalise=norm) -> None:
    """Each step ``key`` gave the same value on both daemons; with ``store``
    the final stores (path infos, entries, real verify) agree as well."""
    want, got = results["nix-daemon"], results["nixwarden"]
    diffs = []
    for key in keys:
        if normalise(want[key]) != normalise(got[key]):
            diffs.append(f"step {key!r}:\n  nix-daemon: {want[key]!r}\n  nixwarden:  {got[key]!r}")
    if store:
        for key in ("_infos", "_store_entries", "_verify"):
            if want[key] != got[key]:
                diffs.append(f"{key}:\n  nix-daemon: {want[key]!r}\n  nixwarden:  {got[key]!r}")
    assert not diffs, "\n".join(diffs) + "\n--- nixwarden log:\n" + got["_log"][-3000:]


def symlink(target: str, link: str) -> None:
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(target, link)


def write(path: str, text: str, mode: int = 0o644) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def unordered(step):
    """A step whose stderr lines come in no fixed order (``nix store verify``
    checks paths in parallel): they are compared sorted."""
    def run(env, ctx):
        code, out, err = step(env, ctx)
        return code, out, "\n".join(sorted(err.splitlines()))
    return run


# --- filling stores quickly --------------------------------------------------------

def chains_stream(store_dir: str, n_chains: int, length: int, *, tag: str = "c",
                  payload: int = 64) -> tuple[bytes, list[list[str]]]:
    """A ``nix-store --import`` stream of ``n_chains`` reference chains of
    ``length`` input-addressed paths (element i refers to element i-1, and
    to itself for the last one); returns (stream, chains as path lists)."""
    from lib.addclient import export_record, import_stream
    from lib.narlib import input_path, nar
    records, chains = [], []
    for c in range(n_chains):
        chain: list[str] = []
        for i in range(length):
            path = input_path(store_dir, f"{tag}{c}-{i}", f"{tag}/{c}/{i}/{store_dir}")
            refs = chain[-1:]
            body = (f"{tag} {c} {i} ".encode() * (payload // 8 + 1))[:payload]
            tree = {"data": body, "ref": ("\n".join(refs) + "\n").encode()}
            if i == length - 1:
                tree["self"] = path.encode()
                refs = refs + [path]
            records.append(export_record(nar(tree), path, refs))
            chain.append(path)
        chains.append(chain)
    return import_stream(records), chains


def import_local(env, stream: bytes) -> list[str]:
    """Register a generated export stream through the real Nix (no daemon)."""
    proc = env.run("nix-store", "--import", remote="local", input=stream, timeout=600)
    return proc.stdout.decode().split()


def add_files_local(env, texts: dict[str, bytes], subdir: str = "files") -> list[str]:
    """Add many regular files in one real ``nix-store --add`` (no daemon)."""
    d = os.path.join(env.root, "home", subdir)
    os.makedirs(d, exist_ok=True)
    names = []
    for name, data in texts.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        names.append(os.path.join(d, name))
    out = []
    for i in range(0, len(names), 2000):  # keep argv reasonable
        out += env.run("nix-store", "--add", *names[i:i + 2000], remote="local",
                       timeout=600).stdout.decode().split()
    return out


# --- a daemon's processes ------------------------------------------------------------

from lib.procs import children as child_pids  # noqa: E402,F401
from lib.procs import descendants as descendant_pids  # noqa: E402,F401
from lib.procs import title as proc_title  # noqa: E402,F401
