"""Builder environment, structured attributes and exportReferencesGraph
(spec/local-store.md §8.3): vectors from the spec, refusals with Nix's
messages, and a differential check against builds run by the real Nix 2.8
(environment, arguments, and every build-directory file byte for byte)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from nixwarden.shared.derivation import Derivation, DerivationOutput, parse_derivation
from nixwarden.shared.storepath import StoreDir
from nixwarden.supervisor.build import BuildSetupError
from nixwarden.supervisor.build.env import attr_file_name, builder_env
from nixwarden.supervisor.build.placeholders import (
    hash_placeholder, input_rewrites, placeholder_map, rewrite)
from nixwarden.supervisor.build.refgraph import path_info_json, validity_text
from nixwarden.supervisor.build.structured import (
    _float_text, attrs_json, attrs_sh, dump_json, parse_json)

STORE = "/nix/store"
H1 = "94f9f6i31zwzwbf0kclq1naqxxi4c7v9"
H2 = "4gqv4131mx80b5gcxwpphyihvn59h902"
H3 = "6aya2z3yjmxq6827027j12y7cwws9rnj"
OUT = f"{STORE}/{H2}-refs"
DEV = f"{STORE}/{H3}-refs-dev"
DEP = f"{STORE}/{H1}-simple"
PH_OUT = "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"


def drv_of(env: dict, *, outputs=None, args=(), builder="/bin/sh", name="refs") -> Derivation:
    outputs = outputs or {"out": DerivationOutput(OUT)}
    full_env = {"builder": builder, "name": name, "system": "x86_64-linux"}
    full_env.update({n: (o.path or hash_placeholder(n)) for n, o in outputs.items()})
    full_env.update(env)
    return Derivation(outputs, {}, (), "x86_64-linux", builder, tuple(args), full_env, name)


def setup_of(drv: Derivation, **kw):
    args = dict(store_dir=STORE, build_top="/tmp/nix-build-refs.drv-0", cores=2,
                output_paths={n: o.path for n, o in drv.outputs.items()},
                impure_env={}, sandboxed=False)
    args.update(kw)
    return builder_env(drv, **args)


# --- placeholders ------------------------------------------------------------------

def test_hash_placeholder_vector():
    assert hash_placeholder("out") == PH_OUT  # spec SF §10.3 [verified]


def test_rewrite_all_occurrences_in_key_order():
    assert rewrite("a/x/x", {"/x": "/y"}) == "a/y/y"
    # keys apply in bytewise order, each over the result of the previous
    assert rewrite("ab", {"b": "c", "a": "b"}) == "cc"
    assert rewrite("same", {"same": "same", "": "z"}) == "same"


def test_placeholder_map_and_scratch_rewrites():
    drv = drv_of({}, outputs={"out": DerivationOutput(OUT), "dev": DerivationOutput(DEV)})
    scratch = f"{STORE}/{'0' * 32}-refs"
    assert placeholder_map(drv, {"out": OUT, "dev": DEV}) == {
        PH_OUT: OUT, hash_placeholder("dev"): DEV}
    rw = input_rewrites(drv, {"out": scratch, "dev": DEV})
    assert rw[PH_OUT] == scratch and rw[H2] == "0" * 32 and H3 not in rw
    with pytest.raises(ValueError, match="no path given for output 'dev'"):
        placeholder_map(drv, {"out": OUT})


# --- environment -------------------------------------------------------------------

def test_plain_env_exact_set_and_override_order():
    drv = drv_of({"PATH": "/mine", "TMPDIR": "/nope", "TERM": "dumb", "x": f"{PH_OUT}/bin"},
                 args=["-c", f"echo {PH_OUT}"])
    s = setup_of(drv)
    top = "/tmp/nix-build-refs.drv-0"
    assert s.env == {
        "HOME": "/homeless-shelter", "NIX_BUILD_CORES": "2", "NIX_BUILD_TOP": top,
        "NIX_LOG_FD": "2", "NIX_STORE": STORE, "PATH": "/mine", "PWD": top, "TEMP": top,
        "TEMPDIR": top, "TERM": "xterm-256color", "TMP": top, "TMPDIR": top,
        "builder": "/bin/sh", "name": "refs", "out": OUT, "system": "x86_64-linux",
        "x": f"{OUT}/bin"}
    assert s.args == ["-c", f"echo {OUT}"]
    assert s.files == {}


def test_pass_as_file_sandboxed():
    drv = drv_of({"passAsFile": "big  missing\n", "big": f"data {PH_OUT}"})
    s = setup_of(drv, sandboxed=True)
    name = ".attr-1lak0mvllw8rv9i9ygkglvhqsq19qi9ynl4bi7gbf69ab5nzw89a"  # spec §8.3
    assert attr_file_name("big") == name
    assert "big" not in s.env and s.env["bigPath"] == f"/build/{name}"
    assert s.env["NIX_BUILD_TOP"] == s.env["PWD"] == "/build"
    assert s.files == {name: f"data {OUT}".encode()}


def test_fixed_output_gets_checked_flag_and_impure_vars():
    fod = {"out": DerivationOutput(f"{STORE}/{H1}-fod", "sha256", "00" * 32)}
    drv = drv_of({"impureEnvVars": "http_proxy NOPE"}, outputs=fod)
    s = setup_of(drv, impure_env={"http_proxy": "http://p", "OTHER": "x"})
    assert s.env["NIX_OUTPUT_CHECKED"] == "1"
    assert s.env["http_proxy"] == "http://p" and s.env["NOPE"] == ""
    assert "OTHER" not in s.env
    plain = setup_of(drv_of({"impureEnvVars": "http_proxy"}), impure_env={"http_proxy": "p"})
    assert "http_proxy" not in plain.env and "NIX_OUTPUT_CHECKED" not in plain.env


def test_structured_spec_vector():
    attrs = {"bar": {"a": True}, "builder": "/bin/bash", "foo": [1, 2, "x"],
             "name": "sattrs2", "system": "x86_64-linux"}
    drv = drv_of({"__json": json.dumps(attrs)}, builder="/bin/bash", name="sattrs2")
    s = setup_of(drv, sandboxed=True)
    assert s.files[".attrs.json"].decode() == (
        '{"bar":{"a":true},"builder":"/bin/bash","foo":[1,2,"x"],"name":"sattrs2",'
        f'"outputs":{{"out":"{OUT}"}},"system":"x86_64-linux"}}')
    assert s.files[".attrs.sh"].decode() == (
        "declare -A bar=(['a']=1 )\ndeclare builder='/bin/bash'\n"
        "declare -a foo=(1 2 'x' )\ndeclare name='sattrs2'\n"
        f"declare -A outputs=(['out']='{OUT}' )\ndeclare system='x86_64-linux'\n")
    # 2.8 names the host directory here even in the sandbox
    assert s.env["NIX_ATTRS_JSON_FILE"] == "/tmp/nix-build-refs.drv-0/.attrs.json"
    assert "name" not in s.env and "out" not in s.env


def test_attrs_sh_rules():
    sh = attrs_sh({"a-b": 1, "s": "it's", "n": None, "f": 1.5, "g": 2.0, "big": 2**32 + 5,
                   "huge": 1e15, "nested": [[1]], "mixed": {"k'": "v", "x": False},
                   "deep": {"d": {"x": 1}}, "t": True, "e": []})
    assert sh == ("declare big=5\ndeclare -a e=()\ndeclare g=2\ndeclare huge=-2147483648\n"
                  "declare -A mixed=(['k'\\''']='v' ['x']= )\ndeclare n=''\n"
                  "declare s='it'\\''s'\ndeclare t=1\n")


@pytest.mark.parametrize("value,text", [
    (1.0, "1.0"), (1e15, "1e+15"), (1e16, "1e+16"), (123456789012345.0, "123456789012345.0"),
    (1e-5, "1e-05"), (1e-4, "0.0001"), (2.5, "2.5"), (-0.0, "-0.0"), (1.5e300, "1.5e+300"),
    (-1.25e-7, "-1.25e-07")])
def test_float_text_like_nlohmann(value, text):
    assert _float_text(value) == text


def test_json_reading_rules():
    assert parse_json('{"a":1,"a":2}') == {"a": 2}
    assert isinstance(parse_json("18446744073709551615"), int)
    assert isinstance(parse_json("18446744073709551616"), float)
    assert dump_json(parse_json('{"b":"\\u0001\\n/é","a":[1e2,-0]}')) == \
        '{"a":[100.0,0],"b":"\\u0001\\n/é"}'
    deep = "[" * 300 + "]" * 300
    for bad in ("NaN", "1e400", '"\\ud800"', "[1,]", "\udcff", "\ud800", deep, "[" * 100000):
        with pytest.raises(ValueError):
            parse_json(bad)


def test_structured_refusals():
    bad = drv_of({"__json": "{"})
    with pytest.raises(BuildSetupError, match="cannot process __json attribute of 'refs.drv'"):
        setup_of(bad)
    fod = {"out": DerivationOutput(f"{STORE}/{H1}-fod", "sha256", "00" * 32)}
    drv = drv_of({"__json": '{"impureEnvVars":"x"}'}, outputs=fod)
    with pytest.raises(BuildSetupError, match="'impureEnvVars' of derivation 'x-refs.drv' must"):
        setup_of(drv, drv_path=f"{STORE}/x-refs.drv")


# --- exportReferencesGraph -----------------------------------------------------------

A = f"{STORE}/{H3}-a.txt"
INFO = {
    A: {"path": A, "deriver": None, "references": [], "narSize": 120,
        "narHash": "sha256:0sg9f58l1jj88w6pdrfdpj5x9b1zrwszk84j81zvby36q9whhhqa",
        "ca": "text:sha256:094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic"},
    DEP: {"path": DEP, "deriver": "/x.drv", "references": [A, DEP], "narSize": 176,
          "narHash": "sha256:12izdvmmv89f4qaj4gy7w472764bqqax05rj9zyzvas00ld9n1p1"},
}


def fake_closure(paths):
    seen, todo = set(), list(paths)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += INFO[p]["references"]
    return [INFO[p] for p in seen]


def test_graph_text_and_json_forms():
    entries = dict(sorted((p, INFO[p]) for p in INFO))
    assert validity_text(entries) == f"{A}\n\n0\n{DEP}\n\n2\n{A}\n{DEP}\n"
    js = {o["path"]: o for o in path_info_json(entries)}
    assert js[DEP]["closureSize"] == 296 and js[A]["closureSize"] == 120
    assert js[A]["ca"].startswith("text:") and "ca" not in js[DEP]
    assert "deriver" not in js[DEP]


def test_graph_files_and_refusals():
    drv = drv_of({"exportReferencesGraph": f"g1 {DEP}/sub/file\tg_2.x {A}"})
    s = setup_of(drv, input_paths={DEP, A}, closure_info=fake_closure)
    assert set(s.files) == {"g1", "g_2.x"}
    assert s.files["g_2.x"] == f"{A}\n\n0\n".encode()
    cases = [
        (f"g1 {DEP} g2", "odd number of tokens in 'exportReferencesGraph'"),
        (f"../x {DEP}", "invalid file name '../x' in 'exportReferencesGraph'"),
        (f".hidden {DEP}", "invalid file name '.hidden'"),
        ("g /etc/passwd", "'exportReferencesGraph' contains a non-store path '/etc/passwd'"),
        (f"g {DEV}", f"cannot export references of path '{DEV}' because it is not in the input"),
    ]
    for value, message in cases:
        with pytest.raises(BuildSetupError, match=message.replace(".", r"\.")):
            setup_of(drv_of({"exportReferencesGraph": value}), input_paths={DEP, A},
                     closure_info=fake_closure)


def test_structured_graph_merged_into_attrs():
    drv = drv_of({"__json": json.dumps({"exportReferencesGraph": {"closure": [DEP]}})})
    text = attrs_json(drv, {"out": OUT}, store_dir=StoreDir(STORE), input_paths={DEP, A},
                      closure_info=fake_closure)
    closure = json.loads(text)["closure"]
    assert [o["path"] for o in closure] == sorted([A, DEP])
    with pytest.raises(BuildSetupError, match="type must be string, but is number"):
        attrs_json(drv_of({"__json": '{"exportReferencesGraph":{"c":[1]}}'}), {"out": OUT},
                   store_dir=StoreDir(STORE), input_paths={DEP}, closure_info=fake_closure)


# --- differential: real nix-build 2.8 dumps its builders' view ----------------------

DUMP_SCRIPT = r"""
set -e
d=@DUMP@
/bin/mkdir -p $d
/usr/bin/env -0 > $d/env
/bin/cp -a "$NIX_BUILD_TOP/." $d/top/
printf '%s\0' "$0" "$@" > $d/args
if [ -n "$NIX_ATTRS_SH_FILE" ]; then
  source "$NIX_ATTRS_SH_FILE"
  for o in "${!outputs[@]}"; do echo x > "${outputs[$o]}"; done
else
  for o in ${outputs:-out}; do echo x > "${!o}"; done
fi
"""

EXPR = r"""
{ dumpDir }:
let
  sys = builtins.currentSystem;
  a = builtins.toFile "a.txt" "hello";
  dep = derivation { name = "dep"; system = sys; builder = "/bin/sh";
    args = [ "-c" "/bin/mkdir $out; echo ${a} > $out/f" ]; };
  script = tag:
    builtins.replaceStrings [ "@DUMP@" ] [ "${dumpDir}/${tag}" ] (builtins.readFile ./dump.sh);
  mk = tag: attrs: derivation ({ name = tag; system = sys; builder = "/bin/bash";
    args = [ "-c" (script tag) "argv0" ]; } // attrs);
  fj = builtins.fromJSON;
in {
  plain = mk "plain" { PATH = "/custom"; TMPDIR = "/nope"; quoted = "it's \"q\"\n\ttab $x"; };
  passfile = mk "passfile" { passAsFile = [ "big" "absent" ];
    big = "x ${builtins.placeholder "out"} ünï\n"; };
  structured = mk "structured" { __structuredAttrs = true; outputs = [ "out" "doc" ];
    foo = [ 1 2 "x'y" true null ]; bar = { a = true; b = "q\"z"; n = null; };
    nested = { a = { b = 1; }; }; lst = [ [ 1 ] ]; f = 1.5; g = fj "1e15"; h = -7; w = 2.0;
    big = fj "3000000000"; huge = fj "18446744073709551615"; small = fj "1e-50";
    u = "ünïcödé 🙂 \\ /"; ctl = fj "\"a\\u0001b\\u007fc\\n\""; "a-b" = "skipped";
    here = builtins.placeholder "doc"; };
  fod = mk "fod" { outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "@XHASH@"; impureEnvVars = [ "http_proxy" "NW_UNSET_VAR" ]; };
  multi = mk "multi" { outputs = [ "out" "dev" "lib" ];
    args = [ "-c" (script "multi") "argv0" "${builtins.placeholder "lib"}/x"
             "pre${builtins.placeholder "out"}" ];
    inc = "${builtins.placeholder "dev"}/include";
    both = "${builtins.placeholder "out"}:${builtins.placeholder "lib"}"; };
  graph = mk "graph" { exportReferencesGraph = [ "closure" dep "g2.x" "${dep}/f" "src" a ]; };
  sgraph = mk "sgraph" { __structuredAttrs = true;
    exportReferencesGraph = { closure = [ dep ]; both = [ a dep ]; one = a; }; };
}
"""


ATTRS = ["plain", "passfile", "structured", "fod", "multi", "graph", "sgraph"]
SHELL_VARS = {"SHLVL", "_", "OLDPWD"}


@pytest.fixture(scope="module")
def nix_builds():
    if shutil.which("nix-build") is None:
        pytest.skip("needs the real Nix")
    from lib.nixenv import NixEnv, new_root
    root = new_root("nw-buildenv-")
    try:
        yield _run_builds(NixEnv(root, "cores = 3\n"), root)
    finally:
        subprocess.run(["chmod", "-R", "u+w", root], check=False)
        if not os.environ.get("NW_KEEP"):
            shutil.rmtree(root, ignore_errors=True)


def _run_builds(nixenv, root):
    dump_dir, tmp = os.path.join(root, "dumps"), os.path.join(root, "tmp")
    os.makedirs(dump_dir)
    os.makedirs(tmp)
    expr = EXPR.replace("@XHASH@", hashlib.sha256(b"x\n").hexdigest())
    with open(os.path.join(root, "e.nix"), "w") as f:
        f.write(expr)
    with open(os.path.join(root, "dump.sh"), "w") as f:
        f.write(DUMP_SCRIPT)
    extra = {"TMPDIR": tmp, "http_proxy": "http://proxy.invalid:3128"}
    common = ["--argstr", "dumpDir", dump_dir]
    for attr in ATTRS:
        nixenv.run("nix-build", os.path.join(root, "e.nix"), "-A", attr, "--no-out-link",
                   *common, remote="local", env=extra)
    drvs = {}
    for attr in ATTRS:
        out = nixenv.run("nix-instantiate", os.path.join(root, "e.nix"), "-A", attr, *common,
                         remote="local", env=extra).stdout.decode().split()
        drvs[attr] = out[0]
    return nixenv, dump_dir, drvs, extra


def _read_dump(d: str):
    with open(os.path.join(d, "env"), "rb") as f:
        env = dict(e.decode().split("=", 1) for e in f.read().split(b"\0") if e)
    with open(os.path.join(d, "args"), "rb") as f:
        args = [a.decode() for a in f.read().split(b"\0")[:-1]]
    files = {}
    for name in os.listdir(os.path.join(d, "top")):
        with open(os.path.join(d, "top", name), "rb") as f:
            files[name] = f.read()
    return env, args, files


def _store_query(nixenv, *args) -> list[str]:
    return nixenv.run("nix-store", *args, remote="local").stdout.decode().split()


def _closure_info_from(nixenv):
    def closure_info(paths):
        out = nixenv.run("nix", "path-info", "--json", "-r", *paths, remote="local").stdout
        return [{**i, "deriver": i.get("deriver")} for i in json.loads(out)]
    return closure_info


def _input_closure(nixenv, drv: Derivation) -> set[str]:
    roots = list(drv.input_srcs)
    for path in drv.input_drvs:
        roots += _store_query(nixenv, "--query", "--outputs", path)
    return set(_store_query(nixenv, "--query", "--requisites", *roots)) if roots else set()


@pytest.mark.parametrize("attr", ATTRS)
def test_differential_against_nix_build(nix_builds, attr):
    nixenv, dump_dir, drvs, extra = nix_builds
    store = StoreDir(nixenv.store_dir)
    with open(drvs[attr], "rb") as f:
        drv = parse_derivation(f.read(), store, drvs[attr])
    env, args, files = _read_dump(os.path.join(dump_dir, attr))
    setup = builder_env(
        drv, store_dir=store, build_top=env["NIX_BUILD_TOP"], cores=3,
        output_paths={n: o.path for n, o in drv.outputs.items()},
        impure_env={"http_proxy": extra["http_proxy"]}, sandboxed=False,
        input_paths=_input_closure(nixenv, drv), closure_info=_closure_info_from(nixenv),
        drv_path=drvs[attr])
    got_env = {k: v for k, v in env.items() if k not in SHELL_VARS or k in setup.env}
    assert setup.env == got_env
    assert args == setup.args[2:]  # $0 and "$@" of `bash -c script`
    assert setup.files == files
    assert env["NIX_BUILD_TOP"].startswith(extra["TMPDIR"])


def test_differential_covers_the_features(nix_builds):
    """Guard against a silently weakened fixture: each feature really appeared."""
    nixenv, dump_dir, drvs, extra = nix_builds
    envs = {a: _read_dump(os.path.join(dump_dir, a)) for a in ATTRS}
    assert envs["fod"][0]["NIX_OUTPUT_CHECKED"] == "1"
    assert envs["fod"][0]["http_proxy"] == extra["http_proxy"]
    assert envs["fod"][0]["NW_UNSET_VAR"] == ""
    assert ".attrs.sh" in envs["structured"][2] and "closure" in envs["graph"][2]
    assert b'"closureSize"' in envs["sgraph"][2][".attrs.json"]
    assert not any("/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9" in v
                   for v in envs["multi"][0].values())
    assert any(attr_file_name("big") == n for n in envs["passfile"][2])
