"""Derivations: ATerm parse/print, hashing modulo, output paths, the output
check and the .drv's own path.

Vectors from spec/store-formats.md §9-§11; real ``.drv`` files made by Nix
2.8's ``nix-instantiate`` (round trip byte for byte, paths and hashes
recomputed, fields compared with ``nix show-derivation``); hostile inputs
and a seeded mutation fuzz that may only ever raise ``DerivationError``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from nixwarden.shared import limits
from nixwarden.shared.derivation import (
    Derivation, DerivationError, DerivationOutput, DerivationType, OutputKind,
    derivation_bytes, parse_derivation, print_derivation)
from nixwarden.shared.derivation_hash import (
    DrvHash, IMPURE_OUTPUT_HASH, check_outputs, derivation_store_path, fixed_output_path,
    hash_derivation_modulo, output_paths, text_store_path_for)
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.hashes import Hash, HashAlgo
from nixwarden.shared.storepath import StoreDir

SD = StoreDir("/nix/store")
NIX_INSTANTIATE = shutil.which("nix-instantiate")
needs_nix = pytest.mark.skipif(NIX_INSTANTIATE is None, reason="needs the real Nix 2.8")

# --- spec vectors (§9.5, §10.2, §11.2) -------------------------------------------

SIMPLE_PATH = "/nix/store/3ghsl9sd83mc26i81adpa2fzf3yw4f68-simple.drv"
SIMPLE = ('Derive([("out","/nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple","","")],[],[],'
          '"x86_64-linux","/bin/sh",["-c","echo hello > $out"],[("builder","/bin/sh"),'
          '("name","simple"),("out","/nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple"),'
          '("system","x86_64-linux")])')
FOD_PATH = "/nix/store/lwric6hprlwl7yndn78sy90574d84lsm-fod.drv"
FOD_HEX = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
FOD = ('Derive([("out","/nix/store/9q0mqp4y1k819ysjzsfjah1ld74x19w2-fod","sha256",'
       f'"{FOD_HEX}")],[],[],"x86_64-linux","/bin/sh",["-c","printf hello > $out"],'
       '[("builder","/bin/sh"),("name","fod"),("out","/nix/store/9q0mqp4y1k819ysjzsfjah1ld74x19w2-fod"),'
       f'("outputHash","{FOD_HEX}"),("outputHashAlgo","sha256"),("outputHashMode","flat"),'
       '("system","x86_64-linux")])')
DEP_PATH = "/nix/store/ziac89l9ai0wnkf7pi5z87dbfpjgmpcd-dep.drv"
DEP = ('Derive([("dev","/nix/store/wjij8v2fxp34kkwh0fzlxfshw8f5cj9q-dep-dev","",""),'
       '("out","/nix/store/a6f2gwd8krmdlaprppd56xqjg5dzarxa-dep","","")],'
       '[("/nix/store/3ghsl9sd83mc26i81adpa2fzf3yw4f68-simple.drv",["out"]),'
       '("/nix/store/lwric6hprlwl7yndn78sy90574d84lsm-fod.drv",["out"])],[],"x86_64-linux",'
       '"/bin/sh",["-c","cat /nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple '
       '/nix/store/9q0mqp4y1k819ysjzsfjah1ld74x19w2-fod > $out; echo dev > $dev"],'
       '[("builder","/bin/sh"),("dev","/nix/store/wjij8v2fxp34kkwh0fzlxfshw8f5cj9q-dep-dev"),'
       '("name","dep"),("out","/nix/store/a6f2gwd8krmdlaprppd56xqjg5dzarxa-dep"),'
       '("outputs","out dev"),("system","x86_64-linux"),'
       r'("weird","quote\" backslash\\ nl\n tab\t cr\r dollar$ end")])')
DEP_MASKED = (
    'Derive([("dev","","",""),("out","","","")],'
    '[("166fad757cb0a925dc6bfa28346dfcd8372c7321def3c0e910f65d367e2d282b",["out"]),'
    '("d00ef3a220516efccd495b796868b4e1653f864d80d1026c4204f63d63a5845b",["out"])],[],'
    '"x86_64-linux","/bin/sh",["-c","cat /nix/store/94f9f6i31zwzwbf0kclq1naqxxi4c7v9-simple '
    '/nix/store/9q0mqp4y1k819ysjzsfjah1ld74x19w2-fod > $out; echo dev > $dev"],'
    '[("builder","/bin/sh"),("dev",""),("name","dep"),("out",""),("outputs","out dev"),'
    r'("system","x86_64-linux"),("weird","quote\" backslash\\ nl\n tab\t cr\r dollar$ end")])')
CASELF = ('Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",'
          '["-c","echo $out > $out"],[("builder","/bin/sh"),("name","caself"),'
          '("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),'
          '("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])')

SPEC_FILES = {SIMPLE_PATH: SIMPLE, FOD_PATH: FOD, DEP_PATH: DEP}


def spec_resolve(path: str) -> Derivation:
    return parse_derivation(SPEC_FILES[path], SD, path)


def h(hex_digest: str) -> Hash:
    return Hash(HashAlgo.SHA256, bytes.fromhex(hex_digest))


def test_spec_round_trip_and_fields():
    for path, text in SPEC_FILES.items():
        drv = parse_derivation(text, SD, path)
        assert print_derivation(drv) == text
        assert derivation_bytes(drv) == text.encode()
    dep = spec_resolve(DEP_PATH)
    assert dep.name == "dep"
    assert list(dep.outputs) == ["dev", "out"]
    assert dep.input_drvs == {SIMPLE_PATH: ("out",), FOD_PATH: ("out",)}
    assert dep.env["weird"] == "quote\" backslash\\ nl\n tab\t cr\r dollar$ end"
    assert dep.type() is DerivationType.INPUT_ADDRESSED
    fod = spec_resolve(FOD_PATH)
    out = fod.outputs["out"]
    assert out.kind is OutputKind.FIXED and out.method == "flat" and out.algo is HashAlgo.SHA256
    assert out.content_hash == h(FOD_HEX)
    assert fod.type() is DerivationType.FIXED


def test_spec_hash_modulo_and_paths():
    simple = spec_resolve(SIMPLE_PATH)
    assert hash_derivation_modulo(simple, SD, spec_resolve)["out"] == h(
        "cbd84a88dac33c14a874f676ab17db2518d565dc03e891ccf9d4be35138ea813")
    # unmasked hash of a derivation without inputs = sha256 of its file
    assert hash_derivation_modulo(simple, SD, spec_resolve, mask_outputs=False)["out"] == h(
        "d00ef3a220516efccd495b796868b4e1653f864d80d1026c4204f63d63a5845b")
    assert hash_derivation_modulo(spec_resolve(FOD_PATH), SD, spec_resolve)["out"] == h(
        "166fad757cb0a925dc6bfa28346dfcd8372c7321def3c0e910f65d367e2d282b")
    dep = spec_resolve(DEP_PATH)
    dh = hash_derivation_modulo(dep, SD, spec_resolve)
    assert not dh.deferred
    assert dh["out"] == dh["dev"] == h(
        "c946eacbcb15d61b04966e36ca98647c84e29895c612d07d51c56cd24fdef57d")
    assert Hash.compute(HashAlgo.SHA256, DEP_MASKED.encode()) == dh["out"]
    assert output_paths(dep, SD, dh) == {
        "out": "/nix/store/a6f2gwd8krmdlaprppd56xqjg5dzarxa-dep",
        "dev": "/nix/store/wjij8v2fxp34kkwh0fzlxfshw8f5cj9q-dep-dev"}
    # a bare Hash or a plain dict are accepted too
    assert output_paths(dep, SD, dh["out"]) == output_paths(dep, SD, dict(dh.hashes))
    for path, text in SPEC_FILES.items():
        drv = spec_resolve(path)
        assert SD.print(derivation_store_path(drv, SD)) == path
        check_outputs(drv, SD, spec_resolve)


def test_spec_masked_print():
    override = {"166fad757cb0a925dc6bfa28346dfcd8372c7321def3c0e910f65d367e2d282b": ("out",),
                "d00ef3a220516efccd495b796868b4e1653f864d80d1026c4204f63d63a5845b": ("out",)}
    assert print_derivation(spec_resolve(DEP_PATH), mask_outputs=True,
                            input_drvs_override=override) == DEP_MASKED


def test_spec_text_store_path():
    refs = [SIMPLE_PATH, FOD_PATH]
    assert SD.print(text_store_path_for(DEP, "dep", refs, SD)) == DEP_PATH
    assert SD.print(text_store_path_for(DEP.encode(), "dep", [SD.parse(r) for r in refs],
                                        SD)) == DEP_PATH
    with pytest.raises(DerivationError):
        text_store_path_for(DEP, "dep", ["/elsewhere/x"], SD)


def test_floating_ca_vector():
    drv = parse_derivation(CASELF, SD, "caself")
    assert print_derivation(drv) == CASELF
    assert drv.type() is DerivationType.FLOATING
    assert drv.outputs["out"].kind is OutputKind.FLOATING
    dh = hash_derivation_modulo(drv, SD, spec_resolve)
    assert dh.deferred
    assert dh["out"] == h("76a9f38742c78207fad694b2b6b42f6604d82a59db1e9e22a833e46f58fcbaa0")
    assert output_paths(drv, SD, dh) == {"out": None}
    check_outputs(drv, SD, spec_resolve)


def test_depending_on_floating_is_deferred():
    ca_path = SD.print(derivation_store_path(parse_derivation(CASELF, SD, "caself"), SD))
    files = {ca_path: CASELF}
    user = Derivation({"out": DerivationOutput.deferred()}, {ca_path: ("out",)}, (),
                      "x86_64-linux", "/bin/sh", (), {"out": ""}, "user")
    dh = hash_derivation_modulo(user, SD, lambda p: parse_derivation(files[p], SD, p))
    assert dh.deferred
    assert output_paths(user, SD, dh) == {"out": None}


def test_impure_hash():
    drv = Derivation({"out": DerivationOutput.impure("nar", HashAlgo.SHA256)}, {}, (),
                     "x86_64-linux", "/bin/sh", (), {}, "imp")
    text = print_derivation(drv)
    assert '("out","","r:sha256","impure")' in text
    assert parse_derivation(text, SD, "imp") == drv
    dh = hash_derivation_modulo(drv, SD, spec_resolve)
    assert dh.deferred and dh["out"] == IMPURE_OUTPUT_HASH == Hash.compute(
        HashAlgo.SHA256, b"impure")


def test_output_constructors():
    fixed = DerivationOutput.fixed("nar", h(FOD_HEX), "/nix/store/x")
    assert (fixed.hash_algo, fixed.hash) == ("r:sha256", FOD_HEX)
    assert DerivationOutput.floating("flat", HashAlgo.SHA1).hash_algo == "sha1"
    assert DerivationOutput.fixed("text", h(FOD_HEX), "/nix/store/x").method == "text"
    assert DerivationOutput.input_addressed("/nix/store/x").kind is OutputKind.INPUT_ADDRESSED
    assert DerivationOutput.deferred().content_hash is None
    assert DerivationOutput.deferred().method is None and DerivationOutput.deferred().algo is None


@pytest.mark.parametrize("fields, message", [
    (("/nix/store/x", "", "abc"), "without a hash algorithm"),
    (("/nix/store/x", "r:sha256", ""), "has a path"),
    (("/nix/store/x", "sha256", "impure"), "has a path"),
    (("/nix/store/x", "sha256", "00"), "not a base-16 sha256"),
    (("/nix/store/x", "sha256", FOD_HEX.upper()), "not a base-16 sha256"),
    ((None, "sha256", FOD_HEX), "no path"),
    (("/nix/store/x", "md6", FOD_HEX), "unknown hash algorithm 'md6'"),
    (("/nix/store/x", "text:sha1", "00" * 20), "should use sha256"),
    (("nix/store/x", "", ""), "bad path"),
    (('/nix/store/x"', "", ""), "quote or a backslash"),
])
def test_output_validation(fields, message):
    with pytest.raises(DerivationError, match=message):
        DerivationOutput(*fields)


def _drv(outputs, **kw) -> Derivation:
    args = dict(input_drvs={}, input_srcs=(), platform="x86_64-linux", builder="/bin/sh",
                args=(), env={}, name="t")
    args.update(kw)
    return Derivation(outputs, **args)


@pytest.mark.parametrize("outputs, message", [
    ({}, "must have at least one output"),
    ({"out": DerivationOutput("/nix/store/x"), "dev": DerivationOutput(None)},
     "can't mix derivation output types"),
    ({"out": DerivationOutput.fixed("flat", h(FOD_HEX), "/nix/store/x"),
      "dev": DerivationOutput.fixed("flat", h(FOD_HEX), "/nix/store/y")},
     "only one fixed output is allowed for now"),
    ({"bin": DerivationOutput.fixed("flat", h(FOD_HEX), "/nix/store/x")},
     'single fixed output must be named "out"'),
    ({"out": DerivationOutput.floating("nar", HashAlgo.SHA256),
      "dev": DerivationOutput.floating("nar", HashAlgo.SHA1)},
     "all floating outputs must use the same hash type"),
])
def test_derivation_type_errors(outputs, message):
    drv = _drv(outputs)
    with pytest.raises(DerivationError, match=message):
        drv.type()
    with pytest.raises(DerivationError, match=message):
        hash_derivation_modulo(drv, SD, spec_resolve)


def test_derivation_normalises_and_validates():
    drv = _drv({"out": DerivationOutput(None)}, env={"b": "1", "a": "2"},
               input_srcs=("/nix/store/b", "/nix/store/a", "/nix/store/a"),
               input_drvs={"/nix/store/z.drv": ("x", "b", "x")})
    assert list(drv.env) == ["a", "b"]
    assert drv.input_srcs == ("/nix/store/a", "/nix/store/b")
    assert drv.input_drvs == {"/nix/store/z.drv": ("b", "x")}
    assert drv.references == ("/nix/store/a", "/nix/store/b", "/nix/store/z.drv")
    assert not drv.is_builtin and _drv({}, builder="builtin:fetchurl").is_builtin
    for bad in [dict(name=""), dict(platform='x"y'), dict(input_srcs=("/a\\b",)),
                dict(input_drvs={"/nix/store/x.drv": ("o o",)})]:
        with pytest.raises(DerivationError):
            _drv({"out": DerivationOutput(None)}, **bad)
    with pytest.raises(DerivationError, match="invalid derivation output name"):
        _drv({"": DerivationOutput(None)})


def test_name_from_env_and_path():
    assert parse_derivation(SIMPLE, SD, "").name == "simple"
    assert parse_derivation(SIMPLE, SD, SIMPLE_PATH).name == "simple"
    with pytest.raises(DerivationError, match="no name"):
        parse_derivation(SIMPLE.replace('("name","simple"),', ""), SD, "")
    with pytest.raises(DerivationError, match="not a derivation"):
        parse_derivation(SIMPLE, SD, "/nix/store/3ghsl9sd83mc26i81adpa2fzf3yw4f68-simple")
    with pytest.raises(DerivationError, match="not in the Nix store"):
        parse_derivation(SIMPLE, SD, "/other/3ghsl9sd83mc26i81adpa2fzf3yw4f68-simple.drv")


def test_unicode_and_non_utf8_round_trip():
    drv = _drv({"out": DerivationOutput(None)}, args=("✓ \\ \" \n\r\t\x01",),
               env={"ünï": "🙂", "z": "\udcff\udc80raw"})
    data = derivation_bytes(drv)
    assert b"\xff\x80raw" in data and "🙂".encode() in data
    assert parse_derivation(data, SD, "t") == drv
    assert derivation_bytes(parse_derivation(data, SD, "t")) == data
    with pytest.raises(DerivationError, match="not a byte string"):
        parse_derivation(SIMPLE.replace("hello", "\ud800"), SD, "simple")


def test_env_sorted_bytewise():
    # U+E000 (ee 80 80) sorts after the raw byte 0xc3 (surrogate U+DCC3) bytewise,
    # while Python orders the code points the other way round.
    drv = _drv({"out": DerivationOutput(None)}, env={"\ue000": "a", "\udcc3": "b"})
    assert list(drv.env) == ["\udcc3", "\ue000"]
    data = derivation_bytes(drv)
    assert parse_derivation(data, SD, "t") == drv


# --- check_outputs -------------------------------------------------------------------

def test_check_outputs_messages():
    dep = spec_resolve(DEP_PATH)
    bad_out = "/nix/store/a6f2gwd8krmdlaprppd56xqjg5dzarxb-dep"
    outputs = dict(dep.outputs, out=DerivationOutput(bad_out))
    tampered = Derivation(outputs, dep.input_drvs, dep.input_srcs, dep.platform, dep.builder,
                          dep.args, dep.env, dep.name)
    with pytest.raises(DerivationError) as e:
        check_outputs(tampered, SD, spec_resolve, drv_path=DEP_PATH)
    assert str(e.value) == (
        f"derivation '{DEP_PATH}' has incorrect output '{bad_out}', "
        "should be '/nix/store/a6f2gwd8krmdlaprppd56xqjg5dzarxa-dep'")
    assert isinstance(e.value, StoreRefusal)
    env = dict(dep.env, dev="/nix/store/wrong")
    tampered = Derivation(dep.outputs, dep.input_drvs, dep.input_srcs, dep.platform,
                          dep.builder, dep.args, env, dep.name)
    with pytest.raises(DerivationError) as e:
        check_outputs(tampered, SD, spec_resolve, drv_path=DEP_PATH)
    assert str(e.value) == (
        f"derivation '{DEP_PATH}' has incorrect environment variable 'dev', "
        "should be '/nix/store/wjij8v2fxp34kkwh0fzlxfshw8f5cj9q-dep-dev'")
    env.pop("dev")
    tampered = Derivation(dep.outputs, dep.input_drvs, dep.input_srcs, dep.platform,
                          dep.builder, dep.args, env, dep.name)
    # a missing variable is not masked in: the output hash changes too
    with pytest.raises(DerivationError, match="has incorrect output '.*-dep-dev'"):
        check_outputs(tampered, SD, spec_resolve)


def test_check_outputs_fixed():
    fod = spec_resolve(FOD_PATH)
    assert SD.print(fixed_output_path(fod, SD)) == "/nix/store/9q0mqp4y1k819ysjzsfjah1ld74x19w2-fod"
    wrong = FOD.replace('"/nix/store/9q0mqp4y1k819ysjzsfjah1ld74x19w2-fod","sha256"',
                        '"/nix/store/9q0mqp4y1k819ysjzsfjah1ld74x19w3-fod","sha256"')
    with pytest.raises(DerivationError, match="has incorrect output '/nix/store/9q0m.*w3-fod', "
                                              "should be '/nix/store/9q0m.*w2-fod'"):
        check_outputs(parse_derivation(wrong, SD, "fod"), SD, spec_resolve)
    wrong_env = FOD.replace('("out","/nix/store/9q0mqp4y1k819ysjzsfjah1ld74x19w2-fod")',
                            '("out","")')
    with pytest.raises(DerivationError, match="incorrect environment variable 'out'"):
        check_outputs(parse_derivation(wrong_env, SD, "fod"), SD, spec_resolve)
    no_env = FOD.replace('("out","/nix/store/9q0mqp4y1k819ysjzsfjah1ld74x19w2-fod"),', "")
    with pytest.raises(DerivationError, match="incorrect environment variable 'out'"):
        check_outputs(parse_derivation(no_env, SD, "fod"), SD, spec_resolve)
    with pytest.raises(DerivationError, match="not a fixed output"):
        fixed_output_path(spec_resolve(SIMPLE_PATH), SD)


# --- hashing modulo: memoisation, depth, cycles ----------------------------------------

def _chain(n: int) -> tuple[dict[str, Derivation], str]:
    """n derivations, each depending on the previous one."""
    drvs: dict[str, Derivation] = {}
    prev = None
    for i in range(n):
        inputs = {prev: ("out",)} if prev else {}
        drv = _drv({"out": DerivationOutput(None)}, input_drvs=inputs, name=f"c{i}",
                   env={"i": str(i)})
        prev = SD.print(derivation_store_path(drv, SD))
        drvs[prev] = drv
    return drvs, prev


def test_deep_chain_and_memoisation():
    drvs, top = _chain(3000)
    calls = []

    def resolve(path):
        calls.append(path)
        return drvs[path]
    cache: dict[str, DrvHash] = {}
    first = hash_derivation_modulo(drvs[top], SD, resolve, cache=cache)
    assert len(calls) == 2999 and len(cache) == 2999
    again = hash_derivation_modulo(drvs[top], SD, resolve, cache=cache)
    assert again == first and len(calls) == 2999


def test_diamond_resolves_each_input_once():
    base = spec_resolve(SIMPLE_PATH)
    a = _drv({"out": DerivationOutput(None)}, input_drvs={SIMPLE_PATH: ("out",)}, name="a")
    b = _drv({"out": DerivationOutput(None)}, input_drvs={SIMPLE_PATH: ("out",)}, name="b")
    files = {SIMPLE_PATH: base}
    for d in (a, b):
        files[SD.print(derivation_store_path(d, SD))] = d
    top = _drv({"out": DerivationOutput(None)},
               input_drvs={p: ("out",) for p in files if p != SIMPLE_PATH}, name="top")
    calls = []
    hash_derivation_modulo(top, SD, lambda p: calls.append(p) or files[p])
    assert sorted(calls) == sorted(files)


def test_cycle_and_missing_output():
    p1, p2 = "/nix/store/" + "a" * 32 + "-x.drv", "/nix/store/" + "b" * 32 + "-y.drv"
    d1 = _drv({"out": DerivationOutput(None)}, input_drvs={p2: ("out",)})
    d2 = _drv({"out": DerivationOutput(None)}, input_drvs={p1: ("out",)})
    files = {p1: d1, p2: d2}
    with pytest.raises(DerivationError, match="depends on itself"):
        hash_derivation_modulo(d1, SD, files.__getitem__)
    wants_dev = _drv({"out": DerivationOutput(None)}, input_drvs={SIMPLE_PATH: ("dev",)})
    with pytest.raises(DerivationError, match="does not have an output named 'dev'"):
        hash_derivation_modulo(wants_dev, SD, spec_resolve)
    with pytest.raises(TypeError):
        hash_derivation_modulo(wants_dev, SD, lambda p: SIMPLE)
    with pytest.raises(DerivationError, match="no hash modulo for output 'out'"):
        output_paths(spec_resolve(SIMPLE_PATH), SD, {})


# --- malformed input -----------------------------------------------------------------

MALFORMED = [
    ("", "expected string 'Derive(['"),
    ("Derive(", "expected string 'Derive(['"),
    (SIMPLE[:-1], "expected string ')'"),
    (SIMPLE + " ", "unexpected data after the end"),
    (SIMPLE[:40], "unterminated string"),
    (SIMPLE.replace("[],[]", "[ ],[]"), "expected string"),
    (SIMPLE.replace("[],[]", "[,],[]"), "expected string"),
    (SIMPLE.replace('["-c",', '[,"-c",'), "expected string"),
    (SIMPLE.replace('"echo hello > $out"]', '"echo hello > $out",]'), "expected string"),
    (SIMPLE.replace('"-c","echo', '"-c""echo'), "expected string ',' or ']'"),
    (SIMPLE.replace("echo hello", r"echo \x hello"), r"invalid escape sequence '\\x'"),
    (SIMPLE.replace("echo hello", "echo\nhello"), "unescaped control character"),
    (SIMPLE[:SIMPLE.index("echo") + 4] + "\\", "unterminated string"),
    (SIMPLE.replace("echo hello", "echo\\"), r"invalid escape sequence '\\ '"),
    (SIMPLE.replace("x86_64-linux", r"x86\_64-linux", 1), "backslash in an unescaped"),
    (SIMPLE.replace("/nix/store/94f9", "/nix/stor/94f9", 1), "bad path '/nix/stor/94f9"),
    (SIMPLE.replace("/nix/store/94f9", "/nix/store//94f9", 1), "bad path"),
    (SIMPLE.replace("/nix/store/94f9", "/nix/store/e4f9", 1), "bad path"),
    (SIMPLE.replace('("out","/nix', '("o/ut","/nix'), "invalid derivation output name 'o/ut'"),
    (SIMPLE.replace('[],[],"x86', '[],["relative"],"x86'), "bad path 'relative'"),
    (DEP.replace("3ghsl9sd83mc26i81adpa2fzf3yw4f68-simple.drv", "3ghsl9sd83mc26i81adpa2fzf3yw4f68-simple"),
     "bad path"),
    (DEP.replace('simple.drv",["out"]', 'simple.drv",["out","out"]'),
     "input derivation outputs in derivation are not sorted"),
    (DEP.replace('simple.drv",["out"]', 'simple.drv",["x","a"]'), "not sorted"),
    (DEP.replace('("dev","/nix/store/wjij8v2fxp34kkwh0fzlxfshw8f5cj9q-dep-dev","",""),', "")
     .replace('("out","/nix/store/a6f2gwd8krmdlaprppd56xqjg5dzarxa-dep","","")',
              '("out","/nix/store/a6f2gwd8krmdlaprppd56xqjg5dzarxa-dep","",""),'
              '("dev","/nix/store/wjij8v2fxp34kkwh0fzlxfshw8f5cj9q-dep-dev","","")'),
     "output names in derivation are not sorted"),
    (SIMPLE.replace('("builder","/bin/sh"),', '("name","x"),("builder","/bin/sh"),'),
     "environment variables in derivation are not sorted"),
    (SIMPLE.replace('("name","simple"),', '("name","simple"),("name","simple"),'),
     "environment variables in derivation are not sorted or not unique"),
    (FOD.replace(f'"sha256","{FOD_HEX}"', '"sha256","LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ="'),
     "not a base-16 sha256 hash"),
    (FOD.replace('"sha256",', '"sha257",', 1), "unknown hash algorithm 'sha257'"),
    (SIMPLE.replace('"",""', '"","x"', 1), "without a hash algorithm"),
]


@pytest.mark.parametrize("text, message", MALFORMED)
def test_malformed(text, message):
    with pytest.raises(DerivationError) as e:
        parse_derivation(text, SD, SIMPLE_PATH)
    assert message in str(e.value) or re.search(message, str(e.value)), str(e.value)
    assert str(e.value).startswith(f"error parsing derivation '{SIMPLE_PATH}': ")


def test_list_and_size_limits(monkeypatch):
    monkeypatch.setattr(limits, "MAX_DRV_LIST_ITEMS", 4)
    text = SIMPLE.replace('["-c","echo hello > $out"]', '["1","2","3","4"]')
    parse_derivation(text, SD, "simple")
    with pytest.raises(DerivationError, match="more than 4 elements"):
        parse_derivation(text.replace('"4"]', '"4","5"]'), SD, "simple")
    monkeypatch.setattr(limits, "MAX_DRV_OUTPUTS", 1)
    with pytest.raises(DerivationError, match="more than 1 elements"):
        parse_derivation(DEP, SD, "dep")
    monkeypatch.setattr(limits, "MAX_DRV_SIZE", len(SIMPLE) - 1)
    for form in (SIMPLE, SIMPLE.encode()):
        with pytest.raises(DerivationError, match="larger than"):
            parse_derivation(form, SD, "simple")


def test_huge_count_real_limit():
    n = limits.MAX_DRV_LIST_ITEMS + 1
    text = SIMPLE.replace('["-c","echo hello > $out"]', "[" + ",".join(['""'] * n) + "]")
    with pytest.raises(DerivationError, match="more than"):
        parse_derivation(text, SD, "simple")


def test_fast_and_slow_string_readers_agree():
    from nixwarden.shared.derivation import _Reader
    rng = random.Random(7)
    alphabet = 'ab"\\nrtx\n\t\r'
    for _ in range(20000):
        text = '"' + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        for escaped in (True, False):
            results = []
            for method in ("string", "_string_slow"):
                reader = _Reader(text)
                try:
                    results.append((getattr(reader, method)(escaped), reader.pos))
                except DerivationError:
                    results.append(None)
            assert results[0] == results[1], (text, escaped)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(data) + 1) if data else 0
        if op == 0 and data:                              # flip a byte
            data[min(i, len(data) - 1)] = rng.randrange(256)
        elif op == 1:                                     # insert a special byte
            data[i:i] = bytes([rng.choice(b'"\\,()[]\n\t/-.x\xff')])
        elif op == 2 and data:                            # delete a run
            del data[i:i + rng.randint(1, 8)]
        elif op == 3:                                     # truncate
            del data[i:]
        else:                                             # duplicate a slice
            j = rng.randrange(len(data) + 1) if data else 0
            data[i:i] = data[j:j + rng.randint(1, 40)]
    return bytes(data)


def test_mutation_fuzz_only_derivation_error():
    rng = random.Random(20240528)
    corpus = [t.encode() for t in (SIMPLE, FOD, DEP, CASELF)]
    accepted = 0
    for n in range(6000):
        data = _mutate(rng, rng.choice(corpus))
        form = data if n % 2 else data.decode("utf-8", "surrogateescape")
        try:
            drv = parse_derivation(form, SD, "fuzz")
        except DerivationError:
            continue
        accepted += 1
        # the round-trip invariant holds for everything accepted
        assert derivation_bytes(drv) == data
        try:
            check_outputs(drv, SD, spec_resolve, drv_path=SIMPLE_PATH)
        except DerivationError:
            pass
        except KeyError:     # an input the fake resolver does not know
            pass
    assert accepted > 0


# --- real Nix 2.8 ----------------------------------------------------------------------

NIX_EXPR = r'''
let
  sys = "x86_64-linux";
  simple = derivation { name = "simple"; system = sys; builder = "/bin/sh"; args = [ "-c" "echo hello > $out" ]; };
  fod = derivation { name = "fod"; system = sys; builder = "/bin/sh"; args = [ "-c" "printf hello > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"; };
  fodr = derivation { name = "fodr"; system = sys; builder = "/bin/sh"; args = [ "-c" "x" ];
    outputHashMode = "recursive"; outputHashAlgo = "sha1"; outputHash = "sha1-qvTGHdzF6KLavt4PO0gs2a6pQ00="; };
  fodr256 = derivation { name = "fodr256"; system = sys; builder = "/bin/sh"; args = [ "-c" "x" ];
    outputHashMode = "recursive"; outputHash = "sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ="; };
  fodmd5 = derivation { name = "fodmd5"; system = sys; builder = "/bin/sh";
    outputHashAlgo = "sha512"; outputHash = "sha512:00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"; };
  dummy = derivation { name = "dummy"; system = sys; builder = "/bin/sh"; outputs = [ "out" "dev" ]; };
  src = builtins.toFile "src.txt" "some source\n";
in {
  inherit simple fod fodr fodr256 fodmd5;
  dep = derivation { name = "dep"; system = sys; builder = "/bin/sh"; outputs = [ "out" "dev" ];
    args = [ "-c" "cat ${simple} ${fod} > $out; echo dev > $dev" ];
    weird = "quote\" backslash\\ nl\n tab\t cr\r dollar\$ end"; };
  multi = derivation { name = "multi"; system = sys; builder = "/bin/sh"; outputs = [ "out" "lib" "dev" "bin" "man" ];
    args = [ "-c" "for o in $outputs; do echo > \${!o}; done" ]; inherit src; };
  onfod = derivation { name = "onfod"; system = sys; builder = "/bin/sh"; args = [ "-c" "cat ${fod} ${fodr} ${fodr256} > $out" ]; };
  usesdev = derivation { name = "usesdev"; system = sys; builder = "/bin/sh"; args = [ "-c" "cat ${dummy.dev} ${dummy.out}" ]; };
  deep = derivation { name = "deep"; system = sys; builder = "/bin/sh"; args = [ "${(derivation { name = "mid"; system = sys; builder = "/bin/sh"; x = "${simple}${fod}"; })}" ]; };
  structured = derivation { name = "structured"; system = sys; builder = "/bin/sh"; __structuredAttrs = true; outputs = ["out" "doc"];
    args = [ "-c" "true" ]; list = [ 1 2 "three" { a = null; } ]; b = true; f = 1.5; s = "ünïcödé \"q\" \\ \n"; };
  passfile = derivation { name = "passfile"; system = sys; builder = "/bin/sh"; args = [ "-c" "cat $bigPath > $out" ];
    passAsFile = [ "big" ]; big = "line1\nline2\ttab \"quoted\" ünï 🙂\n"; };
  unicode = derivation { name = "unicode"; system = sys; builder = "/bin/sh"; args = [ "-c" "echo ✓ > $out" "arg with \\ and \" and \r\n" ];
    "key with space" = "välüe"; emoji = "🙂🙃"; ctl = builtins.fromJSON "\"a\\u0001b\\u007f\""; "" = "empty key"; };
}
'''


def _nix_env(root: str, store_dir: str | None) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": root,
           "NIX_CONFIG": "substituters =\nexperimental-features = nix-command\n",
           "LANG": "C.UTF-8"}
    if store_dir:
        env.update(NIX_STORE_DIR=store_dir, NIX_STATE_DIR=f"{root}/state",
                   NIX_LOG_DIR=f"{root}/log", NIX_CONF_DIR=f"{root}/etc", NIX_REMOTE="local")
        os.makedirs(f"{root}/etc", exist_ok=True)
    return env


def _instantiate(root: str, store_dir: str | None) -> tuple[dict[str, str], dict, StoreDir]:
    """Instantiate NIX_EXPR; return (attr -> drv path), env, the logical store dir."""
    with open(f"{root}/all.nix", "w") as f:
        f.write(NIX_EXPR)
    env = _nix_env(root, store_dir)
    store_args = [] if store_dir else ["--store", f"local?root={root}/r"]
    names = ["simple", "fod", "fodr", "fodr256", "fodmd5", "dep", "multi", "onfod",
             "usesdev", "deep", "structured", "passfile", "unicode"]
    paths = {}
    for name in names:
        proc = subprocess.run([NIX_INSTANTIATE, *store_args, f"{root}/all.nix", "-A", name],
                              env=env, capture_output=True, text=True, check=True)
        paths[name] = proc.stdout.strip()
    return paths, env, StoreDir(store_dir or "/nix/store")


class RealStore:
    def __init__(self, root, store_dir):
        self.root = root
        self.paths, self.env, self.sd = _instantiate(root, store_dir)
        self.store_args = [] if store_dir else ["--store", f"local?root={root}/r"]
        self.cache: dict[str, DrvHash] = {}

    def real_file(self, path: str) -> str:
        return path if self.store_args == [] else f"{self.root}/r{path}"

    def read(self, path: str) -> bytes:
        with open(self.real_file(path), "rb") as f:
            return f.read()

    def resolve(self, path: str) -> Derivation:
        return parse_derivation(self.read(path), self.sd, path)

    def show(self, path: str) -> dict:
        proc = subprocess.run(["nix", *self.store_args, "show-derivation", path], env=self.env,
                              capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)[path]


@pytest.fixture(scope="module", params=["default-dir", "custom-dir"])
def real(request):
    root = tempfile.mkdtemp(prefix="nw-drv-")
    store_dir = None if request.param == "default-dir" else f"{root}/my-store"
    try:
        yield RealStore(root, store_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@needs_nix
def test_real_round_trip_paths_and_hashes(real):
    for name, path in real.paths.items():
        data = real.read(path)
        drv = real.resolve(path)
        assert derivation_bytes(drv) == data, name
        assert drv.name == name
        assert real.sd.print(derivation_store_path(drv, real.sd)) == path, name
        assert real.sd.print(text_store_path_for(data, name, drv.references, real.sd)) == path
        dh = hash_derivation_modulo(drv, real.sd, real.resolve, cache=real.cache)
        stated = {o: out.path for o, out in drv.outputs.items()}
        assert output_paths(drv, real.sd, dh) == stated, name
        check_outputs(drv, real.sd, real.resolve, drv_path=path, cache=real.cache)
        if not drv.input_drvs:
            assert hash_derivation_modulo(drv, real.sd, real.resolve, False)["out"] == (
                Hash.compute(HashAlgo.SHA256, data) if drv.type() is not DerivationType.FIXED
                else dh["out"])


@needs_nix
def test_real_kinds(real):
    kinds = {n: real.resolve(p).type() for n, p in real.paths.items()}
    assert {n for n, k in kinds.items() if k is DerivationType.FIXED} == {
        "fod", "fodr", "fodr256", "fodmd5"}
    methods = {n: real.resolve(real.paths[n]).outputs["out"].hash_algo
               for n in ("fod", "fodr", "fodr256", "fodmd5")}
    assert methods == {"fod": "sha256", "fodr": "r:sha1", "fodr256": "r:sha256",
                       "fodmd5": "sha512"}
    onfod = real.resolve(real.paths["onfod"])
    assert set(onfod.input_drvs) == {real.paths[n] for n in ("fod", "fodr", "fodr256")}
    usesdev = real.resolve(real.paths["usesdev"])
    assert list(usesdev.input_drvs.values()) == [("dev", "out")]
    assert real.resolve(real.paths["structured"]).env["__json"].startswith('{"b":true')
    unicode = real.resolve(real.paths["unicode"])
    assert unicode.env["ctl"] == "a\x01b\x7f" and unicode.env[""] == "empty key"


@needs_nix
def test_real_matches_show_derivation(real):
    for name, path in real.paths.items():
        drv = real.resolve(path)
        shown = real.show(path)
        assert shown["env"] == drv.env, name
        assert shown["args"] == list(drv.args)
        assert (shown["builder"], shown["system"]) == (drv.builder, drv.platform)
        assert shown["inputSrcs"] == list(drv.input_srcs)
        assert {k: tuple(v) for k, v in shown["inputDrvs"].items()} == drv.input_drvs
        for o, out in drv.outputs.items():
            want = {"path": out.path}
            if out.hash_algo:
                want.update(hashAlgo=out.hash_algo, hash=out.hash)
            assert shown["outputs"][o] == want, name


@needs_nix
def test_real_fod_change_keeps_dependent_paths(real):
    """A FOD's builder is hidden from dependents (spec §10.1 step 1)."""
    fod = real.resolve(real.paths["fod"])
    other = Derivation(fod.outputs, fod.input_drvs, fod.input_srcs, fod.platform, fod.builder,
                       ("-c", "curl something"), fod.env, fod.name)
    assert hash_derivation_modulo(other, real.sd, real.resolve) == hash_derivation_modulo(
        fod, real.sd, real.resolve)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
