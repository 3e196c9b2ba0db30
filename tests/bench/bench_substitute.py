"""Benchmark: substitution from a loopback HTTP cache, nixwarden against nix-daemon.

    sudo python tests/bench/bench_substitute.py [--leaves 199] [--kib 256] [--rounds 1]

The real Nix builds, directly on a scratch store, a closure of ``--leaves``
independent paths plus one ``top`` path referencing them all (each leaf
holds ``--kib`` KiB: half random bytes, half text; ~50 MiB in all by
default), signs it and copies it with ``nix copy --to file://...`` into an
xz and a zstd binary cache, served over HTTP on 127.0.0.1 by
``tests/store/cacheserver.py``.  Then, for each compression and each
daemon (alternating), on a fresh empty store at the same absolute root
with ``substituters`` pointing at the cache:

* ``nix-store -r --dry-run top``: QueryMissing, i.e. one narinfo look-up per
  path (the narinfo disk cache is fresh too);
* ``nix-store -r top``: fetching, decompressing, hashing and registering
  the whole closure (a new empty store again).

It prints wall times and the ratios nixwarden / nix-daemon (below 1 means
nixwarden is faster) and asserts nothing.  Needs root and the real Nix.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from lib.cacheworld import serve, stop  # noqa: E402
from lib.nixenv import NixEnv, start_nix_daemon, start_nixwarden  # noqa: E402

NIX = ("nix", "--extra-experimental-features", "nix-command")
EXPR = r"""
{ leaves, kib }:
let
  mk = attrs: builtins.derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; } // attrs);
  half = toString (kib / 2);
  leaf = i: mk { name = "leaf-${toString i}"; args = [ "-c" ''
    /bin/mkdir $out
    /usr/bin/head -c ${half}K /dev/urandom > $out/random
    n=0; while [ $n -lt $(( ${half} * 1024 / 64 )) ]; do
      echo "leaf ${toString i} line $n: some compressible text, 64 bytes"; n=$((n+1))
    done | /usr/bin/head -c ${half}K > $out/text
  '' ]; };
  all = builtins.genList leaf leaves;
in mk { name = "top"; refs = toString all; passAsFile = [ "refs" ];
        args = [ "-c" "/bin/cp $refsPath $out" ]; }
"""


def build_caches(root: str, side: str, leaves: int, kib: int) -> tuple[str, str, dict]:
    shutil.rmtree(root, ignore_errors=True)
    env = NixEnv(root, "max-jobs = 8\n")
    expr = os.path.join(side, "closure.nix")
    with open(expr, "w") as f:
        f.write(EXPR)

    def local(*args) -> str:
        return env.run(*args, remote="local", timeout=1800).stdout.decode().strip()

    top = local("nix-build", expr, "--arg", "leaves", str(leaves), "--arg", "kib", str(kib),
                "--no-out-link")
    sk, pk = os.path.join(side, "sk"), os.path.join(side, "pk")
    local("nix-store", "--generate-binary-cache-key", "bench-1", sk, pk)
    local(*NIX, "store", "sign", "--key-file", sk, "-r", top)
    closure = local("nix-store", "-qR", top).split()
    size = sum(i["narSize"] for i in json.loads(local(*NIX, "path-info", "-r", "--json", top)))
    caches = {}
    for comp in ("xz", "zstd"):
        t = time.monotonic()
        local(*NIX, "copy", "--to", f"file://{side}/caches/{comp}?compression={comp}", top)
        caches[comp] = time.monotonic() - t
    shutil.rmtree(root, ignore_errors=True)
    with open(pk) as f:
        return top, f.read().strip(), {"paths": len(closure), "nar_bytes": size,
                                       "copy_s": caches}


def measure(which: str, root: str, conf: str, top: str, n_paths: int) -> dict:
    out = {}
    for step in ("dry-run", "realise"):
        shutil.rmtree(root, ignore_errors=True)
        env = NixEnv(root, conf)
        start = start_nixwarden if which == "nixwarden" else start_nix_daemon
        daemon = start(env)
        try:
            args = ["nix-store", "-r", top] + (["--dry-run"] if step == "dry-run" else [])
            t = time.monotonic()
            proc = env.run(*args, check=False, timeout=1800)
            out[step] = time.monotonic() - t
            if proc.returncode != 0:
                raise SystemExit(f"{which} {step} failed:\n{proc.stderr.decode()[-3000:]}")
            if step == "realise":
                valid = env.run("nix-store", "-qR", top).stdout.split()
                assert len(valid) == n_paths, (which, len(valid))
        finally:
            daemon.stop()
    shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leaves", type=int, default=199)
    ap.add_argument("--kib", type=int, default=256, help="KiB per leaf")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root")
    if shutil.which("nix-daemon") is None:
        sys.exit("bench: needs the real Nix")
    root = f"/tmp/nw-bench-subst-{os.getpid()}"
    side = root + "-side"
    os.makedirs(side, exist_ok=True)
    proc = None
    try:
        t = time.monotonic()
        top, pk, facts = build_caches(root, side, args.leaves, args.kib)
        print(f"closure: {facts['paths']} paths, {facts['nar_bytes'] / 2**20:.1f} MiB of NAR; "
              f"made in {time.monotonic() - t:.1f} s "
              f"(nix copy: xz {facts['copy_s']['xz']:.1f} s, zstd {facts['copy_s']['zstd']:.1f} s)")
        proc, url = serve(os.path.join(side, "caches"))
        results = {}
        for comp in ("xz", "zstd"):
            conf = f"substituters = {url}/{comp}\ntrusted-public-keys = {pk}\n"
            for r in range(args.rounds):
                order = ("nix-daemon", "nixwarden") if r % 2 == 0 else ("nixwarden", "nix-daemon")
                for which in order:
                    m = measure(which, root, conf, top, facts["paths"])
                    for step in ("dry-run", "realise"):
                        results.setdefault((comp, step, which), []).append(m[step])
        print(f"{'cache':6} {'step':9} {'nix-daemon':>11} {'nixwarden':>11} {'ratio':>7}")
        for comp in ("xz", "zstd"):
            for step in ("dry-run", "realise"):
                nd = statistics.median(results[(comp, step, "nix-daemon")])
                nw = statistics.median(results[(comp, step, "nixwarden")])
                print(f"{comp:6} {step:9} {nd:10.2f}s {nw:10.2f}s {nw / nd:7.2f}")
        print("(ratio = nixwarden / nix-daemon wall time; below 1: nixwarden faster)")
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(side, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
