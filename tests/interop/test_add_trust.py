"""Who may add what (issue 3, point 4; spec worker-protocol §6).

Real unprivileged accounts against nix-daemon and nixwarden on identical
stores (same absolute path, one after the other).  With ``require-sigs``
(the default) and one key in ``trusted-public-keys``: untrusted clients
may add content-addressed paths and input-addressed paths carrying a
valid signature, nothing else (``dontCheckSigs`` is ignored for them);
AddSignatures is for trusted clients only.  With ``require-sigs = false``
untrusted imports go through.  Exit codes, outputs, error texts and the
resulting path infos must be the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import needs_nix, needs_root
from lib.accounts import ensure_user
from lib.addclient import AddClient, export_record, import_stream
from lib.differential import cli, connect_as, run_both
from lib.narlib import input_path, nar, nix32, source_path
from lib.nixenv import NixEnv
from lib.samplestore import populate
from lib.wclient import DaemonError

pytestmark = [needs_nix, needs_root, pytest.mark.interop]

USER = "nwtest-trust"


@pytest.fixture(scope="module")
def user():
    return ensure_user(USER)


@pytest.fixture(scope="module")
def source(user):
    root = f"/tmp/nwtest-trust-{os.getpid()}"
    side = root + "-side"
    for d in (root, side):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(side)
    os.chmod(side, 0o755)
    env = NixEnv(root)
    paths = populate(env)

    def local(*args):
        return env.run(*args, remote="local").stdout

    sk, pk = os.path.join(side, "sk"), os.path.join(side, "pk")
    local("nix-store", "--generate-binary-cache-key", "nwtest-key-1", sk, pk)
    local("nix", "store", "sign", "--key-file", sk, "-r", paths["top_out"])
    cache = os.path.join(side, "cache")
    local("nix", "copy", "--to", f"file://{cache}?compression=none",
          *(paths[k] for k in ("file", "dir", "top_out", "top_dev")))
    with open(os.path.join(side, "topdev.export"), "wb") as f:
        f.write(local("nix-store", "--export", paths["top_dev"]))
    info = json.loads(local("nix", "path-info", "--json", paths["dep_out"]))[0]
    extra = {"dep_nar": local("nix-store", "--dump", paths["dep_out"]),
             "dep_sigs": info["signatures"], "dep_hash": info["narHash"],
             "topdev_nar": local("nix-store", "--dump", paths["top_dev"])}
    subprocess.run(["chmod", "-R", "a+rX", side], check=True)
    ctx = dict(paths, cache=f"file://{cache}", side=side, pk=open(pk).read().strip(),
               uid=user.pw_uid, gid=user.pw_gid, **extra)
    shutil.rmtree(root, ignore_errors=True)
    yield root, ctx
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(side, ignore_errors=True)


def _norm(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text).removeprefix("error: ")


def wire(fn, untrusted=True):
    def step(env, ctx):
        sock = connect_as(ctx["uid"], ctx["gid"], env.socket_path) if untrusted else None
        c = AddClient(env.socket_path, sock=sock)
        try:
            try:
                value = ("ok", fn(c, ctx))
            except DaemonError as exc:
                value = ("DaemonError", _norm(str(exc)))
            try:
                alive = c.query_valid_paths([ctx["file"]])
            except (EOFError, OSError, DaemonError) as exc:
                alive = type(exc).__name__
            return value, alive
        finally:
            c.close()
    return step


def _info(c, path):
    i = c.query_path_info(path)
    if i:
        i.pop("registrationTime")
    return i


def add_signatures(c, ctx):
    c.add_signatures(ctx["file"], ["k:" + "A" * 86 + "=="])
    return _info(c, ctx["file"])


def nar_unsigned(c, ctx):
    c.add_to_store_nar(ctx["top_dev"], ctx["topdev_nar"], dont_check_sigs=True)
    return _info(c, ctx["top_dev"])


def nar_wrong_sig(c, ctx):
    c.add_to_store_nar(ctx["top_dev"], ctx["topdev_nar"], sigs=ctx["dep_sigs"])
    return _info(c, ctx["top_dev"])


def nar_signed(c, ctx):
    c.add_to_store_nar(ctx["dep_out"], ctx["dep_nar"], sigs=ctx["dep_sigs"], ultimate=True)
    return _info(c, ctx["dep_out"])


def nar_sig_for_other_path(c, ctx):
    """A signature covers the path name: dep_out's does not verify for another path."""
    path = input_path(ctx["store"], "resigned", "r")
    c.add_to_store_nar(path, ctx["dep_nar"], sigs=ctx["dep_sigs"])
    return _info(c, path)


def nar_ca(c, ctx):
    data = nar({"ca": b"content addressed, unsigned"})
    path = source_path(ctx["store"], data, "u-ca")
    c.add_to_store_nar(path, data, ultimate=True,
                       ca="fixed:r:sha256:" + nix32(hashlib.sha256(data).digest()))
    return _info(c, path)


def nar_ca_lying(c, ctx):
    """A CA claim that does not match the path proves nothing."""
    data = nar({"ca": b"lying"})
    path = input_path(ctx["store"], "u-ca-lie", "l")
    c.add_to_store_nar(path, data, dont_check_sigs=True,
                       ca="fixed:r:sha256:" + nix32(hashlib.sha256(data).digest()))
    return _info(c, path)


def multiple_unsigned(c, ctx):
    p = input_path(ctx["store"], "u-multi", "m")
    c.add_multiple([(p, nar(b"multi"), {})], dont_check_sigs=True)
    return _info(c, p)


def import_unsigned(c, ctx):
    p = input_path(ctx["store"], "u-import", "i")
    return c.import_paths(import_stream([export_record(nar(b"imported"), p)]))


def text_add(c, ctx):
    return c.add_text_to_store("u-text", b"text by an untrusted user", [ctx["file"]])


def _import_step(user):
    def step(env, ctx):
        with open(os.path.join(ctx["side"], "topdev.export"), "rb") as f:
            data = f.read()
        r = env.run("nix-store", "--import", input=data, user=user, check=False)
        return r.returncode, r.stdout.decode(), r.stderr.decode()
    return step


U = {"user": USER}
COPY = ("nix", "copy")
STEPS = {
    "u-add": cli("nix-store", "--add", "{side}/pk", **U),
    "u-add-fixed": cli("nix-store", "--add-fixed", "sha1", "{side}/pk", **U),
    "u-toFile": cli("nix-instantiate", "--eval", "--read-write-mode", "-E",
                    'builtins.toFile "u" "x"', **U),
    "u-copy-ca-from-cache": cli(*COPY, "--from", "{cache}", "--to", "unix://{socket}",
                                "{file}", "{dir}", **U),
    "u-copy-unsigned": cli(*COPY, "--from", "{cache}", "--to", "unix://{socket}",
                           "{top_dev}", **U),
    "u-copy-unsigned-no-check-sigs": cli(*COPY, "--no-check-sigs", "--from", "{cache}",
                                         "--to", "unix://{socket}", "{top_dev}", **U),
    "u-import": _import_step(USER),
    "u-wc-add-signatures": wire(add_signatures),
    "u-wc-nar-unsigned": wire(nar_unsigned),
    "u-wc-nar-wrong-sig": wire(nar_wrong_sig),
    "u-wc-nar-signed": wire(nar_signed),
    "u-wc-nar-sig-other-path": wire(nar_sig_for_other_path),
    "u-wc-nar-ca": wire(nar_ca),
    "u-wc-nar-ca-lying": wire(nar_ca_lying),
    "u-wc-multiple-unsigned": wire(multiple_unsigned),
    "u-wc-import-unsigned": wire(import_unsigned),
    "u-wc-text": wire(text_add),
    "u-copy-signed-closure": cli(*COPY, "--from", "{cache}", "--to", "unix://{socket}",
                                 "{top_out}", **U),
    "t-copy-unsigned-checked": cli(*COPY, "--from", "{cache}", "--to", "unix://{socket}",
                                   "{top_dev}"),
    "t-wc-add-signatures": wire(add_signatures, untrusted=False),
    "t-wc-import-unsigned": wire(import_unsigned, untrusted=False),
    "t-wc-nar-unsigned-checked": wire(nar_wrong_sig, untrusted=False),
    "t-wc-nar-unsigned-dont-check": wire(nar_unsigned, untrusted=False),
}


RELAXED_STEPS = {
    "u-copy-unsigned": STEPS["u-copy-unsigned"],
    "u-import": STEPS["u-import"],
    "u-wc-multiple-unsigned": STEPS["u-wc-multiple-unsigned"],
    "u-wc-import-unsigned": STEPS["u-wc-import-unsigned"],
    "u-wc-add-signatures": STEPS["u-wc-add-signatures"],
}

XFAIL: dict[str, str] = {}


def _dump(out, name):
    if os.environ.get("NWTEST_DUMP"):
        import pickle
        with open(os.environ["NWTEST_DUMP"] + name, "wb") as f:
            pickle.dump(out, f)
    return out


@pytest.fixture(scope="module")
def results(source):
    root, ctx = source
    return _dump(run_both(root, lambda env: ctx, STEPS,
                          extra_conf=f"trusted-public-keys = {ctx['pk']}\n"), "")


@pytest.fixture(scope="module")
def relaxed(source):
    root, ctx = source
    return _dump(run_both(root, lambda env: ctx, RELAXED_STEPS,
                          extra_conf="require-sigs = false\n"), "-relaxed")


@pytest.mark.parametrize("key", [
    pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=XFAIL[k])) if k in XFAIL else k
    for k in STEPS])
def test_same_as_nix_daemon(results, key):
    assert results["nixwarden"][key] == results["nix-daemon"][key]


@pytest.mark.parametrize("key", list(RELAXED_STEPS))
def test_without_require_sigs_same_as_nix_daemon(relaxed, key):
    assert relaxed["nixwarden"][key] == relaxed["nix-daemon"][key]


def test_not_vacuous(results, relaxed, source):
    real = results["nix-daemon"]
    assert real["u-add"][0] == 0
    assert real["u-copy-unsigned"][0] != 0
    assert "lacks a valid signature" in real["u-copy-unsigned"][2]
    assert real["u-wc-add-signatures"][0] == ("DaemonError",
                                              "you are not privileged to add signatures")
    assert real["u-wc-nar-signed"][0][0] == "ok"
    assert real["u-copy-signed-closure"][0] == 0
    assert relaxed["nix-daemon"]["u-import"][0] == 0


def test_same_path_infos(results, relaxed):
    for r in (results, relaxed):
        assert r["nixwarden"]["_infos"] == r["nix-daemon"]["_infos"]
        assert r["nixwarden"]["_verify"][0] == 0
