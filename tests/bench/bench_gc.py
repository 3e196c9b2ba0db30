"""Benchmark: store maintenance, nixwarden against the real nix-daemon side by side.

    sudo python tests/bench/bench_gc.py [--rounds 3] [--verify-mib 1024]

Each store is filled once by the real Nix directly (NIX_REMOTE=local:
``nix-store --import`` of a generated export stream, ``nix-store --add``
of many files in one invocation) before any daemon starts.  Store paths
embed the store directory, so both daemons serve the same absolute root,
one after the other, alternating which goes first each round; operations
that change the store (GC, optimise) start every run from a ``cp -a``
copy of the filled template.  Timed, through a real client talking to the
daemon (wall clock of the client process):

* ``nix-store --gc`` deleting 5,000 dead paths (1,000 chains of 5);
* ``nix-store --gc --print-dead`` on a 10,000-path store (2,000 chains of 5);
* ``nix-store --verify --check-contents`` on ``--verify-mib`` MiB of paths
  (64 files of equal size; page cache warm after the first run);
* ``nix-store --optimise`` on 5,000 single-file paths, 1,000 distinct
  contents of 4 KiB each.

Prints the median of ``--rounds`` for each daemon and the ratio
nixwarden / nix-daemon (below 1 means nixwarden is faster).  Asserts
nothing about timings.  Needs root and the real Nix.  Not collected by pytest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import common  # noqa: E402  (tests/bench/common.py)

common.bootstrap()

from lib.gcscen import add_files_local, chains_stream, import_local  # noqa: E402
from lib.nixenv import NixEnv, new_root, start_nix_daemon, start_nixwarden  # noqa: E402

DAEMONS = {"nix-daemon": start_nix_daemon, "nixwarden": start_nixwarden}


def _timed(env: NixEnv, which: str, args: list[str]) -> float:
    daemon = DAEMONS[which](env)
    try:
        t0 = time.perf_counter()
        proc = env.run(*args, check=False, timeout=3600)
        elapsed = time.perf_counter() - t0
    finally:
        daemon.stop()
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and "--verify" not in args):
        raise SystemExit(f"{which}: {args} failed:\n{proc.stderr.decode()[-2000:]}")
    return elapsed


def _restore(template: str, root: str) -> NixEnv:
    subprocess.run(["rm", "-rf", root], check=True)
    subprocess.run(["cp", "-a", template, root], check=True)
    return NixEnv(root)


def bench(name: str, root: str, args: list[str], rounds: int, *, template: str | None):
    times: dict[str, list[float]] = {k: [] for k in DAEMONS}
    for r in range(rounds):
        order = list(DAEMONS) if r % 2 == 0 else list(reversed(DAEMONS))
        for which in order:
            env = _restore(template, root) if template else NixEnv(root)
            times[which].append(_timed(env, which, args))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["nixwarden"] / med["nix-daemon"]
    print(f"{name:<46} nix-daemon {med['nix-daemon']:8.3f}s   nixwarden "
          f"{med['nixwarden']:8.3f}s   ratio {ratio:5.2f}   "
          f"(runs: {', '.join(f'{t:.2f}' for t in times['nixwarden'])} / "
          f"{', '.join(f'{t:.2f}' for t in times['nix-daemon'])})", flush=True)
    return med


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--verify-mib", type=int, default=1024)
    ap.add_argument("--only", default="gc,dead,verify,optimise")
    opts = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root")
    only = set(opts.only.split(","))
    base = new_root("nwbench-gc-")
    root, template = f"{base}/s", f"{base}/template"
    try:
        print(f"bench_gc: {opts.rounds} rounds, medians; ratio = nixwarden / nix-daemon",
              flush=True)
        if "gc" in only:
            t0 = time.perf_counter()
            env = NixEnv(root)  # filled at the served root: paths name its store
            import_local(env, chains_stream(env.store_dir, 1000, 5)[0])
            subprocess.run(["cp", "-a", root, template], check=True)
            print(f"  (filled 5,000 paths in {time.perf_counter() - t0:.1f}s)", flush=True)
            bench("nix-store --gc, 5,000 dead paths", root, ["nix-store", "--gc"],
                  opts.rounds, template=template)
            subprocess.run(["rm", "-rf", root, template])
        if "dead" in only:
            env = NixEnv(root)
            t0 = time.perf_counter()
            import_local(env, chains_stream(env.store_dir, 2000, 5)[0])
            print(f"  (filled 10,000 paths in {time.perf_counter() - t0:.1f}s)", flush=True)
            bench("nix-store --gc --print-dead, 10,000 paths", root,
                  ["nix-store", "--gc", "--print-dead"], opts.rounds, template=None)
            subprocess.run(["rm", "-rf", root])
        if "verify" in only:
            env = NixEnv(root)
            t0 = time.perf_counter()
            size = opts.verify_mib * 1024 * 1024 // 64
            d = f"{root}/home/big"
            os.makedirs(d)
            chunk = os.urandom(1 << 20)
            for i in range(64):
                with open(f"{d}/b{i}", "wb") as f:
                    left = size
                    while left > 0:
                        f.write(chunk[:min(left, len(chunk))] if i % 2 else
                                bytes([i]) * min(left, len(chunk)))
                        left -= len(chunk)
            env.run("nix-store", "--add", *(f"{d}/b{i}" for i in range(64)),
                    remote="local", timeout=3600)
            shutil.rmtree(d)
            print(f"  (filled {opts.verify_mib} MiB in {time.perf_counter() - t0:.1f}s)",
                  flush=True)
            bench(f"nix-store --verify --check-contents, {opts.verify_mib} MiB", root,
                  ["nix-store", "--verify", "--check-contents"], opts.rounds, template=None)
            subprocess.run(["rm", "-rf", root])
        if "optimise" in only:
            env = NixEnv(root)
            t0 = time.perf_counter()
            texts = {f"f{i}": (f"content {i % 1000} ".encode() * 400)[:4096]
                     for i in range(5000)}
            # same content, different names -> distinct paths sharing file contents
            add_files_local(env, texts)
            subprocess.run(["cp", "-a", root, template], check=True)
            print(f"  (filled 5,000 paths in {time.perf_counter() - t0:.1f}s)", flush=True)
            bench("nix-store --optimise, 5,000 paths (1,000 distinct)", root,
                  ["nix-store", "--optimise"], opts.rounds, template=template)
    finally:
        subprocess.run(["rm", "-rf", base])


if __name__ == "__main__":
    main()
