"""Run one scenario against nix-daemon and then nixwarden on identical stores.

Store paths depend on the store directory, so both runs use the same
absolute root, one after the other: the root is wiped and prepared afresh
before each daemon.  A scenario is ``prepare(env) -> ctx`` (run with no
daemon, e.g. through the real Nix directly) and an ordered mapping of
steps ``key -> fn(env, ctx)``; each step's value (or the exception it
raised, as a tuple) is recorded.  After the steps the whole store is
summarised (``nix path-info --json --all`` without registration times,
the metadata of every file) and, with the daemon stopped, checked with
the real ``nix-store --verify --check-contents``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat

from lib.nixenv import NixEnv, start_nix_daemon, start_nixwarden

DAEMONS = {"nix-daemon": start_nix_daemon, "nixwarden": start_nixwarden}


def cli(*args, user=None, input=None, env=None):
    """A step running a Nix command; ``{name}`` in args is filled from ctx."""
    def step(nixenv: NixEnv, ctx):
        argv = [a.format(**ctx) for a in args]
        proc = nixenv.run(*argv, check=False, user=user, input=input,
                          env={k: v.format(**ctx) for k, v in (env or {}).items()})
        return proc.returncode, proc.stdout.decode(errors="replace"), \
            proc.stderr.decode(errors="replace")
    return step


def path_infos(nixenv: NixEnv) -> dict:
    proc = nixenv.run("nix", "path-info", "--json", "--all", remote="local")
    out = {}
    for info in json.loads(proc.stdout):
        info.pop("registrationTime", None)
        info.setdefault("signatures", [])
        out[info["path"]] = info
    return out


def _meta(path: str):
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return ("link", None, st.st_mtime, os.readlink(path))
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
    return (kind, stat.S_IMODE(st.st_mode), st.st_mtime, None)


def store_metadata(store_dir: str) -> dict:
    """{path relative to the store: (kind, mode, mtime, link target)} of every
    store object and everything inside it (lock files excluded)."""
    out = {}
    for top in sorted(os.listdir(store_dir)):
        if top.startswith(".") or top.endswith(".lock"):
            continue
        full = os.path.join(store_dir, top)
        out[top] = _meta(full)
        if out[top][0] != "dir":
            continue
        for root, dirs, files in os.walk(full):
            for n in dirs + files:
                p = os.path.join(root, n)
                out[os.path.relpath(p, store_dir)] = _meta(p)
    return out


def run_both(root: str, prepare, steps: dict, *, extra_conf: str = "",
             daemon_args=(), daemons=("nix-daemon", "nixwarden")) -> dict:
    results = {}
    for which in daemons:
        shutil.rmtree(root, ignore_errors=True)
        env = NixEnv(root, extra_conf)
        ctx = dict(prepare(env) or {}, store=env.store_dir, root=root,
                   socket=env.socket_path)
        daemon = DAEMONS[which](env, *daemon_args)
        out = {}
        try:
            for key, fn in steps.items():
                try:
                    out[key] = fn(env, ctx)
                except Exception as exc:  # recorded, compared like any value
                    out[key] = ("exception", type(exc).__name__, str(exc))
        finally:
            daemon.stop()
        out["_log"] = daemon.output()
        out["_infos"] = path_infos(env)
        out["_metadata"] = store_metadata(env.store_dir)
        out["_store_entries"] = sorted(os.listdir(env.store_dir))
        verify = env.run("nix-store", "--verify", "--check-contents", remote="local",
                         check=False)
        out["_verify"] = (verify.returncode, verify.stderr.decode(errors="replace"))
        out["_ctx"] = ctx
        results[which] = out
    shutil.rmtree(root, ignore_errors=True)
    return results


def connect_as(uid: int, gid: int, path: str) -> socket.socket:
    """A socket connected to ``path`` by a child running as uid/gid, so the
    daemon sees those peer credentials; the connected fd comes back here."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            parent.close()
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            socket.send_fds(child, [b"x"], [s.fileno()])
            code = 0
        finally:
            os._exit(code)
    child.close()
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(parent, 1, 1)
    finally:
        os.waitpid(pid, 0)
        parent.close()
    if not fds:
        raise OSError("child could not connect")
    return socket.socket(fileno=fds[0])
