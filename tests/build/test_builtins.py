"""Builtin builders (spec §8.10), checked against what real Nix 2.8 builds.

The ``*_like_nix`` tests build the same derivation with ``nix-build`` on a
temporary local store (sandbox off) and compare the resulting trees with
ours; the others exercise fetchurl over ``file://`` and a loopback HTTP
server the test starts and stops by pid, and unpack-channel.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, os.path.dirname(__file__))

from lib.nixenv import NixEnv, new_root  # noqa: E402

from nixwarden.shared import nar  # noqa: E402
from nixwarden.supervisor.build.builtins import run_builtin  # noqa: E402

needs_nix = pytest.mark.skipif(shutil.which("nix-build") is None, reason="needs real Nix")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def nixenv():
    env = NixEnv(new_root())
    yield env
    subprocess.run(["chmod", "-R", "u+w", env.root], check=False)
    shutil.rmtree(env.root, ignore_errors=True)


def run(builder, env, out_host, out="/nix/store/0000-out", **kw):
    log = io.BytesIO()
    env = {"out": out, **env}
    code = run_builtin(builder, env, {out: out_host}, log=log, **kw)
    return code, log.getvalue().decode()


def tree(path: str) -> dict[str, tuple]:
    """Relative path -> (kind, symlink target or contents, executable)."""
    result = {}
    for top, dirs, files, _ in os.fwalk(path):
        for name in dirs + files:
            full = os.path.join(top, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                result[rel] = ("link", os.readlink(full))
            elif os.path.isdir(full):
                result[rel] = ("dir",)
            else:
                with open(full, "rb") as f:
                    result[rel] = ("file", f.read(), os.stat(full).st_mode & 0o100 != 0)
    return result


# -- buildenv -----------------------------------------------------------------


def _make_pkg(tmp, name, files: dict[str, str]) -> str:
    root = os.path.join(tmp, name)
    for rel, content in files.items():
        full = os.path.join(root, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if content.startswith("->"):
            os.symlink(content[2:], full)
        else:
            with open(full, "w") as f:
                f.write(content)
    return root


def _add(nixenv, path) -> str:
    return nixenv.run("nix-store", "--add", path, remote="local").stdout.decode().strip()


@pytest.fixture
def packages(nixenv, tmp_path):
    tmp = str(tmp_path)
    c = _add(nixenv, _make_pkg(tmp, "pkgc", {"bin/c": "c", "share/doc/c": "c"}))
    a = _add(nixenv, _make_pkg(tmp, "pkga", {
        "bin/a": "a", "bin/common": "from a", "share/doc/a": "a", "share/man/a.1": "a",
        "bin/dangling": "->/nonexistent/x", ".hidden": "h", "nix-support/setup-hook": "x",
        "manifest.nix": "m", "log": "l", "lib/perl/perllocal.pod": "p"}))
    b = _add(nixenv, _make_pkg(tmp, "pkgb", {
        "bin/b": "b", "bin/common": "from b", "share/doc/b": "b",
        "nix-support/propagated-user-env-packages": c + "\n"}))
    x = _add(nixenv, _make_pkg(tmp, "pkgx", {"bin/x": "inactive"}))
    f = _add(nixenv, _make_pkg(tmp, "pkgf", {"file-not-dir": "f"}) + "/file-not-dir")
    manifest = _add(nixenv, _make_pkg(tmp, "m", {"manifest.nix": "[ ]"}) + "/manifest.nix")
    return {"a": a, "b": b, "c": c, "x": x, "f": f, "manifest": manifest}


def _buildenv_env(p, prio_b=6):
    derivations = (f"true 5 1 {p['a']} true {prio_b} 1 {p['b']} false 1 1 {p['x']} "
                   f"true 7 1 {p['f']}")
    return {"manifest": p["manifest"], "derivations": derivations}


def _nix_build_buildenv(nixenv, env) -> subprocess.CompletedProcess:
    attrs = " ".join(f'{k} = "{v}";' for k, v in env.items())
    expr = ('derivation { name = "user-environment"; system = "builtin"; '
            f'builder = "builtin:buildenv"; {attrs} }}')
    return nixenv.run("nix-build", "--no-out-link", "-E", expr, remote="local", check=False)


@needs_nix
def test_buildenv_like_nix(nixenv, packages, tmp_path):
    env = _buildenv_env(packages)
    proc = _nix_build_buildenv(nixenv, env)
    assert proc.returncode == 0, proc.stderr.decode()
    theirs = proc.stdout.decode().strip()
    ours = str(tmp_path / "ours")
    inputs = {p: p for p in packages.values()}
    code, log = run("builtin:buildenv", {**env, "out": nixenv.store_dir + "/0000-ours"},
                    ours, out=nixenv.store_dir + "/0000-ours",
                    store_dir=nixenv.store_dir, inputs=inputs)
    assert code == 0, log
    assert tree(ours) == tree(theirs)
    t = tree(ours)
    assert t["bin/common"] == ("link", packages["a"] + "/bin/common")   # lower number wins
    assert t["bin/c"] == ("link", packages["c"] + "/bin/c")             # propagated
    assert t["share"] == ("dir",) and t["share/doc"] == ("dir",)        # merged
    assert t["share/man"] == ("link", packages["a"] + "/share/man")
    assert "bin/x" not in t and "bin/dangling" not in t and ".hidden" not in t
    assert t["manifest.nix"] == ("link", packages["manifest"])
    assert "skipping dangling symlink" in log and "not including" in log
    assert log.startswith("@nix {")


@needs_nix
def test_buildenv_collision_like_nix(nixenv, packages, tmp_path):
    env = _buildenv_env(packages, prio_b=5)
    proc = _nix_build_buildenv(nixenv, env)
    assert proc.returncode != 0
    out = nixenv.store_dir + "/0000-out"
    code, log = run("builtin:buildenv", env, str(tmp_path / "ours"), out=out,
                    store_dir=nixenv.store_dir)
    assert code == 1
    message = _ANSI.sub("", log).strip()
    message = message.splitlines()[-1]  # after any @nix warning lines
    assert message.startswith("error: packages '") and "have the same priority 5" in message
    assert message[len("error: "):] in _ANSI.sub("", proc.stderr.decode())


def test_buildenv_restricted_view_hides_other_paths(tmp_path):
    store = str(tmp_path / "store")
    os.makedirs(store + "/aaaa-pkg/bin")
    with open(store + "/aaaa-pkg/bin/p", "w") as f:
        f.write("p")
    env = {"out": store + "/0000-out", "manifest": "/m",
           "derivations": f"true 5 1 {store}/aaaa-pkg true 5 1 /etc"}
    code, log = run("builtin:buildenv", env, str(tmp_path / "out"), out=store + "/0000-out",
                    store_dir=store, inputs={store + "/aaaa-pkg": store + "/aaaa-pkg"})
    assert code == 1
    assert "opening directory '/etc': No such file or directory" in log
    code, log = run("builtin:buildenv", {"out": "/x"}, str(tmp_path / "o2"), out="/x")
    assert (code, _ANSI.sub("", log)) == (1, "error: attribute 'derivations' missing\n")


def test_unknown_builtin():
    code, log = run("builtin:frobnicate", {}, "/nonexistent")
    assert code == 1 and "unsupported builtin builder 'frobnicate'" in log


# -- fetchurl -----------------------------------------------------------------


@pytest.fixture
def payload(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "tool").write_text("#!/bin/sh\n")
    (src / "sub" / "tool").chmod(0o755)
    (src / "readme").write_text("hello\n")
    os.symlink("readme", src / "link")
    files = tmp_path / "files"
    files.mkdir()
    (files / "plain.txt").write_bytes(b"plain contents\n")
    nar_bytes = b"".join(nar.dump(str(src)))
    (files / "tree.nar.xz").write_bytes(lzma.compress(nar_bytes, format=lzma.FORMAT_XZ))
    (files / "tree.nar").write_bytes(nar_bytes)
    os.chmod(tmp_path, 0o755)
    return {"src": str(src), "files": str(files), "nar": nar_bytes}


def _fetch_env(url, **kw):
    return {"url": url, "outputHashMode": "flat", "outputHashAlgo": "sha256",
            "outputHash": "", **kw}


def test_fetchurl_file_url(payload, tmp_path):
    url = f"file://{payload['files']}/plain.txt"
    out = str(tmp_path / "out")
    code, log = run("builtin:fetchurl", _fetch_env(url, executable="1"), out)
    assert code == 0, log
    assert open(out, "rb").read() == b"plain contents\n"
    assert os.stat(out).st_mode & 0o777 == 0o755
    # sandboxed: only the input closure is visible
    code, log = run("builtin:fetchurl", _fetch_env(url), str(tmp_path / "out2"), inputs={})
    assert code == 1 and f"unable to download '{url}'" in log


def test_fetchurl_file_unpack_xz(payload, tmp_path):
    out = str(tmp_path / "out")
    env = _fetch_env(f"file://{payload['files']}/tree.nar.xz", unpack="1",
                     outputHashMode="recursive")
    code, log = run("builtin:fetchurl", env, out)
    assert code == 0, log
    assert tree(out) == tree(payload["src"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_server(payload):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                             "--directory", payload["files"], str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "no http server"
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    os.kill(proc.pid, 15)
    proc.wait()


def test_fetchurl_http(http_server, payload, tmp_path):
    out = str(tmp_path / "plain")
    code, log = run("builtin:fetchurl", _fetch_env(http_server + "/plain.txt"), out)
    assert code == 0, log
    assert open(out, "rb").read() == b"plain contents\n"
    assert os.stat(out).st_mode & 0o111 == 0
    out = str(tmp_path / "tree")
    env = _fetch_env(http_server + "/tree.nar.xz", unpack="1", executable="",
                     outputHashMode="recursive")
    code, log = run("builtin:fetchurl", env, out)
    assert code == 0, log
    assert tree(out) == tree(payload["src"])
    out = str(tmp_path / "tree2")
    env = _fetch_env(http_server + "/tree.nar", unpack="1", outputHashMode="recursive")
    assert run("builtin:fetchurl", env, out)[0] == 0 and tree(out) == tree(payload["src"])
    code, log = run("builtin:fetchurl", _fetch_env(http_server + "/missing"),
                    str(tmp_path / "missing"))
    assert code == 1 and "HTTP error 404" in log


def test_fetchurl_hashed_mirror(http_server, payload, tmp_path):
    digest = hashlib.sha256(b"mirrored\n").hexdigest()
    os.makedirs(f"{payload['files']}/sha256")
    with open(f"{payload['files']}/sha256/{digest}", "wb") as f:
        f.write(b"mirrored\n")
    env = _fetch_env(http_server + "/nowhere", outputHash=digest)
    out = str(tmp_path / "out")
    code, log = run("builtin:fetchurl", env, out, hashed_mirrors=[http_server + "/nothing",
                                                                  http_server + "/"])
    assert code == 0, log
    assert open(out, "rb").read() == b"mirrored\n"


@needs_nix
def test_fetchurl_like_nix(nixenv, payload, tmp_path):
    url = f"file://{payload['files']}/tree.nar.xz"
    nar_hash = hashlib.sha256(payload["nar"]).hexdigest()
    expr = (f'import <nix/fetchurl.nix> {{ url = "{url}"; sha256 = "{nar_hash}"; '
            'unpack = true; }')
    proc = nixenv.run("nix-build", "--no-out-link", "-E", expr, remote="local", check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    theirs = proc.stdout.decode().strip()
    out = str(tmp_path / "ours")
    env = _fetch_env(url, unpack="1", executable="", outputHashMode="recursive",
                     outputHash=nar_hash)
    assert run("builtin:fetchurl", env, out)[0] == 0
    assert tree(out) == tree(theirs)
    url = f"file://{payload['files']}/plain.txt"
    digest = hashlib.sha256(nar.nar_of_bytes(b"plain contents\n", executable=True)).hexdigest()
    expr = f'import <nix/fetchurl.nix> {{ url = "{url}"; sha256 = "{digest}"; executable = true; }}'
    proc = nixenv.run("nix-build", "--no-out-link", "-E", expr, remote="local", check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    out = str(tmp_path / "ours2")
    assert run("builtin:fetchurl", _fetch_env(url, executable="1"), out)[0] == 0
    theirs = proc.stdout.decode().strip()
    assert open(out, "rb").read() == open(theirs, "rb").read()
    assert os.stat(out).st_mode & 0o111 and os.stat(theirs).st_mode & 0o111


# -- unpack-channel -----------------------------------------------------------


def _tarball(path, members: dict[str, bytes | None], mode="w:xz", links=()):
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        for name, target, kind in links:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tar.addfile(info)


def test_unpack_channel(tmp_path):
    src = str(tmp_path / "nixexprs.tar.xz")
    _tarball(src, {"nixexprs-1.0": None, "nixexprs-1.0/default.nix": b"{}\n"},
             links=[("nixexprs-1.0/link", "default.nix", tarfile.SYMTYPE),
                    ("nixexprs-1.0/hard", "nixexprs-1.0/default.nix", tarfile.LNKTYPE)])
    out = str(tmp_path / "out")
    env = {"out": "/nix/store/0000-out", "src": src, "channelName": "nixpkgs"}
    code, log = run("builtin:unpack-channel", env, out)
    assert code == 0, log
    assert os.listdir(out) == ["nixpkgs"]
    assert open(out + "/nixpkgs/default.nix").read() == "{}\n"
    assert os.readlink(out + "/nixpkgs/link") == "default.nix"
    assert os.stat(out + "/nixpkgs/hard").st_nlink == 2


def test_unpack_channel_errors(tmp_path):
    two = str(tmp_path / "two.tar.gz")
    _tarball(two, {"a": b"1", "b": b"2"}, mode="w:gz")
    env = {"out": "/nix/store/0000-out", "src": two, "channelName": "c"}
    code, log = run("builtin:unpack-channel", env, str(tmp_path / "o1"))
    assert code == 1 and f"channel tarball '{two}' contains more than one file" in log
    evil = str(tmp_path / "evil.tar")
    _tarball(evil, {}, mode="w", links=[("d", "/etc", tarfile.SYMTYPE)])
    with tarfile.open(evil, "a") as tar:
        info = tarfile.TarInfo("d/passwd-nw")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    code, log = run("builtin:unpack-channel", {**env, "src": evil}, str(tmp_path / "o2"))
    assert code == 1 and not os.path.exists("/etc/passwd-nw")
    dotdot = str(tmp_path / "dotdot.tar")
    _tarball(dotdot, {"../escape": b"x"}, mode="w")
    code, log = run("builtin:unpack-channel", {**env, "src": dotdot}, str(tmp_path / "o3"))
    assert code == 1 and "leaves the output" in log
    assert not os.path.exists(tmp_path / "escape")
    code, log = run("builtin:unpack-channel", {**env, "channelName": "../x"},
                    str(tmp_path / "o4"))
    assert code == 1 and "invalid channel name" in log


@needs_nix
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (build users)")
def test_buildenv_as_build_user(nixenv, packages):
    """The real situation: a forked child dropped to a build user runs the builtin."""
    import tempfile

    from test_buildusers import GROUP, _ensure_build_users
    from nixwarden.supervisor.build.buildusers import acquire_build_user, become_build_user
    _ensure_build_users()
    top = tempfile.mkdtemp(prefix="nw-builtin-")
    os.chmod(top, 0o755)
    lock = acquire_build_user(GROUP, top + "/userpool", exclude_uid=0)
    os.chown(top, lock.user.uid, lock.user.gid)
    out = nixenv.store_dir + "/0000-env"
    env = {**_buildenv_env(packages), "out": out}
    inputs = {p: p for p in packages.values()}
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                become_build_user(lock.user)
                code = run_builtin("builtin:buildenv", env, {out: top + "/env"},
                                   store_dir=nixenv.store_dir, inputs=inputs,
                                   log=io.BytesIO())
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.lstat(top + "/env/bin/a").st_uid == lock.user.uid
        assert os.readlink(top + "/env/bin/c") == packages["c"] + "/bin/c"
    finally:
        lock.release()
        shutil.rmtree(top)
