"""Benchmark: putting data into the store and reading it out, nixwarden against nix-daemon.

    sudo python tests/bench/bench_add.py [--rounds 3] [--files 20000] [--big-mib 256]
                                         [--closure 1000]

Two temporary stores (the same layout under two roots, both under /tmp or
$NIXWARDEN_TEST_TMP), nixwarden serving one and the real nix-daemon the
other, both running side by side.  The inputs are made once, before any
daemon starts: ``--big-mib`` MiB of random bytes in one file, a tree of
``--files`` small files (100 directories; 64 B..1 KiB each, random bytes,
every tenth executable), and, for each store and each round, a chain of
``--closure`` input-addressed paths (each refers to the previous one)
imported with ``nix-store --import`` into a *source* local store that has
the daemon's store directory as its logical store
(``local?store=<store>&real=<elsewhere>``).  Measured for each daemon,
alternating which goes first each round, through real clients (wall
clock of the client process):

* ``nix-store --add`` of the big file (a new name each round, a hard link
  to the same bytes, so each add makes a new path);
* ``nix-store --add`` of the tree (renamed each round, for the same reason);
* ``nix copy --no-check-sigs --from <source store> --to unix://<socket>``
  of the round's chain top (the whole closure is new to the daemon);
* NarFromPath (op 38) of the big file's path with the protocol 1.34 client
  of tests/lib/wclient.py, reading the whole NAR off the socket (streamed
  into a reused buffer, not kept).

Before every measured operation the bench calls sync(2) (untimed), so that
one run does not pay for writing back the previous run's dirty pages.

``--rounds`` timed rounds give the medians.  One more round follows in
which the same operations run while a thread samples, every 50 ms, the
VmRSS of every process in the daemon's process tree (the daemon's pid and
``lib.procs.descendants``); its timings are only printed in the progress
line.  (Sampling is kept out of the timed rounds: ``descendants`` scans
/proc once per process in the tree, which costs nixwarden's tree of 8
several times what it costs nix-daemon's 1-2, on a machine with few CPUs.)
The table shows the largest peak of a single process (and which one) and
the largest sum over the tree; VmRSS counts shared pages (the code both
forked processes share, for example) in every process, so the sum
overstates what the tree really uses.

Ratios are nixwarden / nix-daemon: below 1 means nixwarden is faster /
smaller.  Prints numbers, asserts nothing about them.  Needs root
(nixwarden drops its workers to the ``nixwarden`` account) and the real Nix.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time

import common  # noqa: E402  (tests/bench/common.py)

common.bootstrap()

from lib.gcscen import chains_stream  # noqa: E402
from lib.nixenv import NixEnv, new_root, start_nix_daemon, start_nixwarden  # noqa: E402
from lib.procs import descendants, title  # noqa: E402
from lib.wclient import WClient  # noqa: E402

MINOR = 34  # the protocol of the Nix 2.8 clients
SAMPLE_INTERVAL = 0.05
NAMES = ("nixwarden", "nix-daemon")


# --- inputs -------------------------------------------------------------------------


def make_big(path: str, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))


def make_tree(path: str, files: int) -> None:
    per_dir = -(-files // 100)
    for i in range(files):
        d = os.path.join(path, f"d{i // per_dir:02d}")
        if i % per_dir == 0:
            os.makedirs(d)
        name = os.path.join(d, f"f{i:05d}")
        with open(name, "wb") as f:
            f.write(os.urandom(64 + (i * 37) % 961))
        if i % 10 == 0:
            os.chmod(name, 0o755)


def source_url(env: NixEnv, src_root: str) -> str:
    """A local store with ``env``'s store directory as its logical store dir."""
    return (f"local?store={env.store_dir}&real={src_root}/store&state={src_root}/var/nix"
            f"&log={src_root}/var/log/nix")


def fill_sources(env: NixEnv, src_root: str, rounds: int, length: int) -> list[str]:
    """One chain of ``length`` paths per round in the source store; the tops."""
    for sub in ("store", "var/nix", "var/log/nix"):
        os.makedirs(os.path.join(src_root, sub), exist_ok=True)
    tops = []
    for r in range(rounds):
        stream, chains = chains_stream(env.store_dir, 1, length, tag=f"r{r}c")
        env.run("nix-store", "--import", remote=source_url(env, src_root), input=stream,
                timeout=600)
        tops.append(chains[0][-1])
    return tops


# --- memory ---------------------------------------------------------------------------


def vmrss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0  # gone, or a zombie (no VmRSS line)


class PeakRSS:
    """Samples VmRSS of ``pid`` and its descendants every 50 ms while active."""

    def __init__(self, pid: int):
        self.pid = pid
        self.per_pid: dict[int, int] = {}
        self.titles: dict[int, str] = {}
        self.peak_sum = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        total = 0
        for p in [self.pid] + descendants(self.pid):
            kib = vmrss_kib(p)
            if not kib:
                continue
            total += kib
            if kib > self.per_pid.get(p, 0):
                self.per_pid[p] = kib
                self.titles[p] = title(p) or str(p)
        self.peak_sum = max(self.peak_sum, total)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()

    def __enter__(self) -> "PeakRSS":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def peak_process(self) -> tuple[int, str]:
        if not self.per_pid:
            return 0, "?"
        pid = max(self.per_pid, key=self.per_pid.__getitem__)
        return self.per_pid[pid], self.titles[pid]


# --- operations ----------------------------------------------------------------------------


def timed_cli(env: NixEnv, *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = env.run(*args, timeout=900)
    return time.perf_counter() - t0, proc.stdout.decode().strip()


def nar_from_path(env: NixEnv, path: str) -> float:
    """NarFromPath of ``path``, the whole NAR read off the socket; seconds."""
    client = WClient(env.socket_path, minor=MINOR)
    try:
        client.sock.settimeout(300)
        size = client.query_path_info(path)["narSize"]
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        t0 = time.perf_counter()
        client.op(38, client.s(path))
        got, client.rbuf = len(client.rbuf), b""
        last = 0
        while got < size:
            n = client.sock.recv_into(view, min(len(buf), size - got))
            if not n:
                raise EOFError(f"NarFromPath {path}: connection closed after {got} bytes")
            got += n
            last = n
        elapsed = time.perf_counter() - t0
        if last >= 16 and bytes(view[last - 16:last]) != WClient.s(")"):
            raise AssertionError(f"NarFromPath {path}: the NAR does not end with ')'")
        return elapsed
    finally:
        client.close()


# --- report --------------------------------------------------------------------------------


def row(label: str, nw: float, nd: float, fmt: str) -> str:
    return common.row(label, nw, nd, fmt, width=46)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (plus one sampled)")
    ap.add_argument("--files", type=int, default=20000, help="files in the small-file tree")
    ap.add_argument("--big-mib", type=int, default=256, help="size of the big file")
    ap.add_argument("--closure", type=int, default=1000, help="paths in the copied closure")
    args = ap.parse_args()
    common.require_root_and_nix()

    base = new_root("nwbench-add-")
    os.chmod(base, 0o755)
    data = os.path.join(base, "data")
    os.makedirs(data)
    daemons = {}
    t_start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        make_big(os.path.join(data, "big"), args.big_mib)
        make_tree(os.path.join(data, "tree"), args.files)
        envs = {name: NixEnv(os.path.join(base, name)) for name in NAMES}
        srcs = {name: os.path.join(base, f"src-{name}") for name in NAMES}
        tops = {name: fill_sources(envs[name], srcs[name], args.rounds + 1, args.closure)
                for name in NAMES}
        print(f"(inputs made in {time.perf_counter() - t0:.1f}s: {args.big_mib} MiB file, "
              f"{args.files} files, {args.rounds + 1} x {args.closure}-path chains per store)",
              flush=True)

        daemons = {"nixwarden": start_nixwarden(envs["nixwarden"]),
                   "nix-daemon": start_nix_daemon(envs["nix-daemon"])}
        pids = {name: d.pid for name, d in daemons.items()}
        # warm-up: a first connection and a small add on each
        warm = os.path.join(data, "warm")
        with open(warm, "w") as f:
            f.write("warm-up\n")
        for name in NAMES:
            timed_cli(envs[name], "nix-store", "--add", warm)
        idle = {}
        for name in NAMES:
            time.sleep(0.5)
            m = PeakRSS(pids[name])
            m.sample()
            idle[name] = (m.peak_sum, len(m.per_pid))

        ops = ("add-big", "add-tree", "copy", "nar")
        times = {(op, n): [] for op in ops for n in NAMES}
        mem: dict[tuple[str, str], tuple[int, str, int]] = {}
        samples = {n: 0 for n in NAMES}
        big_paths: dict[str, str] = {}
        cur_big, cur_tree = os.path.join(data, "big"), os.path.join(data, "tree")

        def measure(op: str, name: str, fn) -> None:
            os.sync()  # the previous run's dirty pages are not this one's to write
            if not sampled:
                times[(op, name)].append(fn())
                return
            with PeakRSS(pids[name]) as m:
                mem_times[(op, name)] = fn()
            proc_kib, proc_title = m.peak_process()
            old = mem.get((op, name), (0, "", 0))
            best = (proc_kib, proc_title) if proc_kib > old[0] else (old[0], old[1])
            mem[(op, name)] = (*best, max(old[2], m.peak_sum))
            samples[name] += m.samples

        mem_times: dict[tuple[str, str], float] = {}
        for r in range(args.rounds + 1):  # the last round: memory sampled, not timed
            sampled = r == args.rounds
            t_round = time.perf_counter()
            big = os.path.join(data, f"big-r{r}")
            os.link(cur_big, big)  # same bytes, new name: a new store path
            tree = os.path.join(data, f"tree-r{r}")
            os.rename(cur_tree, tree)
            cur_tree = tree
            order = list(NAMES) if r % 2 == 0 else list(reversed(NAMES))
            for name in order:
                env = envs[name]

                def add_big(env=env, name=name):
                    took, out = timed_cli(env, "nix-store", "--add", big)
                    big_paths[name] = out
                    return took
                measure("add-big", name, add_big)
            for name in order:
                measure("add-tree", name,
                        lambda env=envs[name]: timed_cli(env, "nix-store", "--add", tree)[0])
            for name in order:
                url = f"unix://{envs[name].socket_path}"
                src = source_url(envs[name], srcs[name])
                measure("copy", name, lambda env=envs[name], url=url, src=src, top=tops[name][r]:
                        timed_cli(env, "nix", "copy", "--no-check-sigs", "--from", src,
                                  "--to", url, top)[0])
            for name in order:
                measure("nar", name,
                        lambda env=envs[name], p=big_paths[name]: nar_from_path(env, p))
            took = mem_times if sampled else {k: v[-1] for k, v in times.items()}
            print(f"({'memory round' if sampled else f'round {r + 1}'}: "
                  f"{time.perf_counter() - t_round:.1f}s; "
                  + ", ".join(f"{op} {took[(op, 'nixwarden')]:.2f}/"
                              f"{took[(op, 'nix-daemon')]:.2f}s" for op in ops)
                  + " nw/nd)", flush=True)
        for name in NAMES:  # the copies really landed
            if envs[name].run("nix-store", "--check-validity", tops[name][-1],
                              check=False).returncode != 0:
                raise AssertionError(f"{name}: the copied closure is not valid")
    except BaseException:
        for name, d in daemons.items():
            print(f"--- {name} log (tail):\n{d.output()[-3000:]}", file=sys.stderr)
        raise
    finally:
        for d in daemons.values():
            d.stop()
        shutil.rmtree(base, ignore_errors=True)

    labels = {
        "add-big": f"nix-store --add, {args.big_mib} MiB file",
        "add-tree": f"nix-store --add, tree of {args.files} files",
        "copy": f"nix copy --to unix://, {args.closure}-path closure",
        "nar": f"NarFromPath, {args.big_mib} MiB path (op 38)",
    }
    print()
    print(f"nixwarden vs nix-daemon {common.nix_version()}: {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {args.rounds} timed rounds + 1 memory round, "
          f"total {time.perf_counter() - t_start:.0f}s")
    print(f"{'wall time, median (s)':<46} {'nixwarden':>12} {'nix-daemon':>12} {'nw/nd':>8}")
    for op, label in labels.items():
        print(row(label, statistics.median(times[(op, 'nixwarden')]),
                  statistics.median(times[(op, 'nix-daemon')]), "{:.3f}"))
    print()
    print(f"{'daemon peak VmRSS (MiB), memory round':<46} {'nixwarden':>12} "
          f"{'nix-daemon':>12} {'nw/nd':>8}")
    print(row("idle, sum over the process tree", idle["nixwarden"][0] / 1024,
              idle["nix-daemon"][0] / 1024, "{:.1f}"))
    for op, label in labels.items():
        nw, nd = mem[(op, "nixwarden")], mem[(op, "nix-daemon")]
        print(row(f"{op}: largest single process", nw[0] / 1024, nd[0] / 1024, "{:.1f}"))
        print(row(f"{op}: sum over the process tree", nw[2] / 1024, nd[2] / 1024, "{:.1f}"))
    print()
    print("largest process per operation (process title):")
    for op in labels:
        print(f"  {op:<9} nixwarden: {mem[(op, 'nixwarden')][1][:60]!r}; "
              f"nix-daemon: {mem[(op, 'nix-daemon')][1][:40]!r}")
    print(f"(processes when idle: nixwarden {idle['nixwarden'][1]}, nix-daemon "
          f"{idle['nix-daemon'][1]}; RSS samples every {SAMPLE_INTERVAL * 1000:.0f} ms: "
          f"{samples['nixwarden']} / {samples['nix-daemon']})")
    print("ratio = nixwarden / nix-daemon: < 1 is better (faster, smaller)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
