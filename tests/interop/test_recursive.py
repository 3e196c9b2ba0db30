"""Recursive Nix, differentially: a builder that runs the real ``nix`` against
the daemon socket in its build directory, under nix-daemon and under
nixwarden on identical stores, with build users (issue 4).

The builder queries a path of its input closure, is refused a valid path
outside it, adds a path, finds it again from a later connection, counts
what it may see, builds an inner derivation, and links what it added and
built into its output; the output's closure must then hold them.  A second
run without the experimental feature must fail the same way.  Not
sandboxed (the client binary and its libraries come from the host).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import needs_root
from lib.builds import BUILD_GROUP, ensure_build_users, write_expr
from lib.differential import cli, run_both
from lib.nixenv import new_root

pytestmark = [pytest.mark.interop, needs_root,
              pytest.mark.skipif(shutil.which("nix") is None, reason="needs the real Nix")]

EXPR = r"""
{ unreachable }:
rec {
  recursive = mk "recursive" ''
    PATH=/usr/bin:/bin
    opts="--experimental-features nix-command"
    /bin/mkdir $out
    nix $opts path-info $dummy > $out/dummy-info
    if nix $opts path-info ${unreachable} 2> $out/unreachable-err; then echo visible >> $out/unreachable-err; fi
    if nix $opts build --no-link ${unreachable} 2> $out/build-unreachable-err; then echo built >> $out/build-unreachable-err; fi
    echo foobar > foobar
    foobar=$(nix $opts store add-path ./foobar)
    nix $opts path-info $foobar > $out/foobar-info
    /bin/ln -s $foobar $out/foobar
    nix $opts path-info --all > $out/visible
    nix $opts build --no-link --impure --expr '
      derivation {
        name = "inner1";
        system = builtins.currentSystem;
        builder = "/bin/sh";
        args = [ "-c" "echo $fnord blaat > $out" ];
        fnord = builtins.toFile "fnord" "fnord";
      }'
    inner=$(nix $opts eval --raw --impure --expr '
      (derivation {
        name = "inner1";
        system = builtins.currentSystem;
        builder = "/bin/sh";
        args = [ "-c" "echo $fnord blaat > $out" ];
        fnord = builtins.toFile "fnord" "fnord";
      }).outPath')
    /bin/ln -s $inner $out/inner1
  '' { requiredSystemFeatures = [ "recursive-nix" ]; dummy = builtins.toFile "dummy" "bla bla"; };
}
"""

CONF = f"build-users-group = {BUILD_GROUP}\n"
FEATURES = "experimental-features = nix-command recursive-nix\n"


def _prepare(env):
    ensure_build_users()
    root = env.root
    tmp = f"{root}/tmp"
    os.makedirs(tmp, mode=0o755)
    env.env["TMPDIR"] = tmp
    outside = f"{root}/home/outside.txt"
    with open(outside, "w") as f:
        f.write("not an input\n")
    unreachable = env.run("nix-store", "--add", outside, remote="local").stdout.decode().strip()
    expr = write_expr(f"{root}/home/r.nix", EXPR)
    return {"expr": expr, "unreachable": unreachable}


def _build(env, ctx):
    proc = env.run("nix-build", ctx["expr"], "-A", "recursive", "--no-out-link",
                   "--argstr", "unreachable", ctx["unreachable"], check=False, timeout=300)
    out = proc.stdout.decode().strip()
    files = {}
    if proc.returncode == 0:
        for name in sorted(os.listdir(out)):
            full = os.path.join(out, name)
            if os.path.islink(full):
                target = os.readlink(full)
                with open(target if os.path.isfile(target) else os.devnull) as f:
                    files[name] = ("link", target, f.read())
            else:
                with open(full) as f:
                    files[name] = ("file", f.read())
    return proc.returncode, out, files, _last_error(proc.stderr.decode(errors="replace"))


def _last_error(stderr: str) -> str:
    """The client's final error line (the log lines before it name build
    directories and pids)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    return errors[-1] if errors else ""


def _closure(env, ctx):
    out = env.run("nix-build", ctx["expr"], "-A", "recursive", "--no-out-link",
                  "--argstr", "unreachable", ctx["unreachable"]).stdout.decode().strip()
    return env.run("nix-store", "-qR", out).stdout.decode().split()


@pytest.fixture(scope="module")
def results():
    root = new_root()
    try:
        yield run_both(root, _prepare, {"build": _build, "closure": _closure},
                       extra_conf=CONF + FEATURES)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_recursive_build_as_nix_daemon(results):
    want, got = results["nix-daemon"]["build"], results["nixwarden"]["build"]
    assert want[0] == 0, want
    assert got == want


def test_builder_sees_only_its_closure_and_what_it_added(results):
    code, out, files, _ = results["nixwarden"]["build"]
    assert code == 0
    unreachable = results["nixwarden"]["_ctx"]["unreachable"]
    assert files["dummy-info"][1].strip().endswith("-dummy")
    assert "is not valid" in files["unreachable-err"][1]
    assert "visible" not in files["unreachable-err"][1]
    assert "cannot build" in files["build-unreachable-err"][1] \
        and "in recursive Nix because path is unknown" in files["build-unreachable-err"][1]
    foobar = files["foobar"][1]
    assert files["foobar"][2] == "foobar\n"
    assert files["foobar-info"][1].strip() == foobar
    visible = files["visible"][1].split()
    assert foobar in visible and unreachable not in visible
    assert files["inner1"][2].endswith("fnord blaat\n")


def test_added_and_built_paths_join_the_output_closure(results):
    want, got = results["nix-daemon"]["closure"], results["nixwarden"]["closure"]
    assert sorted(got) == sorted(want)
    names = {os.path.basename(p).split("-", 1)[1] for p in got}
    assert {"foobar", "inner1", "fnord", "recursive", "dummy"} <= names


def test_stores_end_identical(results):
    a, b = results["nix-daemon"], results["nixwarden"]
    assert b["_infos"].keys() == a["_infos"].keys()
    for path, info in a["_infos"].items():
        assert b["_infos"][path]["narHash"] == info["narHash"], path
        assert b["_infos"][path]["references"] == info["references"], path


def test_without_the_experimental_feature_the_build_fails_as_with_nix_daemon():
    root = new_root()
    try:
        steps = {"build": cli("nix-build", "{expr}", "-A", "recursive", "--no-out-link",
                              "--argstr", "unreachable", "{unreachable}")}
        res = run_both(root, _prepare, steps, extra_conf=CONF)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    want, got = res["nix-daemon"]["build"], res["nixwarden"]["build"]
    assert want[0] != 0
    assert got == want
    assert json.dumps(got[2]).count("recursive-nix") >= 1
