"""Builds, differentially: real nix-build / nix build / nix-store --realise
against nix-daemon and nixwarden on identical stores (issue 4).

One scenario (``STEPS``) is run against nix-daemon, then the root is wiped
and the same scenario runs against nixwarden at the same absolute root
(tests/lib/differential.py), so store paths, error texts and build
directory names are comparable byte for byte.  The module-scoped fixtures
run each scenario once; every test then compares one step (exit code,
stdout, stderr) and checks the facts behind it (paths, references, logs,
side effects).  Unsandboxed and without build users (the NixEnv default):
builders run as root, so they can write the side-effect directory.

Exit codes: through a daemon, Nix 2.8's clients exit with 1 on every build
error (the worker protocol carries the message, not the status; 100, 101,
102 and 104 appear only with a local store), so the tests require
nixwarden's codes to equal nix-daemon's rather than Nix's local ones.
"""

from __future__ import annotations

import bz2
import json
import os
import shutil
import subprocess
import time

import pytest

from lib.builds import write_expr
from lib.differential import cli, run_both
from lib.nixenv import new_root

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(shutil.which("nix-build") is None, reason="needs the real Nix")]

FIXED_SHA256 = "0c3071418e6356e614898c84ed064ca95e88551bc0811b534bdf1952ecdae534"  # "fixed\n"

EXPR = r"""
rec {
  trivial = mk "trivial" "echo building trivial; echo hello > $out" {};
  other = mk "other" "echo other > $out" {};

  c1 = mk "c1" "echo one > $out" {};
  c2 = mk "c2" "read x < ${c1}; echo \"$x two\" > $out" {};
  c3 = mk "c3" "read x < ${c2}; echo \"$x three ${c2}\" > $out" {};

  multi = mk "multi" ''
    /bin/mkdir -p $out $dev $lib
    echo $out > $dev/ref
    echo lib > $lib/l
    echo $lib > $out/o
  '' { outputs = [ "out" "dev" "lib" ]; };

  fixed = mk "fixed" "printf 'fixed\\n' > $out"
    { outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "@FIXED@"; };
  fixedWrong = mk "fixed-wrong" "printf 'not fixed\\n' > $out"
    { outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "@FIXED@"; };

  fail = mk "fail" ''
    for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo "log line $i"; done
    echo "to stderr" >&2
    exit 3
  '' {};

  refs = mk "refs" "echo ${c1} > $out; echo none > /dev/null" { unused = other; };

  paf = mk "paf" "/bin/cat $bigPath > $out; echo \"$big\" >> $out"
    { big = "passed as a file\n"; passAsFile = [ "big" ]; };

  structured = derivation {
    name = "structured";
    system = builtins.currentSystem;
    builder = "/bin/bash";
    args = [ "-c" "source .attrs.sh; /bin/cp .attrs.json \${outputs[out]}; echo \"$foo\" >> \${outputs[out]}" ];
    __structuredAttrs = true;
    foo = "a string";
    nested = { list = [ 1 2 "three" ]; flag = true; };
    dep = c1;
  };

  slow = mk "slow" "echo started; /bin/sleep 30; echo > $out" {};
  silent = mk "silent" "echo started; /bin/sleep 30; echo > $out" {};

  nondet = mk "nondet" "read x < /proc/sys/kernel/random/uuid; echo $x > $out" {};

  keep = mk "keep" "echo kept > marker; echo failing; exit 1" {};

  concurrent = mk "concurrent" "echo run >> @SIDE@/runs; /bin/sleep 2; echo done > $out" {};

  dry = mk "dry" "echo ${c3} ${other} > $out" {};

  noBuilder = derivation {
    name = "no-builder";
    system = builtins.currentSystem;
    builder = "/nonexistent/builder";
  };
}
"""

CLIENTS = 4  # concurrent nix-build processes for one derivation


def _prepare(env):
    root = env.root
    tmp, side = f"{root}/tmp", f"{root}/side"
    os.makedirs(tmp, mode=0o755)
    os.makedirs(side, mode=0o777)
    # Both daemons create build directories under $TMPDIR: keep them in the root.
    env.env["TMPDIR"] = tmp
    expr = write_expr(f"{root}/home/t.nix",
                      EXPR.replace("@FIXED@", FIXED_SHA256).replace("@SIDE@", side))
    return {"expr": expr, "side": side, "tmp": tmp}


def _drv(env, ctx, attr):
    return env.run("nix-instantiate", ctx["expr"], "-A", attr).stdout.decode().strip()


def _realise(attr, *extra):
    def step(env, ctx):
        drv = _drv(env, ctx, attr)
        proc = env.run("nix-store", "--realise", drv, *extra, check=False)
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    return step


def _keep_failed(env, ctx):
    proc = env.run("nix-build", ctx["expr"], "-A", "keep", "--no-out-link", "--keep-failed",
                   check=False)
    kept = sorted(os.listdir(ctx["tmp"]))
    contents = {}
    for d in kept:
        path = os.path.join(ctx["tmp"], d)
        contents[d] = sorted(os.listdir(path))
        with open(os.path.join(path, "marker")) as f:
            contents[d + "/marker"] = f.read()
        shutil.rmtree(path)
    return proc.returncode, proc.stderr.decode(), kept, contents


def _concurrent(env, ctx):
    cmd = ["nix-build", ctx["expr"], "-A", "concurrent", "--no-out-link"]
    procs = [subprocess.Popen(cmd, env=env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(CLIENTS)]
    results, errors = [], []
    for p in procs:
        out, err = p.communicate(timeout=120)
        results.append((p.returncode, out.decode()))
        if p.returncode:
            errors.append(err.decode())
    with open(os.path.join(ctx["side"], "runs")) as f:
        runs = f.read()
    ctx.setdefault("errors", {})["concurrent"] = errors
    return results, runs


def _log(*args):
    def step(env, ctx):
        drv = _drv(env, ctx, args[-1])
        proc = env.run(*args[:-1], drv, check=False)
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    return step


def _result_root(env, ctx):
    link = os.path.join(env.root, "home/result")
    build = env.run("nix-build", ctx["expr"], "-A", "trivial", "-o", link, check=False)
    roots = env.run("nix-store", "--gc", "--print-roots", check=False)
    lines = [ln for ln in roots.stdout.decode().splitlines() if "/home/result" in ln]
    return build.returncode, build.stdout.decode(), roots.returncode, lines, os.readlink(link)


def _content(attr):
    def step(env, ctx):
        path = env.run("nix-build", ctx["expr"], "-A", attr, "--no-out-link").stdout.decode()
        with open(path.strip(), errors="replace") as f:
            return f.read()
    return step


def _log_files(env, ctx):
    top = os.path.join(env.root, "var/log/nix")
    found = []
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                data = f.read()
            if name.endswith(".bz2"):
                data = bz2.decompress(data)
            found.append((os.path.relpath(full, top), data))
    return sorted(found)


def _timed(step):
    def timed(env, ctx):
        t = time.monotonic()
        value = step(env, ctx)
        return value, time.monotonic() - t
    return timed


STEPS = {
    "dry_before": cli("nix-build", "{expr}", "-A", "dry", "--dry-run"),
    "trivial": cli("nix-build", "{expr}", "-A", "trivial", "--no-out-link"),
    "trivial_again": cli("nix-build", "{expr}", "-A", "trivial", "--no-out-link"),
    "no_builder": cli("nix-build", "{expr}", "-A", "noBuilder", "--no-out-link"),
    "chain": cli("nix", "build", "-f", "{expr}", "c3", "--no-link", "--json"),
    "chain_closure": cli("nix", "path-info", "-r", "-f", "{expr}", "c3"),
    "dry_after": cli("nix-build", "{expr}", "-A", "dry", "--dry-run"),
    "dry_new": cli("nix", "build", "--dry-run", "-f", "{expr}", "dry", "--no-link"),
    "multi": _realise("multi"),
    "multi_dev": cli("nix", "build", "-f", "{expr}", "multi.dev", "--no-link", "--json"),
    "fixed": cli("nix-build", "{expr}", "-A", "fixed", "--no-out-link"),
    "fixed_wrong": cli("nix-build", "{expr}", "-A", "fixedWrong", "--no-out-link"),
    "fixed_wrong_new": cli("nix", "build", "-f", "{expr}", "fixedWrong", "--no-link"),
    "fail": cli("nix-build", "{expr}", "-A", "fail", "--no-out-link"),
    "fail_new": cli("nix", "build", "-f", "{expr}", "fail", "--no-link"),
    "fail_realise": _realise("fail"),
    "refs": cli("nix-build", "{expr}", "-A", "refs", "--no-out-link"),
    "paf": cli("nix-build", "{expr}", "-A", "paf", "--no-out-link"),
    "paf_content": _content("paf"),
    "structured": cli("nix-build", "{expr}", "-A", "structured", "--no-out-link"),
    "structured_content": _content("structured"),
    "timeout": _timed(cli("nix-build", "{expr}", "-A", "slow", "--no-out-link",
                          "--timeout", "1")),
    "silent": _timed(cli("nix-build", "{expr}", "-A", "silent", "--no-out-link",
                         "--max-silent-time", "1")),
    "timeout_new": cli("nix", "build", "-f", "{expr}", "slow", "--no-link", "--timeout", "1"),
    "check_det": cli("nix-build", "{expr}", "-A", "trivial", "--no-out-link", "--check"),
    "nondet": cli("nix-build", "{expr}", "-A", "nondet", "--no-out-link"),
    "check_nondet": cli("nix-build", "{expr}", "-A", "nondet", "--no-out-link", "--check"),
    "check_nondet_realise": _realise("nondet", "--check"),
    "check_unbuilt": cli("nix-build", "{expr}", "-A", "other", "--no-out-link", "--check"),
    "keep_failed": _keep_failed,
    "concurrent": _concurrent,
    "log_store": _log("nix-store", "-l", "trivial"),
    "log_nix": _log("nix", "log", "trivial"),
    "log_fail": _log("nix-store", "-l", "fail"),
    "result_root": _result_root,
    "log_files": _log_files,
}

# Paths whose contents legitimately differ from run to run.
NONDETERMINISTIC = ("-nondet",)


@pytest.fixture(scope="module")
def both():
    root = new_root("nw-build-")
    try:
        return run_both(root, _prepare, STEPS)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _same(both, key):
    a, b = both["nix-daemon"][key], both["nixwarden"][key]
    assert b == a, f"{key}: nixwarden differs from nix-daemon"
    return a


def _info(both, name, which="nix-daemon"):
    found = [i for p, i in both[which]["_infos"].items() if p.endswith("-" + name)]
    assert len(found) == 1, (name, sorted(both[which]["_infos"]))
    return found[0]


def _base(path):
    return os.path.basename(path)


# --- the store afterwards --------------------------------------------------------


def test_store_contents_match(both):
    a = {p: i for p, i in both["nix-daemon"]["_infos"].items()
         if not p.endswith(NONDETERMINISTIC)}
    b = {p: i for p, i in both["nixwarden"]["_infos"].items()
         if not p.endswith(NONDETERMINISTIC)}
    assert sorted(b) == sorted(a)
    for path in a:
        assert b[path] == a[path], path


def test_store_metadata_and_verify(both):
    """Same metadata for everything both stores hold; nixwarden leaves no
    garbage that nix-daemon does not (nix-daemon keeps the .lock files and
    unregistered outputs of failed and --check builds, nixwarden removes
    them, which is fine: they are invalid paths either way)."""
    a, b = both["nix-daemon"]["_metadata"], both["nixwarden"]["_metadata"]
    common = {k for k in set(a) & set(b) if "-nondet" not in k}
    assert {k: b[k] for k in common} == {k: a[k] for k in common}
    assert set(both["nixwarden"]["_store_entries"]) <= set(both["nix-daemon"]["_store_entries"])
    valid = {os.path.basename(p) for p in both["nixwarden"]["_infos"]}
    leftovers = {e for e in both["nixwarden"]["_store_entries"]
                 if not e.startswith(".")} - valid
    assert leftovers == set(), leftovers
    assert both["nixwarden"]["_verify"][0] == 0, both["nixwarden"]["_verify"]


# --- the steps -------------------------------------------------------------------


def test_missing_builder_reported_as_nix_daemon(both):
    """Nix 2.8 (unsandboxed) shows the child's serialised exec error raw."""
    rc, _, err = _same(both, "no_builder")
    assert rc != 0
    assert "executing '/nonexistent/builder': No such file or directory" in err


def test_trivial(both):
    rc, out, err = _same(both, "trivial")
    assert rc == 0 and out.strip().endswith("-trivial")
    assert "building trivial" in err
    rc, out2, err2 = _same(both, "trivial_again")
    assert rc == 0 and out2 == out and "building" not in err2
    info = _info(both, "trivial", "nixwarden")
    assert info["references"] == [] and info["deriver"].endswith("-trivial.drv")


def test_chain_with_nix_build(both):
    rc, out, err = _same(both, "chain")
    assert rc == 0, err
    [built] = json.loads(out)
    assert built["drvPath"].endswith("-c3.drv") and built["outputs"]["out"].endswith("-c3")
    rc, closure, _ = _same(both, "chain_closure")
    names = sorted(_base(p).split("-", 1)[1] for p in closure.split())
    assert names == ["c2", "c3"]  # c3 refers to c2; c2 only read c1
    info = _info(both, "c3", "nixwarden")
    assert [_base(r).split("-", 1)[1] for r in info["references"]] == ["c2"]


def test_dry_run(both):
    rc, out, err = _same(both, "dry_before")
    assert rc == 0 and out == ""
    assert "these 5 derivations will be built:" in err and "-dry.drv" in err
    rc, out, err = _same(both, "dry_after")  # c1..c3 exist now
    assert rc == 0 and "these 2 derivations will be built:" in err and "-c3.drv" not in err
    _same(both, "dry_new")


def test_multiple_outputs_realise(both):
    rc, out, err = _same(both, "multi")
    assert rc == 0, err
    paths = out.split()
    assert sorted(p.rsplit("-", 1)[1] for p in paths) == ["dev", "lib", "multi"]
    dev = _info(both, "multi-dev", "nixwarden")
    out_ = _info(both, "multi", "nixwarden")
    assert [_base(r) for r in dev["references"]] == [_base(out_["path"])]
    assert [_base(r) for r in out_["references"]] == [_base(_info(both, "multi-lib")["path"])]
    rc, out, err = _same(both, "multi_dev")
    assert rc == 0 and json.loads(out)[0]["outputs"]["dev"].endswith("-multi-dev")


def test_fixed_output_right_hash(both):
    rc, out, err = _same(both, "fixed")
    assert rc == 0, err
    info = _info(both, "fixed", "nixwarden")
    assert info["ca"] == f"fixed:sha256:{_nix32(FIXED_SHA256)}"


def test_fixed_output_wrong_hash(both):
    rc, out, err = _same(both, "fixed_wrong")
    assert rc == 1, err
    assert "hash mismatch in fixed-output derivation" in err
    assert "specified: sha256-" in err and "got:    sha256-" in err
    rc, out, err = _same(both, "fixed_wrong_new")
    assert rc != 0 and "hash mismatch in fixed-output derivation" in err


def test_failing_builder(both):
    rc, out, err = _same(both, "fail")
    assert rc == 1, err
    assert "failed with exit code 3" in err
    assert "last 10 log lines:" in err and "> log line 12" in err and "> to stderr" in err
    assert "> log line 2\n" not in err
    rc, _, err = _same(both, "fail_new")
    assert rc == 1 and "failed with exit code 3" in err
    rc, _, err = _same(both, "fail_realise")
    assert rc == 1 and "failed with exit code 3" in err


def test_output_references_dependency(both):
    rc, out, err = _same(both, "refs")
    assert rc == 0, err
    info = _info(both, "refs", "nixwarden")
    # refers to c1 (in its contents); "other" is an input it does not mention
    assert [_base(r).split("-", 1)[1] for r in info["references"]] == ["c1"]


def test_pass_as_file(both):
    rc, out, err = _same(both, "paf")
    assert rc == 0, err
    # $bigPath is a file holding the value; $big itself is not in the environment
    assert _same(both, "paf_content") == "passed as a file\n\n"


def test_structured_attrs(both):
    rc, out, err = _same(both, "structured")
    assert rc == 0, err
    info = _info(both, "structured", "nixwarden")
    # .attrs.json carries the output path (a self-reference) and "dep" (c1)
    assert sorted(_base(r).split("-", 1)[1] for r in info["references"]) == ["c1", "structured"]
    text = _same(both, "structured_content")
    attrs, _, tail = text.rpartition("}")
    attrs = json.loads(attrs + "}")
    assert attrs["foo"] == "a string" and attrs["nested"] == {"list": [1, 2, "three"],
                                                              "flag": True}
    assert attrs["outputs"]["out"] == out.strip() and attrs["dep"].endswith("-c1")
    assert tail.strip() == "a string"  # .attrs.sh sourced by bash


def test_timeout(both):
    (rc, out, err), secs = both["nixwarden"]["timeout"]
    (rc_a, out_a, err_a), _ = both["nix-daemon"]["timeout"]
    assert (rc, out, err) == (rc_a, out_a, err_a)
    assert rc == 1 and "timed out after 1 seconds" in err
    assert "error: building of '" in err and "-slow.drv!out' from .drv file" in err
    assert secs < 15
    (rc, out, err), secs = both["nixwarden"]["silent"]
    assert (rc, out, err) == both["nix-daemon"]["silent"][0]
    assert rc == 1 and "timed out after 1 seconds of silence" in err
    assert secs < 15
    rc, _, err = _same(both, "timeout_new")
    assert rc == 1 and "timed out" in err


def test_check(both):
    rc, out, err = _same(both, "check_det")
    assert rc == 0, err
    rc, out, err = _same(both, "nondet")
    assert rc == 0
    for key in ("check_nondet", "check_nondet_realise"):
        rc, out, err = _same(both, key)
        assert rc == 1, err
        assert "may not be deterministic" in err and "checking outputs of '" in err
    rc, out, err = _same(both, "check_det")
    assert "checking outputs of '" in err and "building trivial" in err
    rc, out, err = _same(both, "check_unbuilt")  # "other" was built as an input of "refs"
    assert rc == 0 and out.strip().endswith("-other")


def test_keep_failed(both):
    rc, err, kept, contents = _same(both, "keep_failed")
    assert rc == 1
    assert kept == ["nix-build-keep.drv-0"]
    tmp = both["nixwarden"]["_ctx"]["tmp"]
    assert f"note: keeping build directory '{tmp}/nix-build-keep.drv-0'" in err
    assert contents["nix-build-keep.drv-0/marker"] == "kept\n"


def test_concurrent_clients_build_once(both):
    assert not both["nixwarden"]["_ctx"].get("errors", {}).get("concurrent"), \
        both["nixwarden"]["_ctx"]["errors"]["concurrent"]
    results, runs = _same(both, "concurrent")
    assert runs == "run\n", "the builder ran more than once"
    assert [rc for rc, _ in results] == [0] * CLIENTS
    assert len({out for _, out in results}) == 1 and results[0][1].strip().endswith(
        "-concurrent")


def test_build_logs(both):
    rc, out, err = _same(both, "log_store")
    assert rc == 0 and out == "building trivial\n"
    rc, out, err = _same(both, "log_nix")
    assert rc == 0 and "building trivial" in out
    rc, out, err = _same(both, "log_fail")
    assert rc == 0 and "log line 12" in out and "to stderr" in out


def test_result_symlink_is_a_gc_root(both):
    rc, out, rc2, lines, target = _same(both, "result_root")
    assert rc == 0 and rc2 == 0
    assert target == out.strip()
    link = os.path.join(both["nixwarden"]["_ctx"]["root"], "home/result")
    assert lines == [f"{link} -> {target}"]


def test_logs_stored_compressed_like_nix(both):
    """keep-build-log/compress-build-log: <log dir>/drvs/xx/<rest>.bz2 in both."""
    files = [name for name, _ in _same(both, "log_files")]
    assert files and all(f.startswith("drvs/") and f.endswith(".bz2") for f in files)


def _nix32(hex_digest: str) -> str:
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    data = bytes.fromhex(hex_digest)
    n = len(data) * 8
    length = (n - 1) // 5 + 1
    out = []
    for i in range(length - 1, -1, -1):
        b = i * 5
        j, k = divmod(b, 8)
        c = data[j] >> k
        if j + 1 < len(data):
            c |= data[j + 1] << (8 - k)
        out.append(alphabet[c & 0x1f])
    return "".join(out)


# --- content-addressed derivations (ca-derivations) --------------------------------

CA_CONF = "experimental-features = nix-command ca-derivations\n"

CA_EXPR = r"""
rec {
  ca = mk "ca" "echo ca content > $out; echo $out >> $out"
    { __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
  dep = mk "ca-dep" "read x < ${ca}; echo \"$x and ${ca}\" > $out" {};
  cadep = mk "ca-cadep" "echo ${dep} > $out"
    { __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
}
"""


def _prepare_ca(env):
    return {"expr": write_expr(f"{env.root}/home/ca.nix", CA_EXPR)}


CA_STEPS = {
    "dry": cli("nix-build", "{expr}", "-A", "cadep", "--dry-run"),
    "ca": cli("nix-build", "{expr}", "-A", "ca", "--no-out-link"),
    "dep": cli("nix", "build", "-f", "{expr}", "dep", "--no-link", "--json"),
    "cadep": cli("nix-build", "{expr}", "-A", "cadep", "--no-out-link"),
    "again": cli("nix-build", "{expr}", "-A", "cadep", "--no-out-link"),
    "realisations": cli("nix", "realisation", "info", "-f", "{expr}", "ca", "dep", "cadep",
                        "--json"),
    "outputs": _realise("cadep", "--dry-run"),
}


@pytest.fixture(scope="module")
def both_ca():
    root = new_root("nw-build-ca-")
    try:
        return run_both(root, _prepare_ca, CA_STEPS, extra_conf=CA_CONF)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_ca_derivations(both_ca):
    for key in CA_STEPS:
        if key != "realisations":
            _same(both_ca, key)
    # nix-build shows the resolution as nix-daemon does (an actBuildWaiting activity)
    assert "resolved derivation: '" in both_ca["nixwarden"]["cadep"][2]
    rc, out, err = both_ca["nixwarden"]["ca"]
    assert rc == 0, err
    ca_path = out.strip()
    info = both_ca["nixwarden"]["_infos"][ca_path]
    assert info["ca"].startswith("fixed:r:sha256:")
    # a floating output: its path is not the one the .drv declares (there is none)
    assert ca_path.endswith("-ca")
    rc, out, err = both_ca["nixwarden"]["dep"]
    assert rc == 0, err
    dep_path = json.loads(out)[0]["outputs"]["out"]
    assert both_ca["nixwarden"]["_infos"][dep_path]["references"] == [ca_path]
    rc, out, err = both_ca["nixwarden"]["realisations"]
    assert rc == 0, err
    found = json.loads(out)
    assert len(found) == 3
    assert sorted(r["outPath"] for r in found) == sorted(
        r["outPath"] for r in json.loads(both_ca["nix-daemon"]["realisations"][1]))


def test_ca_dependent_realisations(both_ca):
    _same(both_ca, "realisations")


def test_ca_store_matches(both_ca):
    a, b = both_ca["nix-daemon"]["_infos"], both_ca["nixwarden"]["_infos"]
    assert sorted(b) == sorted(a)
    for path in a:
        assert b[path] == a[path], path
    assert both_ca["nixwarden"]["_verify"][0] == 0
