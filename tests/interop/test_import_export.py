"""Moving store paths in and out: export/import, nix copy, closures (issue 3).

A source store at the same absolute store directory is built once with
the real Nix (``samplestore``: sources, built input-addressed outputs with
references, derivations), signed, copied into a file:// binary cache, kept
as a second local store (``local?store=…&real=…``) and exported with
``nix-store --export``.  Then the target root is wiped and, for
nix-daemon and for nixwarden in turn, filled through the daemon by real
clients (``nix-store --import``, ``nix copy --from file://…``, ``nix copy
--from local?…``, closure copies) and by the wire ops ImportPaths and
ExportPath; a binary cache is made from it with ``nix copy --from
unix://…``.  Results, path infos (signatures, deriver, references, CA)
and the exported bytes must be the same, and the nixwarden store must
verify.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from conftest import needs_nix
from lib.addclient import AddClient, export_record, import_stream
from lib.differential import cli, run_both
from lib.nixenv import NixEnv
from lib.narlib import input_path, nar
from lib.samplestore import populate
from lib.wclient import DaemonError

pytestmark = [needs_nix, pytest.mark.interop]


@pytest.fixture(scope="module")
def source():
    """Build the source store at ROOT, then keep what the runs need outside it."""
    root = f"/tmp/nwtest-ie-{os.getpid()}"
    side = root + "-side"
    for d in (root, side):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(side)
    env = NixEnv(root)
    paths = populate(env)

    def local(*args, input=None):
        return env.run(*args, remote="local", input=input).stdout

    sk, pk = os.path.join(side, "sk"), os.path.join(side, "pk")
    local("nix-store", "--generate-binary-cache-key", "nwtest-key-1", sk, pk)
    local("nix", "store", "sign", "--key-file", sk, "-r", paths["top_out"])
    cache = os.path.join(side, "cache")
    local("nix", "copy", "--to", f"file://{cache}?compression=none",
          *(paths[k] for k in ("file", "dir", "top_out", "top_dev")))
    closure = local("nix-store", "-qR", paths["unbuilt_drv"]).decode().split()
    with open(os.path.join(side, "drvs.export"), "wb") as f:
        f.write(local("nix-store", "--export", *closure))
    want_export = local("nix-store", "--export", paths["top_out"])
    shutil.copytree(root, side + "/src", symlinks=True)
    src = side + "/src"
    ctx = dict(paths, cache=f"file://{cache}", side=side,
               localsrc=(f"local?store={root}/store&real={src}/store&state={src}/var/nix"
                         f"&log={src}/var/log/nix"),
               pk=open(pk).read().strip(), sk=sk)
    shutil.rmtree(root, ignore_errors=True)
    yield root, ctx, want_export
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(side, ignore_errors=True)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def import_file(name):
    def step(env, ctx):
        r = env.run("nix-store", "--import", input=_read(os.path.join(ctx["side"], name)),
                    check=False)
        return r.returncode, r.stdout.decode(), r.stderr.decode()
    return step


def narinfos(env, ctx):
    out = os.path.join(ctx["root"], "outcache")
    return {n: _read(os.path.join(out, n)).decode()
            for n in sorted(os.listdir(out)) if n.endswith(".narinfo")}


def export_hash(env, ctx):
    r = env.run("nix-store", "--export", ctx["top_out"])
    return hashlib.sha256(r.stdout).hexdigest()


def wc_export(env, ctx):
    c = AddClient(env.socket_path)
    data = c.export_path(ctx["top_out"])
    ok = c.is_valid_path(ctx["top_out"])
    return hashlib.sha256(data).hexdigest(), ok


def _records(ctx, tag):
    store = ctx["store"]
    a = input_path(store, f"imp-a-{tag}", tag)
    b = input_path(store, f"imp-b-{tag}", tag)
    drv = input_path(store, f"imp-b-{tag}.drv", tag)
    return a, b, [export_record(nar(b"imported a"), a),
                  export_record(nar({"ref": f"{a}".encode(), "self": f"{b}".encode()}), b,
                                refs=[a, b], deriver=drv)]


def wc_import(env, ctx):
    c = AddClient(env.socket_path)
    a, b, recs = _records(ctx, "ok")
    got = c.import_paths(import_stream(recs))
    infos = [c.query_path_info(p) for p in (a, b)]
    for i in infos:
        i.pop("registrationTime")
    return got, infos, c.is_valid_path(a)


def wc_import_error(kind):
    def step(env, ctx):
        c = AddClient(env.socket_path)
        a, b, recs = _records(ctx, kind)
        if kind == "magic":
            recs = [recs[0].replace(c.u64(0x4558494E), c.u64(0x1234), 1)]
        elif kind == "ref-invalid":
            recs = [recs[1]]
        elif kind == "nar":
            recs = [b"\x0d" + recs[0][1:]]
        try:
            value = ("ok", c.import_paths(import_stream(recs)))
        except DaemonError as exc:
            value = ("DaemonError", _norm(str(exc)))
        except (EOFError, OSError) as exc:
            value = ("closed", type(exc).__name__)
        return value, c.is_valid_path(a) if value[0] != "closed" else None
    return step


def _norm(text: str) -> str:
    import re
    return re.sub(r"\x1b\[[0-9;]*m", "", text).removeprefix("error: ")


def dumps(env, ctx):
    return {k: hashlib.sha256(env.run("nix-store", "--dump", ctx[k]).stdout).hexdigest()
            for k in ("top_out", "dep_out", "file", "dir", "top_dev")}


COPY = ("nix", "copy")
STEPS = {
    "copy-from-cache-unsigned": cli(*COPY, "--from", "{cache}", "--to", "unix://{socket}",
                                    "{top_dev}"),
    "copy-from-local-no-check-sigs": cli(*COPY, "--no-check-sigs", "--from", "{localsrc}",
                                         "--to", "daemon", "{top_dev}"),
    "copy-closure-from-cache-signed": cli(*COPY, "--from", "{cache}", "--to",
                                          "unix://{socket}", "{top_out}"),
    "import-drv-closure": import_file("drvs.export"),
    "import-drv-closure-again": import_file("drvs.export"),
    "copy-from-local-store": cli(*COPY, "--from", "{localsrc}", "--to", "unix://{socket}",
                                 "{file}", "{dir}"),
    "copy-to-file-cache": cli(*COPY, "--from", "unix://{socket}", "--to",
                              "file://{root}/outcache?compression=none", "{top_out}",
                              "{file}", "{dir}"),
    "narinfos": narinfos,
    "export-via-daemon": export_hash,
    "wc-export": wc_export,
    "wc-import": wc_import,
    "wc-import-bad-magic": wc_import_error("magic"),
    "wc-import-ref-invalid": wc_import_error("ref-invalid"),
    "query-outputs": cli("nix-store", "-q", "--outputs", "{unbuilt_drv}"),
    "dump": dumps,
}

XFAIL: dict[str, str] = {}


@pytest.fixture(scope="module")
def results(source):
    root, ctx, _ = source
    out = run_both(root, lambda env: ctx, STEPS,
                   extra_conf=f"trusted-public-keys = {ctx['pk']}\n")
    if os.environ.get("NWTEST_DUMP"):
        import pickle
        with open(os.environ["NWTEST_DUMP"], "wb") as f:
            pickle.dump(out, f)
    return out


@pytest.mark.parametrize("key", [
    pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=XFAIL[k])) if k in XFAIL else k
    for k in STEPS])
def test_step_same_as_nix_daemon(results, key):
    assert results["nixwarden"][key] == results["nix-daemon"][key]


def test_not_vacuous(results, source):
    real = results["nix-daemon"]
    assert real["import-drv-closure"][0] == 0
    assert real["import-drv-closure"][1].count("\n") == 3
    assert real["copy-from-cache-unsigned"][0] != 0
    assert "lacks a valid signature" in real["copy-from-cache-unsigned"][2]
    assert real["copy-closure-from-cache-signed"][0] == 0
    assert real["copy-to-file-cache"][0] == 0 and len(real["narinfos"]) >= 4
    assert any("Sig: nwtest-key-1:" in t for t in real["narinfos"].values())
    assert real["wc-import"][0] and real["wc-import-bad-magic"][0][0] != "ok"
    infos = real["_infos"]
    assert infos[source[1]["top_out"]]["signatures"]
    assert infos[source[1]["top_out"]]["deriver"] == source[1]["top_drv"]


def test_same_path_infos(results):
    want, got = results["nix-daemon"]["_infos"], results["nixwarden"]["_infos"]
    assert sorted(got) == sorted(want)
    for p in want:
        assert got[p] == want[p], p


def test_export_bytes_equal_the_source_export(results, source):
    want = hashlib.sha256(source[2]).hexdigest()
    assert results["nixwarden"]["export-via-daemon"] == want
    single = hashlib.sha256(source[2][8:-8]).hexdigest()  # ExportPath: no 1 ... 0
    assert results["nixwarden"]["wc-export"] == (single, True)


def test_nixwarden_store_verifies_and_is_clean(results):
    got = results["nixwarden"]
    assert got["_verify"][0] == 0, got["_verify"][1]
    assert not [e for e in got["_store_entries"] if "nixwarden-tmp" in e]
