"""Verification, repair, optimisation and signing against the real nix-daemon 2.8
(issue 5, points 3-5).

Each scenario runs under nix-daemon and then under nixwarden on identical
stores at the same absolute root (``run_both``) with real Nix 2.8 clients:
``nix-store --verify [--check-contents] [--repair]`` after corrupting
files and deleting a path (as root and as an untrusted account),
``nix-store --optimise`` / ``nix store optimise`` (bytes saved and the
``.links`` layout), and signing (``secret-key-files`` on built and added
paths, ``nix store sign``, ``nix path-info --sigs``, ``nix store verify
--sigs-needed`` with the public key).  Outputs and final stores must agree.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from conftest import needs_nix, needs_root
from lib.differential import cli, run_both
from lib.accounts import ensure_user
from lib.gcscen import assert_same, unordered, write
from lib.narlib import nix32
from lib.nixenv import new_root
from lib.samplestore import populate

pytestmark = [needs_nix, needs_root, pytest.mark.interop]

USER = "nwtest-maint"


@pytest.fixture(scope="module")
def user():
    return ensure_user(USER)


@pytest.fixture
def root():
    path = new_root("nwmaint-")
    yield path
    subprocess.run(["rm", "-rf", path])


def _corrupt(real_file: str, data: bytes) -> None:
    st = os.lstat(real_file)
    os.chmod(real_file, 0o644)
    with open(real_file, "wb") as f:
        f.write(data)
    os.chmod(real_file, stat.S_IMODE(st.st_mode))
    os.utime(real_file, (st.st_atime, st.st_mtime))


def _rmtree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        for d, _, _ in os.walk(path):
            os.chmod(d, 0o755)
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _damaged(env, rebuildable=False):
    """The sample store with a corrupted file in an added path (which cannot
    be repaired), a vanished path and, with ``rebuildable``, a corrupted
    built output (which repair rebuilds from its deriver)."""
    p = populate(env)
    _corrupt(p["file"], b"tampered\n")
    if rebuildable:
        _corrupt(p["dep_out"], b"not the dependency\n")
    _rmtree(p["top_dev"])
    return p


VERIFY_STEPS = {
    "verify": cli("nix-store", "--verify"),
    "check_contents": cli("nix-store", "--verify", "--check-contents"),
    "check_contents_again": cli("nix-store", "--verify", "--check-contents"),
    "nix_store_verify": unordered(cli("nix", "store", "verify", "--no-trust", "{file}", "{dir}")),
    "repair_user": cli("nix-store", "--verify", "--check-contents", "--repair", user=USER),
    "check_user": cli("nix-store", "--verify", "--check-contents", user=USER),
    "repair_root": cli("nix-store", "--verify", "--check-contents", "--repair"),
    "after_repair": cli("nix-store", "--verify", "--check-contents"),
    "dep_out_text": lambda env, ctx: open(ctx["dep_out"]).read(),
}


def test_verify_and_repair(root, user):
    r = run_both(root, _damaged, VERIFY_STEPS)
    assert_same(r, *VERIFY_STEPS)
    got = r["nixwarden"]
    ctx = got["_ctx"]
    assert got["verify"][0] == 0
    assert "path '%s' disappeared, removing from database..." % ctx["top_dev"] in \
        got["verify"][2]
    code, _, err = got["check_contents"]
    assert code == 1
    assert f"path '{ctx['file']}' was modified! expected hash" in err
    assert "warning: not all store errors were fixed" in err
    assert got["nix_store_verify"][0] != 0
    assert got["repair_user"][0] == 1
    assert "you are not privileged to repair paths" in got["repair_user"][2]
    assert got["check_user"][0] == 1  # checking is for everybody
    assert got["repair_root"][0] == 1
    assert f"error: cannot repair path '{ctx['file']}'" in got["repair_root"][2]
    assert ctx["top_dev"] not in got["_infos"]


def test_verify_repair_rebuilds_outputs(root, user):
    r = run_both(root, lambda env: _damaged(env, rebuildable=True), VERIFY_STEPS)
    assert_same(r, *VERIFY_STEPS)
    assert r["nixwarden"]["dep_out_text"] == "dependency\n"


def _dups(env):
    """Five directories sharing most of their files, plus two equal single files."""
    home = f"{env.root}/home/opt"
    srcs = []
    for i in range(5):
        d = f"{home}/d{i}"
        write(f"{d}/common", "common content\n" * 500)
        write(f"{d}/sub/big", "B" * 200_000)
        write(f"{d}/exe", "#!/bin/sh\necho same\n", mode=0o755)
        write(f"{d}/own", f"own {i}\n")
        os.symlink("common", f"{d}/link")
        write(f"{d}/empty", "")
        srcs.append(d)
    write(f"{home}/f1/x", "single file\n" * 100)
    write(f"{home}/f2/x", "single file\n" * 100)
    out = env.run("nix-store", "--add", *srcs, f"{home}/f1/x", remote="local")
    paths = out.stdout.decode().split()
    return {f"p{i}": p for i, p in enumerate(paths)}


def _layout(env, ctx):
    """The .links entries and, for every regular file in the store, its link
    count and the .links entry sharing its inode."""
    store = env.store_dir
    links = f"{store}/.links"
    by_ino = {os.lstat(f"{links}/{n}").st_ino: n for n in os.listdir(links)}
    files = {}
    for top in os.listdir(store):
        if top.startswith("."):
            continue
        for d, _, names in os.walk(f"{store}/{top}"):
            for n in names:
                st = os.lstat(f"{d}/{n}")
                if stat.S_ISREG(st.st_mode):
                    files[os.path.relpath(f"{d}/{n}", store)] = (st.st_nlink,
                                                                  by_ino.get(st.st_ino))
        st = os.lstat(f"{store}/{top}")
        if stat.S_ISREG(st.st_mode):
            files[top] = (st.st_nlink, by_ino.get(st.st_ino))
    return sorted(by_ino.values()), files


def test_optimise(root):
    steps = {
        "optimise": cli("nix-store", "--optimise"),
        "layout": _layout,
        "again": cli("nix-store", "--optimise"),
        "nix_store_optimise": cli("nix", "store", "optimise"),
        "layout_again": _layout,
        "gc": cli("nix-store", "--gc"),
        "links_after_gc": lambda env, ctx: sorted(os.listdir(f"{env.store_dir}/.links")),
    }
    r = run_both(root, _dups, steps)
    assert_same(r, *steps)
    got = r["nixwarden"]
    err = got["optimise"][2]
    assert got["optimise"][0] == 0
    assert "MiB freed by hard-linking" in err and "0.00 MiB freed" not in err
    assert "0.00 MiB freed by hard-linking 0 files" in got["again"][2]
    names, files = got["layout"]
    assert names and all(len(n) == 52 for n in names)
    assert max(n for n, _ in files.values()) == 6  # 5 copies + the .links entry
    assert got["links_after_gc"] == []


@pytest.fixture(scope="module")
def keys():
    d = new_root("nwkeys-")
    for name in ("k1", "k2"):
        subprocess.run(["nix-store", "--generate-binary-cache-key", f"{name}.example",
                        f"{d}/{name}.sec", f"{d}/{name}.pub"], check=True)
    os.chmod(d, 0o755)
    os.chmod(f"{d}/k2.sec", 0o644)  # readable by the untrusted account
    yield {n: open(f"{d}/{n}").read().strip() for n in os.listdir(d)} | {"dir": d}
    shutil.rmtree(d)


def _check_sig(info: dict, sig: str, keys: dict) -> str:
    """Check one ``name:base64`` signature over Nix's path fingerprint with
    the public keys, independently of both daemons; returns the key name."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    name, _, data = sig.partition(":")
    pub = {k.partition(":")[0]: k.partition(":")[2]
           for k in (keys["k1.pub"], keys["k2.pub"])}[name]
    algo, _, digest = info["narHash"].partition("-")  # SRI in 2.8's --json
    nar_hash = f"{algo}:{nix32(base64.b64decode(digest))}"
    fingerprint = ";".join(["1", info["path"], nar_hash, str(info["narSize"]),
                            ",".join(sorted(info["references"]))])
    Ed25519PublicKey.from_public_bytes(base64.b64decode(pub)).verify(
        base64.b64decode(data), fingerprint.encode())
    return name


def test_signing(root, user, keys):
    expr = ('builtins.derivation { name = "signed"; system = builtins.currentSystem;'
            ' builder = "/bin/sh"; args = [ "-c" "echo signed > $out" ]; }')

    def prepare(env):
        write(f"{env.root}/home/s.nix", expr)
        write(f"{env.root}/home/added.txt", "added through the daemon\n")
        p = populate(env)  # paths made before secret-key-files mattered: unsigned
        return p

    def remember(key, step):
        def run(env, ctx):
            result = step(env, ctx)
            ctx[key] = result[1].strip()
            return result
        return run

    k1 = keys["k1.pub"]
    k2 = keys["k2.pub"]
    kdir = keys["dir"]
    steps = {
        "build": remember("built", cli("nix-build", "--no-out-link", "{root}/home/s.nix")),
        "add": remember("added", cli("nix-store", "--add", "{root}/home/added.txt")),
        "sigs": cli("nix", "path-info", "--sigs", "{built}", "{added}", "{file}"),
        "verify_k1": unordered(cli("nix", "store", "verify", "--sigs-needed", "1",
                         "--trusted-public-keys", k1, "{built}", "{added}")),
        "verify_k2": unordered(cli("nix", "store", "verify", "--sigs-needed", "1",
                         "--trusted-public-keys", k2, "{built}")),
        "verify_unsigned": unordered(cli("nix", "store", "verify", "--sigs-needed", "1",
                               "--trusted-public-keys", k1, "{file}")),
        "sign_user": cli("nix", "store", "sign", "--key-file", f"{kdir}/k2.sec", "{file}",
                         user=USER),
        "sign_root": cli("nix", "store", "sign", "--key-file", f"{kdir}/k2.sec", "{file}",
                         "{built}"),
        "sign_again": cli("nix", "store", "sign", "--key-file", f"{kdir}/k2.sec", "{file}"),
        "sigs_after": cli("nix", "path-info", "--sigs", "{built}", "{file}"),
        "verify_file_k2": unordered(cli("nix", "store", "verify", "--sigs-needed", "1",
                              "--trusted-public-keys", k2, "{file}")),
        "verify_built_both": unordered(cli("nix", "store", "verify", "--sigs-needed", "2",
                                 "--trusted-public-keys", f"{k1} {k2}", "{built}")),
        "verify_local": unordered(cli("nix", "store", "verify", "--sigs-needed", "2",
                            "--trusted-public-keys", f"{k1} {k2}", "{built}")),
    }
    conf = f"secret-key-files = {kdir}/k1.sec\n"
    r = run_both(root, prepare, steps, extra_conf=conf)
    assert_same(r, *steps)
    got = r["nixwarden"]
    ctx = got["_ctx"]
    sigs = got["sigs"][1]
    # Nix 2.8 signs what it builds, not content-addressed paths added to it
    assert sigs.count("k1.example:") == 1, sigs
    assert got["verify_k1"][0] == 0
    info = got["_infos"][ctx["built"]]
    assert [_check_sig(info, sig, keys) for sig in sorted(info["signatures"])] == [
        "k1.example", "k2.example"]
    assert got["sign_user"][0] != 0
    assert "you are not privileged to add signatures" in got["sign_user"][2]
    assert got["sign_root"][0] == 0
    assert got["verify_file_k2"][0] == 0 and got["verify_built_both"][0] == 0
    assert len(got["_infos"][ctx["built"]]["signatures"]) == 2
