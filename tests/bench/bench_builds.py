"""Benchmark: nix-build through nixwarden against the real nix-daemon.

    sudo python tests/bench/bench_builds.py [--rounds 5]

Each daemon serves its own temporary store (identical configuration:
no sandbox, no build users, no substituters, ``max-jobs = 2``); clients
use ``NIX_REMOTE=daemon`` with the daemon's socket.  Workloads, each a
fresh ``nix-build`` whose derivations are new (a per-round salt), so
everything is really built every time:

* trivial: one derivation (``echo > $out``);
* chain50: 50 derivations, each depending on the previous one;
* par20: 20 independent derivations (each sleeps 0.2 s, so that running
  two at a time shows), built by one ``nix-build`` with ``-j 2``.

Wall time of the whole ``nix-build`` (evaluation included, the same for
both) is measured, alternating between the daemons; the medians and the
ratio nixwarden / nix-daemon are printed (below 1 is faster).  Nothing is
asserted.  Needs root and the real Nix.  Not collected by pytest.
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

from lib.builds import write_expr  # noqa: E402
from lib.nixenv import NixEnv, new_root, start_nix_daemon, start_nixwarden  # noqa: E402

EXPR = r"""
{ salt }:
rec {
  trivial = mk "trivial-${salt}" "echo > $out" {};

  chain = builtins.foldl'
    (prev: i: mk "chain-${salt}-${toString i}" "echo ${prev} > $out" {})
    (mk "chain-${salt}-0" "echo > $out" {})
    (builtins.genList (i: i + 1) 49);

  par = map (i: mk "par-${salt}-${toString i}" "/bin/sleep 0.2; echo > $out" {})
    (builtins.genList (i: i) 20);
}
"""

WORKLOADS = {
    "trivial": ["-A", "trivial"],
    "chain50": ["-A", "chain"],
    "par20 (-j2)": ["-A", "par", "-j", "2"],
}


def _run(env: NixEnv, expr: str, salt: str, args: list[str]) -> float:
    cmd = ["nix-build", expr, "--argstr", "salt", salt, "--no-out-link", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=dict(env.env, NIX_REMOTE="daemon"), capture_output=True)
    took = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"bench: {cmd} failed:\n{proc.stderr.decode(errors='replace')}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    opts = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root")
    setups = {}
    for name, start in (("nix-daemon", start_nix_daemon), ("nixwarden", start_nixwarden)):
        root = new_root(f"nw-bench-{name}-")
        env = NixEnv(root, "max-jobs = 2\n")
        expr = write_expr(f"{root}/home/b.nix", EXPR)
        setups[name] = (env, expr, start(env), root)
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(1):  # warm-up: both daemons' first connection and evaluation
            for name, (env, expr, _d, _r) in setups.items():
                _run(env, expr, "warmup", WORKLOADS["trivial"])
        for rnd in range(opts.rounds):
            for label, args in WORKLOADS.items():
                order = list(setups) if rnd % 2 == 0 else list(reversed(setups))
                for name in order:
                    env, expr, _d, _r = setups[name]
                    times.setdefault((label, name), []).append(
                        _run(env, expr, f"r{rnd}", args))
    finally:
        for env, expr, daemon, root in setups.values():
            daemon.stop()
            shutil.rmtree(root, ignore_errors=True)
    print(f"nix-build wall time, median of {opts.rounds} rounds (seconds)")
    print(f"{'workload':<14} {'nix-daemon':>11} {'nixwarden':>11} {'ratio nw/nd':>12}")
    for label in WORKLOADS:
        nd = statistics.median(times[(label, "nix-daemon")])
        nw = statistics.median(times[(label, "nixwarden")])
        print(f"{label:<14} {nd:>11.3f} {nw:>11.3f} {nw / nd:>12.2f}")


if __name__ == "__main__":
    main()
