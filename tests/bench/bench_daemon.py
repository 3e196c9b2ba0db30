"""Benchmark: nixwarden against the real nix-daemon, side by side in one run.

    sudo python tests/bench/bench_daemon.py [--paths 200] [--rounds 3]

Two identical temporary stores (the second a copy of the first, both under
/tmp or $NIXWARDEN_TEST_TMP) are filled with ``--paths`` paths by the real
Nix directly (``nix-store --add``, NIX_REMOTE=local) before any daemon
starts; nixwarden serves one and nix-daemon the other.  Measured for each
daemon, alternating between them:

* connect + handshake latency: connect .. the initial STDERR_LAST, with a
  protocol 1.34 client (tests/lib/wclient.py), N=200, median: connections
  back to back, and again 50 ms apart (as separate client commands come);
* IsValidPath and QueryPathInfo round trips per second on one connection
  (N=2000), median of ``--rounds``;
* the same with 16 concurrent connections (one client process each), total
  throughput, median of ``--rounds``;
* memory per idle connection: the private memory (Private_Clean +
  Private_Dirty of /proc/<pid>/smaps_rollup; Pss too) of the daemon and all
  its descendants with 20 idle, handshaken connections, minus the same
  with none, divided by 20.

Ratios are nixwarden / nix-daemon: above 1 is better for throughput, below
1 is better for latency and memory.  It prints numbers and asserts nothing
about them.  Needs root (nixwarden drops its workers to the `nixwarden`
account) and the real Nix (nix-bin).  Not collected by pytest.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import common  # noqa: E402  (tests/bench/common.py)

common.bootstrap()

from lib.nixenv import NixEnv, new_root, start_nix_daemon, start_nixwarden  # noqa: E402
from lib.wclient import WClient  # noqa: E402

MINOR = 34
HANDSHAKE_N = 200
HANDSHAKE_GAP = 0.05  # seconds between connections in the spaced run
SINGLE_N = 2000
CONCURRENT_CONNS = 16
CONCURRENT_N_EACH = 250
IDLE_CONNS = 20


# --- stores and daemons -----------------------------------------------------------


def fill_store(env: NixEnv, count: int) -> list[str]:
    src = os.path.join(env.root, "home", "bench-src")
    os.makedirs(src, exist_ok=True)
    files = []
    for i in range(count):
        path = os.path.join(src, f"bench-{i:04d}")
        with open(path, "w") as f:
            f.write(f"benchmark file {i}\n" * (1 + i % 7))
        files.append(path)
    out = env.run("nix-store", "--add", *files, remote="local").stdout.decode()
    paths = out.split()
    assert len(paths) == count, out
    return paths


def connect(env: NixEnv) -> WClient:
    return WClient(env.socket_path, minor=MINOR)


# --- measurements -------------------------------------------------------------------


def handshake_latency(envs: dict[str, NixEnv], n: int, gap: float = 0.0
                      ) -> dict[str, list[float]]:
    """connect .. initial STDERR_LAST, alternating between the daemons, with
    ``gap`` seconds between one connection's end and the next one."""
    samples: dict[str, list[float]] = {name: [] for name in envs}
    for i in range(n + 10):
        for name, env in envs.items():
            t0 = time.perf_counter()
            client = WClient(env.socket_path, minor=MINOR, send_set_options=False)
            t1 = time.perf_counter()
            client.close()
            if i >= 10:  # warm-up
                samples[name].append(t1 - t0)
            time.sleep(gap)
    return samples


def _run_ops(client: WClient, op: str, paths: list[str], n: int) -> None:
    fn = client.is_valid_path if op == "IsValidPath" else client.query_path_info
    for i in range(n):
        if not fn(paths[i % len(paths)]):
            raise AssertionError(f"{op} {paths[i % len(paths)]}: not valid")


def single_connection_rate(env: NixEnv, op: str, paths: list[str], n: int) -> float:
    client = connect(env)
    try:
        _run_ops(client, op, paths, 50)  # warm-up
        t0 = time.perf_counter()
        _run_ops(client, op, paths, n)
        return n / (time.perf_counter() - t0)
    finally:
        client.close()


def _concurrent_client(socket_path, op, paths, n, barrier, results) -> None:
    client = WClient(socket_path, minor=MINOR)
    _run_ops(client, op, paths, 20)  # warm-up
    barrier.wait()
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    _run_ops(client, op, paths, n)
    results.put((t0, time.perf_counter()))
    client.close()


def concurrent_rate(env: NixEnv, op: str, paths: list[str], conns: int, n_each: int) -> float:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(conns)
    results = ctx.Queue()
    procs = [ctx.Process(target=_concurrent_client,
                         args=(env.socket_path, op, paths, n_each, barrier, results))
             for _ in range(conns)]
    for p in procs:
        p.start()
    spans = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise AssertionError(f"a {op} client exited with {p.exitcode}")
    start = min(s for s, _ in spans)
    end = max(e for _, e in spans)
    return conns * n_each / (end - start)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory_kib(pid: int) -> tuple[int, int, int]:
    """(private KiB, Pss KiB, process count) of ``pid`` and its descendants."""
    private = pss = count = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if "Pss" not in fields:  # a zombie
            continue
        kib = {k.strip(): int(v.split()[0]) for k, v in fields.items()
               if v.strip().endswith("kB")}
        private += kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0)
        pss += kib.get("Pss", 0)
        count += 1
    return private, pss, count


def settle(pid: int, timeout: float = 10.0) -> None:
    """Wait until the daemon's process tree stops changing."""
    deadline = time.monotonic() + timeout
    last, stable = None, 0
    while time.monotonic() < deadline and stable < 5:
        now = sorted(descendants(pid))
        stable = stable + 1 if now == last else 0
        last = now
        time.sleep(0.1)


def idle_connection_memory(env: NixEnv, pid: int, conns: int) -> tuple[float, float, int, int]:
    settle(pid)
    base_priv, base_pss, base_n = memory_kib(pid)
    clients = [connect(env) for _ in range(conns)]
    try:
        for c in clients:  # every connection fully set up and answered once
            c.is_valid_path(f"{env.store_dir}/00000000000000000000000000000000-x")
        settle(pid)
        priv, pss, n = memory_kib(pid)
    finally:
        for c in clients:
            c.close()
    return (priv - base_priv) / conns, (pss - base_pss) / conns, base_n, n


# --- report -----------------------------------------------------------------------------




def nixwarden_version() -> str:
    from importlib.metadata import version
    try:
        return version("nixwarden")
    except Exception:  # noqa: BLE001 - only for the title
        return "?"




def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", type=int, default=200, help="store paths per store")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per throughput figure")
    args = ap.parse_args()
    common.require_root_and_nix()

    root_nw = new_root("nw-bench-nixwarden-")
    root_nd = new_root("nw-bench-nixdaemon-")  # same kind of location
    daemons = []
    try:
        # Both stores get the same files through the real Nix, before any
        # daemon starts.  (A copy would not do: store paths depend on the
        # store directory, which differs.)
        envs = {"nixwarden": NixEnv(root_nw), "nix-daemon": NixEnv(root_nd)}
        store_paths = {name: fill_store(env, args.paths) for name, env in envs.items()}
        env_nw, env_nd = envs["nixwarden"], envs["nix-daemon"]
        daemons = [start_nixwarden(env_nw), start_nix_daemon(env_nd)]
        pids = {"nixwarden": daemons[0].proc.pid, "nix-daemon": daemons[1].proc.pid}

        results: dict[str, dict[str, float]] = {name: {} for name in envs}
        lat = handshake_latency(envs, HANDSHAKE_N)
        spaced = handshake_latency(envs, HANDSHAKE_N, HANDSHAKE_GAP)
        for name in envs:
            results[name]["lat"] = statistics.median(lat[name]) * 1000
            results[name]["lat90"] = statistics.quantiles(lat[name], n=10)[-1] * 1000
            results[name]["lat_spaced"] = statistics.median(spaced[name]) * 1000

        for op in ("IsValidPath", "QueryPathInfo"):
            single = {name: [] for name in envs}
            conc = {name: [] for name in envs}
            for _ in range(args.rounds):
                for name, env in envs.items():
                    single[name].append(single_connection_rate(
                        env, op, store_paths[name], SINGLE_N))
                for name, env in envs.items():
                    conc[name].append(concurrent_rate(
                        env, op, store_paths[name], CONCURRENT_CONNS, CONCURRENT_N_EACH))
            for name in envs:
                results[name][f"{op}1"] = statistics.median(single[name])
                results[name][f"{op}16"] = statistics.median(conc[name])

        for name, env in envs.items():
            priv, pss, base_n, n = idle_connection_memory(env, pids[name], IDLE_CONNS)
            results[name].update(mem=priv, pss=pss, procs0=base_n, procs=n)
    finally:
        outputs = []
        for d in daemons:
            d.stop()
            outputs.append(d.output())
        shutil.rmtree(root_nw, ignore_errors=True)
        shutil.rmtree(root_nd, ignore_errors=True)

    nw, nd = results["nixwarden"], results["nix-daemon"]
    print(f"nixwarden {nixwarden_version()} vs nix-daemon {common.nix_version()}: "
          f"{args.paths} paths per store, protocol 1.{MINOR} client, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{args.rounds} rounds")
    print(f"{'metric':<44} {'nixwarden':>12} {'nix-daemon':>12} {'nw/nd':>8}")
    print(common.row(f"connect+handshake latency, median (ms) N={HANDSHAKE_N}",
                     nw["lat"], nd["lat"], "{:.3f}"))
    print(common.row("connect+handshake latency, p90 (ms)", nw["lat90"], nd["lat90"], "{:.3f}"))
    print(common.row(f"  the same, {HANDSHAKE_GAP * 1000:.0f} ms apart, median (ms)",
                     nw["lat_spaced"], nd["lat_spaced"], "{:.3f}"))
    for op in ("IsValidPath", "QueryPathInfo"):
        print(common.row(f"{op}/s, 1 connection (N={SINGLE_N})", nw[f"{op}1"], nd[f"{op}1"],
                  "{:.0f}"))
        print(common.row(f"{op}/s, {CONCURRENT_CONNS} connections (total)",
                  nw[f"{op}16"], nd[f"{op}16"], "{:.0f}"))
    print(common.row("private memory per idle connection (KiB)", nw["mem"], nd["mem"], "{:.0f}"))
    print(common.row("Pss per idle connection (KiB)", nw["pss"], nd["pss"], "{:.0f}"))
    print(f"(processes: nixwarden {nw['procs0']} idle -> {nw['procs']} with {IDLE_CONNS} "
          f"connections; nix-daemon {nd['procs0']} -> {nd['procs']})")
    print("ratio = nixwarden / nix-daemon: > 1 is better for /s rows, < 1 for latency "
          "and memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
