"""Binary caches made by the real Nix, for the substitution interop tests.

``CacheWorld(root, side)`` builds, with the real Nix directly on a store at
``root`` (the absolute root the differential run will use, so store paths
match), a small closure (``top`` -> ``mid`` -> ``dep``, ``top`` with a
self-reference and a larger file) whose builders leave a marker in
``<side>/ran`` (so a test can tell that nothing was built), plus a
content-addressed ``nix-store --add`` file.  It then copies them with
``nix copy --to file://...`` into caches under ``<side>/caches``: one per
compression (signed with a key from ``nix-store --generate-binary-cache-key``
via ``nix store sign``), ``unsigned``, ``otherkey`` (signed at copy time by
``secret-key=`` with another key), ``badsig`` (signatures replaced by
wrong ones of the right length), ``shortsig`` (signatures of a malformed
length),
``second`` (an xz copy), and ``empty`` (only ``nix-cache-info``).  The
source store is removed afterwards; the caches stay until ``cleanup``.

``serve(side)`` starts ``tests/store/cacheserver.py`` (loopback HTTP, with
the ``fault-<mode>`` prefixes) as a child process; ``stop`` ends it by pid.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess

import pytest

from lib.nixenv import NixEnv

EXPR = r"""
let
  mk = attrs: builtins.derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; } // attrs);
  mark = name: "echo ran >> @SIDE@/ran/${name}";
  dep = mk { name = "dep"; args = [ "-c" "${mark "dep"}; echo dependency > $out" ]; };
  mid = mk { name = "mid"; args = [ "-c" ''
    ${mark "mid"}
    /bin/mkdir -p $out/bin; echo ${dep} > $out/dep-ref
    printf '#!/bin/sh\necho mid\n' > $out/bin/mid; /bin/chmod +x $out/bin/mid
    /bin/ln -s bin/mid $out/link
  '' ]; };
  top = mk { name = "top"; args = [ "-c" ''
    ${mark "top"}
    /bin/mkdir $out; echo ${mid} > $out/mid-ref; echo $out > $out/self
    i=0; while [ $i -lt 3000 ]; do echo "line $i of some compressible text $i $i"; i=$((i+1)); done > $out/big
  '' ]; };
in { inherit dep mid top; }
"""
COMPRESSIONS = ("xz", "bzip2", "zstd", "none")
NIX = ("nix", "--extra-experimental-features", "nix-command")


def _load_cacheserver():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "nw_cacheserver", os.path.join(here, "store", "cacheserver.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cacheserver = _load_cacheserver()


class CacheWorld:
    def __init__(self, root: str, side: str, *, extra_paths: int = 0):
        self.root, self.side = root, side
        for d in (root, side):
            shutil.rmtree(d, ignore_errors=True)
        os.makedirs(os.path.join(side, "ran"))
        os.chmod(side, 0o755)
        self.expr = os.path.join(side, "closure.nix")
        with open(self.expr, "w") as f:
            f.write(EXPR.replace("@SIDE@", side))
        env = NixEnv(root)
        self.store = env.store_dir
        self.src = env

        def local(*args) -> str:
            return env.run(*args, remote="local").stdout.decode().strip()

        self.drv = {a: local("nix-instantiate", self.expr, "-A", a)
                    for a in ("dep", "mid", "top")}
        self.out = {a: local("nix-store", "-r", self.drv[a]) for a in ("dep", "mid", "top")}
        self.top, self.mid, self.dep = self.out["top"], self.out["mid"], self.out["dep"]
        self.closure = sorted([self.top, self.mid, self.dep])
        with open(os.path.join(side, "ca.txt"), "w") as f:
            f.write("content-addressed text\n")
        self.ca = local("nix-store", "--add", os.path.join(side, "ca.txt"))
        self.infos = {i["path"]: i for i in json.loads(
            local(*NIX, "path-info", "--json", *self.closure, self.ca))}
        self.caches = os.path.join(side, "caches")
        self.sk, self.pk = self._key("nwtest-cache-1")
        self.sk2, self.pk2 = self._key("nwtest-other-1")
        self.copy("unsigned", "xz")
        self.copy("otherkey", "xz", f"&secret-key={self.sk2}")
        local(*NIX, "store", "sign", "--key-file", self.sk, "-r", self.top)
        for c in COMPRESSIONS:
            self.copy(c, c)
        self.copy("second", "xz")
        self.copy("badsig", "xz")
        self.copy("shortsig", "xz")
        for name in os.listdir(self.cache("badsig")):
            if name.endswith(".narinfo"):
                # well-formed (64 bytes) but not a signature of this path
                sub(self.cache("badsig", name), r"Sig: nwtest-cache-1:....",
                    "Sig: nwtest-cache-1:AAAA")
                # malformed: 67 bytes
                edit(self.cache("shortsig", name), "Sig: nwtest-cache-1:",
                     "Sig: nwtest-cache-1:AAAA")
        os.makedirs(self.cache("empty"))
        shutil.copy(self.cache("xz", "nix-cache-info"), self.cache("empty", "nix-cache-info"))
        self.signed_infos = {i["path"]: i for i in json.loads(
            local(*NIX, "path-info", "--json", *self.closure, self.ca))}
        self.clear_marks()
        subprocess.run(["chmod", "-R", "a+rX", side], check=True)
        shutil.rmtree(root, ignore_errors=True)

    def _key(self, name: str) -> tuple[str, str]:
        sk, pk = (os.path.join(self.side, f"{name}.{k}") for k in ("sk", "pk"))
        self.src.run("nix-store", "--generate-binary-cache-key", name, sk, pk, remote="local")
        with open(pk) as f:
            return sk, f.read().strip()

    def copy(self, name: str, compression: str, extra: str = "", paths=None) -> None:
        url = f"file://{self.cache(name)}?compression={compression}{extra}"
        self.src.run(*NIX, "copy", "--to", url, *(paths or [self.top, self.ca]),
                     remote="local")

    def cache(self, *parts: str) -> str:
        return os.path.join(self.caches, *parts)

    def file_url(self, name: str) -> str:
        return f"file://{self.cache(name)}"

    def narinfo(self, cache: str, path: str) -> str:
        return self.cache(cache, os.path.basename(path)[:32] + ".narinfo")

    def nar_files(self, cache: str, path: str) -> list[str]:
        """The NAR file(s) a cache's narinfo for ``path`` names."""
        with open(self.narinfo(cache, path)) as f:
            urls = [line.split(": ", 1)[1].strip() for line in f if line.startswith("URL: ")]
        return [self.cache(cache, u) for u in urls]

    def marks(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.side, "ran")))

    def clear_marks(self) -> None:
        for n in os.listdir(os.path.join(self.side, "ran")):
            os.unlink(os.path.join(self.side, "ran", n))

    def derived_cache(self, name: str, src: str = "xz", *, nar_prefix: str | None = None,
                      paths=None) -> str:
        """A copy of cache ``src`` (only the narinfo/NARs of ``paths`` if given);
        ``nar_prefix`` rewrites each narinfo's ``URL: nar/`` (an absolute URL
        on the fault server, say).  Returns its directory."""
        target = self.cache(name)
        shutil.rmtree(target, ignore_errors=True)
        if paths is None:
            shutil.copytree(self.cache(src), target)
        else:
            os.makedirs(os.path.join(target, "nar"))
            shutil.copy(self.cache(src, "nix-cache-info"), target)
            for p in paths:
                shutil.copy(self.narinfo(src, p), target)
                for nar in self.nar_files(src, p):
                    shutil.copy(nar, os.path.join(target, "nar"))
        if nar_prefix is not None:
            for f in os.listdir(target):
                if f.endswith(".narinfo"):
                    edit(os.path.join(target, f), "URL: nar/", f"URL: {nar_prefix}")
        subprocess.run(["chmod", "-R", "a+rX", target], check=True)
        return target

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.side, ignore_errors=True)


def edit(path: str, old: str, new: str) -> None:
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def sub(path: str, pattern: str, new: str) -> None:
    import re
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(re.sub(pattern, new, text))


def serve(directory: str):
    """Start the loopback cache server on ``directory``: (process, base URL)."""
    return cacheserver.start(directory)


def stop(proc) -> None:
    cacheserver.stop(proc)


def module_fixtures(root: str):
    """The module-scoped fixtures ``world`` (a ``CacheWorld`` under ``root``,
    its side directory beside it) and ``server`` (its caches over loopback
    HTTP); a test module assigns them to those names."""
    @pytest.fixture(scope="module")
    def world():
        w = CacheWorld(root, root + "-side")
        yield w
        w.cleanup()

    @pytest.fixture(scope="module")
    def server(world):
        proc, url = serve(world.caches)
        yield url
        stop(proc)

    return world, server
