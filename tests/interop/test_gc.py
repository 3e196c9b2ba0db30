"""Garbage collection and GC roots against the real nix-daemon 2.8 (issue 5, points 1-2).

Every scenario runs twice on identical stores at the same absolute root
(``run_both``): first under nix-daemon, then under nixwarden, with real
Nix 2.8 clients (``nix-store --gc``, ``--print-roots/-live/-dead``,
``--delete``, ``nix-collect-garbage``, ``nix store gc/delete``,
``nix-build -o``, ``--add-root``).  Exit codes, stdout and stderr must be
the same (pids normalised), and so must the final stores: path infos,
store entries and the real ``nix-store --verify --check-contents``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from conftest import needs_nix, needs_root
from lib.addclient import AddClient
from lib.differential import cli, run_both
from lib.accounts import ensure_user
from lib.gcscen import assert_same, symlink, write
from lib.nixenv import new_root
from lib.samplestore import populate

pytestmark = [needs_nix, needs_root, pytest.mark.interop]

USER = "nwtest-gc"


@pytest.fixture(scope="module")
def user():
    return ensure_user(USER)


@pytest.fixture
def root():
    path = new_root("nwgc-")
    yield path
    subprocess.run(["rm", "-rf", path])


def _state(ctx, *parts):
    return os.path.join(ctx["root"], "var/nix", *parts)


def _rooted(env):
    """The sample store with a gcroots link to top_out and a profile link to dir."""
    p = populate(env)
    symlink(p["top_out"], f"{env.root}/var/nix/gcroots/top")
    symlink(p["dir"], f"{env.root}/var/nix/profiles/per-user/root/tree-1-link")
    return p


def test_roots_live_dead_delete_gc(root):
    steps = {
        "roots": cli("nix-store", "--gc", "--print-roots"),
        "live": cli("nix-store", "--gc", "--print-live"),
        "dead": cli("nix-store", "--gc", "--print-dead"),
        "delete_root": cli("nix-store", "--delete", "{top_out}"),
        "delete_referenced_alive": cli("nix-store", "--delete", "{dep_out}"),
        "delete_profile": cli("nix-store", "--delete", "{dir}"),
        "delete_dead": cli("nix-store", "--delete", "{file}"),
        "dead_after_delete": cli("nix-store", "--gc", "--print-dead"),
        "gc": cli("nix-store", "--gc"),
        "dead_after_gc": cli("nix-store", "--gc", "--print-dead"),
        "gc_again": cli("nix-store", "--gc"),
        "query_roots": cli("nix-store", "--query", "--roots", "{top_out}"),
    }
    r = run_both(root, _rooted, steps)
    assert_same(r, *steps)
    got = r["nixwarden"]
    ctx = got["_ctx"]
    assert got["delete_root"][0] == 1
    assert f"Cannot delete path '{ctx['top_out']}' since it is still alive" in \
        got["delete_root"][2]
    assert got["delete_dead"][:2] == (0, "1 store paths deleted, 0.00 MiB freed\n")
    assert "deleting garbage..." in got["gc"][2]
    assert got["gc"][1].startswith("2 store paths deleted")
    live = set(got["live"][1].split())
    assert {ctx["top_out"], ctx["dep_out"], ctx["top_drv"], ctx["dep_drv"],
            ctx["dir"]} == live
    assert got["dead_after_gc"][1] == ""
    assert set(got["_infos"]) == live


def _chain(env):
    """No roots: top_out references dep_out; both dead."""
    return populate(env)


def test_delete_specific_paths(root):
    steps = {
        "referenced_by_dead": cli("nix-store", "--delete", "{dep_out}"),
        "together": cli("nix-store", "--delete", "{top_out}", "{dep_out}"),
        "invalid": cli("nix-store", "--delete", "{invalid}"),
        "drv_with_valid_output": cli("nix-store", "--delete", "{top_drv}"),
        "not_in_store": cli("nix-store", "--delete", "/etc/passwd"),
        "nix_store_delete": cli("nix", "store", "delete", "{file}"),
        "nix_store_delete_alive": cli("nix", "store", "delete", "{top_dev}", "{top_drv}"),
    }
    r = run_both(root, _chain, steps)
    assert_same(r, *steps)
    got = r["nixwarden"]
    assert got["referenced_by_dead"][0] == 1
    assert "since it is still alive" in got["referenced_by_dead"][2]
    assert got["together"][:2] == (0, "2 store paths deleted, 0.00 MiB freed\n")


def test_max_freed(root):
    def prepare(env):
        p = populate(env)
        big = write(f"{env.root}/home/big/blob", "x" * 300_000)
        p["big"] = env.run("nix-store", "--add", os.path.dirname(big),
                           remote="local").stdout.decode().strip()
        return p
    steps = {
        "one_byte": cli("nix-store", "--gc", "--max-freed", "1"),
        "dead_left": cli("nix-store", "--gc", "--print-dead"),
        "ten_k": cli("nix-store", "--gc", "--max-freed", "10K"),
        "dead_left2": cli("nix-store", "--gc", "--print-dead"),
        "zero": cli("nix-store", "--gc", "--max-freed", "0"),
        "nix_store_gc_max": cli("nix", "store", "gc", "--max", "1"),
        "rest": cli("nix-store", "--gc"),
    }
    r = run_both(root, prepare, steps)
    assert_same(r, *steps)
    got = r["nixwarden"]
    assert got["one_byte"][1].startswith("1 store paths deleted")
    assert "deleted more than 1 bytes; stopping" in got["one_byte"][2]
    assert got["zero"][1].startswith("0 store paths deleted")


def test_collect_garbage_commands(root):
    steps = {
        "store_gc_dry": cli("nix", "store", "gc", "--dry-run"),
        "store_gc": cli("nix", "store", "gc"),
        "ncg": cli("nix-collect-garbage"),
        "ncg_again": cli("nix-collect-garbage", "--max-freed", "1"),
    }
    r = run_both(root, _rooted, steps)
    assert_same(r, *steps)
    got = r["nixwarden"]
    assert got["store_gc"][0] == 0
    assert "3 store paths deleted" in got["store_gc"][1] + got["store_gc"][2]
    assert got["ncg"][1].startswith("0 store paths deleted")


@pytest.mark.parametrize("keep_outputs,keep_derivations",
                         [("true", "false"), ("false", "true"), ("true", "true"),
                          ("false", "false")])
def test_keep_outputs_and_derivations(root, keep_outputs, keep_derivations):
    def prepare(env):
        p = populate(env)
        symlink(p["top_out"], f"{env.root}/var/nix/gcroots/out")  # a root on an output
        return p
    steps = {
        "live": cli("nix-store", "--gc", "--print-live"),
        "dead": cli("nix-store", "--gc", "--print-dead"),
        "delete_dev": cli("nix-store", "--delete", "{top_dev}"),
        "delete_drv": cli("nix-store", "--delete", "{top_drv}"),
        "gc": cli("nix-store", "--gc"),
    }
    conf = f"keep-outputs = {keep_outputs}\nkeep-derivations = {keep_derivations}\n"
    r = run_both(root, prepare, steps, extra_conf=conf)
    assert_same(r, *steps)
    got = r["nixwarden"]
    ctx, live = got["_ctx"], set(got["live"][1].split())
    kd, ko = keep_derivations == "true", keep_outputs == "true"
    assert {ctx["top_out"], ctx["dep_out"]} <= live
    assert (ctx["top_drv"] in live) == kd
    assert (ctx["dep_drv"] in live) == kd
    assert (ctx["top_dev"] in live) == (kd and ko)
    assert got["delete_drv"][0] == 1  # a root's deriver, or referenced by unbuilt.drv


def test_result_links_and_indirect_roots(root):
    expr = ('let mk = n: builtins.derivation { name = n; system = builtins.currentSystem;'
            ' builder = "/bin/sh"; args = [ "-c" "echo ${n} > $out" ]; };'
            ' in { a = mk "ra"; b = mk "rb"; c = mk "rc"; }')

    def prepare(env):
        p = populate(env)
        write(f"{env.root}/home/r.nix", expr)
        os.makedirs(f"{env.root}/home/links")
        return p

    def ls_auto(env, ctx):
        auto = _state(ctx, "gcroots/auto")
        return sorted((n, os.readlink(f"{auto}/{n}")) for n in os.listdir(auto))

    def rm(name):
        def step(env, ctx):
            os.unlink(f"{ctx['root']}/home/links/{name}")
            return True
        return step

    h = "{root}/home"
    steps = {
        "build_a": cli("nix-build", f"{h}/r.nix", "-A", "a", "-o", f"{h}/links/result-a"),
        "build_b": cli("nix-build", f"{h}/r.nix", "-A", "b", "-o", f"{h}/links/result-b"),
        "instantiate_c": cli("nix-instantiate", f"{h}/r.nix", "-A", "c", "--add-root",
                             f"{h}/links/drv-c", "--indirect"),
        "add_root_indirect": cli("nix-store", "--add-root", f"{h}/links/file", "--indirect",
                                 "-r", "{file}"),
        "add_root_realise": cli("nix-store", "--add-root", f"{h}/links/dep", "-r",
                                "{dep_drv}"),
        "add_root_clobber": cli("nix-store", "--add-root", f"{h}/r.nix", "-r", "{file}"),
        "auto": ls_auto,
        "roots": cli("nix-store", "--gc", "--print-roots"),
        "rm_b": rm("result-b"),
        "rm_file": rm("file"),
        "roots_after_rm": cli("nix-store", "--gc", "--print-roots"),
        "auto_after_roots": ls_auto,
        "gc": cli("nix-store", "--gc"),
        "auto_after_gc": ls_auto,
        "live": cli("nix-store", "--gc", "--print-live"),
    }
    r = run_both(root, prepare, steps)
    assert_same(r, *steps)
    got = r["nixwarden"]
    ctx = got["_ctx"]
    assert len(got["auto"]) == 5
    assert all(t.startswith(f"{ctx['root']}/home/links/") for _, t in got["auto"])
    assert f"{ctx['root']}/home/links/result-a -> " in got["roots"][1]
    assert "removing stale link from" in got["roots_after_rm"][2]
    assert len(got["auto_after_roots"]) == 3
    assert ctx["file"] not in got["_infos"]
    assert ctx["dep_out"] in got["_infos"]
    assert got["add_root_clobber"][0] != 0


def test_runtime_and_temp_roots_censored(root, user):
    """Roots from running processes and temp roots: links shown to root,
    ``{censored}`` to an untrusted user, who may run the GC all the same."""
    procs = {}

    def start(env, ctx):
        # A process with its cwd in one store path and another in its environment,
        # and a protocol client holding a temp root on a third (kept open).
        procs["sleep"] = subprocess.Popen(["sleep", "120"], cwd=ctx["dir"],
                                          env={"X": ctx["dep_drv"] + "/bin"})
        client = AddClient(env.socket_path)
        client.add_temp_root(ctx["file"])
        procs["client"] = client
        return True

    def stop(env, ctx):
        procs.pop("client").close()
        p = procs.pop("sleep")
        p.send_signal(signal.SIGKILL)
        p.wait()
        return True

    steps = {
        "start": start,
        "roots_root": cli("nix-store", "--gc", "--print-roots"),
        "roots_user": cli("nix-store", "--gc", "--print-roots", user=USER),
        "query_roots_user": cli("nix-store", "-q", "--roots", "{file}", user=USER),
        "live_user": cli("nix-store", "--gc", "--print-live", user=USER),
        "delete_user_alive": cli("nix-store", "--delete", "{file}", user=USER),
        "delete_user_dead": cli("nix-store", "--delete", "{top_dev}", user=USER),
        "gc_user": cli("nix-store", "--gc", user=USER),
        "ignore_liveness_user": cli("nix-store", "--delete", "--ignore-liveness", "{dir}",
                                    user=USER),
        "ignore_liveness_root": cli("nix-store", "--delete", "--ignore-liveness", "{dir}"),
        "stop": stop,
        "gc_root": cli("nix-store", "--gc"),
    }
    try:
        r = run_both(root, populate, steps)
    finally:
        for p in procs.values():
            if isinstance(p, subprocess.Popen):
                p.kill()
    assert_same(r, *steps)
    got = r["nixwarden"]
    ctx = got["_ctx"]
    assert re.search(rf"^/proc/\d+/cwd -> {re.escape(ctx['dir'])}$", got["roots_root"][1], re.M)
    assert re.search(rf"^/proc/\d+/environ -> {re.escape(ctx['dep_drv'])}$",
                     got["roots_root"][1], re.M)
    assert "{temp:" in got["roots_root"][1]
    assert f"{{censored}} -> {ctx['dir']}" in got["roots_user"][1]
    assert f"{{censored}} -> {ctx['file']}" in got["roots_user"][1]
    assert "/proc/" not in got["roots_user"][1]
    assert got["gc_user"][0] == 0
    assert got["ignore_liveness_user"][0] == 1
    assert "you are not allowed to ignore liveness" in got["ignore_liveness_user"][2]
