"""Substitution from binary caches through the daemon (issue 6), differential.

Binary caches are made by the real Nix (``lib/cacheworld.py``: ``nix copy
--to file://...`` of a built closure ``top`` -> ``mid`` -> ``dep`` and a
content-addressed file, signed with a key from
``nix-store --generate-binary-cache-key``, one cache per compression xz,
bzip2, zstd and none, plus unsigned / other-key / damaged-signature ones)
and served by ``file://`` and by a loopback HTTP server started here
(``tests/store/cacheserver.py``).  Every scenario runs on the real
nix-daemon and then on nixwarden at the same absolute root, with the same
nix.conf (``substituters``, ``trusted-public-keys``, ``require-sigs``,
``trusted-substituters``), and every step's exit code, stdout and stderr
must be the same (ANSI colours and registration times aside), as must the
final store (path infos, file metadata, ``nix-store --verify``).  The
derivations' builders leave a marker file: substituting must never build.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from conftest import needs_nix, needs_root
from lib.accounts import ensure_user
from lib.cacheworld import COMPRESSIONS, module_fixtures
from lib.differential import cli, run_both
from lib.wclient import DaemonError, WClient

pytestmark = [needs_nix, needs_root, pytest.mark.interop]

ROOT = f"/tmp/nwt-subst-{os.getpid()}"
USER = "nwtest-subst"


world, server = module_fixtures(ROOT)


@pytest.fixture(scope="module")
def user():
    return ensure_user(USER)


# --- helpers ------------------------------------------------------------------------


#: Lines that depend on the daemon's process structure, not on substitution:
#: nix-daemon's per-connection processes leave temporary-roots files behind.
NOISE = re.compile(r"^removing stale temporary roots file .*\n", re.M)


def norm(value, loose: bool = False):
    """Comparable form of a step's value: no ANSI colours, no registration
    times; ``loose``: of stderr only its last line (the final error)."""
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], str):
        code, out, err = value
        err = NOISE.sub("", re.sub(r"\x1b\[[0-9;]*m", "", err))
        if loose:
            err = err.rstrip("\n").rsplit("\n", 1)[-1]
        return code, _norm_json(out), err
    return value


def _norm_json(text: str):
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if isinstance(data, list):
        for item in data:
            if isinstance(item, dict):
                item.pop("registrationTime", None)
    return data


def compare(results: dict, keys, loose=()) -> dict:
    """Assert every step and the final stores agree; return nixwarden's values.

    Steps in ``loose`` (download failures, whose retry delays are random and
    whose intermediate messages name the cache in nixwarden) are compared by
    exit code, stdout and the last line of stderr."""
    a, b = results["nix-daemon"], results["nixwarden"]
    for key in keys:
        x, y = norm(a[key], key in loose), norm(b[key], key in loose)
        assert y == x, (f"step {key!r} differs:\n nix-daemon: {x!r:.3000}\n"
                        f" nixwarden:  {y!r:.3000}")
    assert b["_infos"] == a["_infos"]
    assert b["_store_entries"] == a["_store_entries"]
    assert b["_metadata"].keys() == a["_metadata"].keys()
    assert b["_verify"] == a["_verify"]
    return {k: norm(v) for k, v in b.items() if k in keys}


def full(results: dict, key: str):
    """nixwarden's complete value of a step (stderr not shortened)."""
    return norm(results["nixwarden"][key])


def marks(world):
    def step(env, ctx):
        return world.marks()
    return step


def fresh(world, then=None):
    """A ``prepare`` for run_both: no builder markers left, then ``then(env)``."""
    def prepare(env):
        world.clear_marks()
        return then(env) if then else {}
    return prepare


def clear_marks(world):
    def step(env, ctx):
        world.clear_marks()
        return None
    return step


def dry_run_listing(err: str) -> str:
    return err.split("copying path")[0]


# --- wire-level queries (worker protocol 1.34, as Nix 2.8 speaks) -------------------


def _subst_infos(c: WClient, paths) -> list:
    paths = list(paths)
    c.op(30, c.u64(len(paths)) + b"".join(c.s(p) + c.s("") for p in paths))
    out = []
    for _ in range(c.r_u64()):
        out.append((c.r_str(), c.r_str(), sorted(c.r_strs()), c.r_u64(), c.r_u64()))
    return sorted(out)


def _missing(c: WClient, targets) -> tuple:
    c.op(40, c.strs(targets))
    return (sorted(c.r_strs()), sorted(c.r_strs()), sorted(c.r_strs()), c.r_u64(), c.r_u64())


def _connect(env, **kw) -> WClient:
    """A wire client; retried: nix-daemon's first connections on a fresh state
    dir race to create its directories (the readiness probe's and ours)."""
    for attempt in range(5):
        try:
            return WClient(env.socket_path, minor=34, **kw)
        except (ConnectionResetError, EOFError, BrokenPipeError):
            if attempt == 4:
                raise
            time.sleep(0.2)


def _try(fn):
    try:
        return ("ok", fn())
    except DaemonError as e:
        return ("error", re.sub(r"\x1b\[[0-9;]*m", "", str(e)))


def wire_queries(world, url: str):
    """The substitution queries of the protocol, before anything is fetched."""
    def step(env, ctx):
        absent = os.path.join(world.store, "0" * 32 + "-absent")
        c = _connect(env)
        try:
            out = {
                "infos": _try(lambda: _subst_infos(c, [*world.closure, world.ca, absent])),
                "info1": _try(lambda: (c.op(21, c.s(world.dep)), c.r_u64(), c.r_str(),
                                       c.r_strs(), c.r_u64(), c.r_u64())[1:]),
                "paths-no-mass-query": _try(lambda: (c.op(32, c.strs(world.closure)),
                                                     c.r_strs())[1]),
                "has-substitutes": _try(lambda: (c.op(3, c.s(world.top)), c.r_u64())[1]),
                "valid-no-subst": _try(lambda: c.query_valid_paths(world.closure, False)),
                "missing": _try(lambda: _missing(c, [world.top, absent])),
                "missing-drv": _try(lambda: _missing(c, [world.drv["top"] + "!out"])),
            }
        finally:
            c.close()
        # Nix 2.8 computes a connection's substituters once, on first use: a
        # second SetOptions would not change them, so use a new connection.
        c = _connect(env, send_set_options=False)
        try:
            c.set_options([("substituters", url + "?want-mass-query=true")])
            out["paths-mass-query"] = _try(lambda: sorted(
                (c.op(32, c.strs([*world.closure, absent])), c.r_strs())[1]))
            out["has-substitutes-mass"] = _try(
                lambda: (c.op(3, c.s(world.top)), c.r_u64())[1])
            out["valid-after"] = _try(lambda: c.query_valid_paths(world.closure, False))
            return out
        finally:
            c.close()
    return step


def wire_fetch(world):
    """EnsurePath and QueryValidPaths(substitute) fetch what is missing."""
    def step(env, ctx):
        c = _connect(env)
        try:
            ensure = _try(lambda: (c.op(10, c.s(world.dep)), c.r_u64())[1])
            valid = _try(lambda: sorted(c.query_valid_paths([world.mid, world.top], True)))
            return ensure, valid
        finally:
            c.close()
    return step


# --- fetching from each kind of cache -------------------------------------------------

PI = ("nix", "path-info", "--json", "-r")


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_fetch_closure_from_cache(world, server, compression):
    """Realise, dry-run, queries, EnsurePath and nix-build against caches of
    each compression, over HTTP (nix.conf) and file:// (--option)."""
    http, fileurl = f"{server}/{compression}", world.file_url(compression)
    t, m, d = world.top, world.mid, world.dep
    steps = {
        "wire-queries": wire_queries(world, http),
        "dry-run": cli("nix-store", "-r", "--dry-run", t),
        "realise": cli("nix-store", "-r", t),
        "path-info": cli(*PI, t),
        "marks-1": marks(world),
        "delete": cli("nix-store", "--delete", t, m, d),
        "wire-fetch": wire_fetch(world),
        "delete-2": cli("nix-store", "--delete", t, m, d),
        "dry-run-build": cli("nix-build", world.expr, "-A", "top", "--no-out-link",
                             "--dry-run", "--option", "substituters", fileurl),
        "nix-build-file": cli("nix-build", world.expr, "-A", "top", "--no-out-link",
                              "--option", "substituters", fileurl),
        "path-info-2": cli(*PI, t),
        "path-info-cache": cli(*PI, "--store", fileurl, t),
        "marks-2": marks(world),
    }
    conf = f"substituters = {http}\ntrusted-public-keys = {world.pk}\n"
    got = compare(run_both(ROOT, fresh(world), steps, extra_conf=conf), steps)
    assert got["marks-1"] == got["marks-2"] == []  # nothing was built
    code, out, err = got["realise"]
    assert code == 0 and out == t + "\n"
    assert dry_run_listing(err).startswith("these 3 paths will be fetched (")
    for p in (t, m, d):
        assert f"copying path '{p}' from '{http}'..." in err
    assert got["dry-run"][2] == dry_run_listing(err)
    assert got["nix-build-file"][:2] == (0, t + "\n")
    assert f"copying path '{t}' from '{fileurl}'" in got["nix-build-file"][2]
    infos = {i["path"]: i for i in got["path-info"][1]}
    assert sorted(infos) == world.closure
    for p, info in infos.items():
        want = world.signed_infos[p]
        assert info["narHash"] == want["narHash"] and info["narSize"] == want["narSize"]
        assert info["deriver"] == want["deriver"]
        assert info["signatures"] == want["signatures"] and info["signatures"]
        assert "ultimate" not in info
    assert got["path-info-2"] == got["path-info"]
    in_cache = {i["path"]: i for i in got["path-info-cache"][1]}
    assert sorted(in_cache) == world.closure
    assert all(in_cache[p]["narHash"] == infos[p]["narHash"] for p in infos)
    wire = got["wire-queries"]
    assert [i[0] for i in wire["infos"][1]] == sorted([*world.closure, world.ca])
    assert wire["paths-no-mass-query"] == ("ok", [])
    assert wire["paths-mass-query"] == ("ok", sorted([*world.closure]))
    assert wire["has-substitutes"] == ("ok", 0) and wire["has-substitutes-mass"] == ("ok", 1)
    assert wire["valid-no-subst"] == wire["valid-after"] == ("ok", [])
    assert wire["missing"][1][1] == world.closure
    assert wire["missing"][1][2] == [os.path.join(world.store, "0" * 32 + "-absent")]
    assert got["wire-fetch"] == (("ok", 1), ("ok", sorted([t, m])))


# --- signatures -------------------------------------------------------------------------


def _opt(url, *more):
    return ("--option", "substituters", " ".join((url,) + more))


def test_signature_policy(world, server):
    """Unsigned, wrongly signed and untrusted-key caches are refused with
    Nix's warning and error; CA paths need no signature; the next cache is
    used; ``nix copy --from`` into the daemon checks signatures too."""
    t, fu = world.top, world.file_url
    steps = {
        "unsigned": cli("nix-store", "-r", t, *_opt(fu("unsigned"))),
        "otherkey": cli("nix-store", "-r", t, *_opt(f"{server}/otherkey")),
        "badsig": cli("nix-store", "-r", t, *_opt(fu("badsig"))),
        "untrusted-key": cli("nix-store", "-r", t, *_opt(fu("xz")), "--option",
                             "trusted-public-keys", world.pk2),
        "ca-unsigned": cli("nix-store", "-r", world.ca, *_opt(fu("unsigned"))),
        "copy-unsigned": cli("nix", "copy", "--from", fu("unsigned"), t),
        "copy-otherkey": cli("nix", "copy", "--from", fu("otherkey"), t),
        "valid-after-refusals": cli("nix-store", "--check-validity", t),
        "unsigned-then-second": cli("nix-store", "-r", world.mid,
                                    *_opt(fu("unsigned"), f"{server}/second")),
        "copy-signed": cli("nix", "copy", "--from", fu("xz"), t),
        "path-info": cli(*PI, t, world.ca),
        "marks": marks(world),
    }
    conf = f"substituters =\ntrusted-public-keys = {world.pk}\nrequire-sigs = true\n"
    got = compare(run_both(ROOT, fresh(world), steps, extra_conf=conf), steps)
    for key, url in (("unsigned", fu("unsigned")), ("otherkey", f"{server}/otherkey"),
                     ("badsig", fu("badsig")), ("untrusted-key", fu("xz"))):
        code, out, err = got[key]
        assert code != 0 and out == ""
        assert (f"warning: the substitute for '{t}' from '{url}' is not signed by any "
                "of the keys in 'trusted-public-keys'") in err
        assert err.endswith(f"error: build of '{t}' failed\n")
    assert got["ca-unsigned"][:2] == (0, world.ca + "\n")
    assert got["copy-unsigned"][0] != 0 and "lacks a valid signature" in got["copy-unsigned"][2]
    assert got["valid-after-refusals"][0] != 0
    assert got["unsigned-then-second"][:2] == (0, world.mid + "\n")
    assert got["copy-signed"][0] == 0
    assert got["marks"] == []


def test_malformed_signature_aborts_like_nix(world, server):
    steps = {"shortsig": cli("nix-store", "-r", world.top, *_opt(world.file_url("shortsig"))),
             "valid": cli("nix-store", "--check-validity", world.dep)}
    conf = f"substituters =\ntrusted-public-keys = {world.pk}\n"
    got = compare(run_both(ROOT, fresh(world), steps, extra_conf=conf), steps)
    assert got["shortsig"][0] == 1 and got["valid"][0] != 0


def test_require_sigs_off(world, server):
    """With ``require-sigs = false`` unsigned and wrongly signed caches are used."""
    steps = {
        "unsigned": cli("nix-store", "-r", world.mid, *_opt(world.file_url("unsigned"))),
        "otherkey": cli("nix-store", "-r", world.top, *_opt(f"{server}/otherkey")),
        "path-info": cli(*PI, world.top),
    }
    conf = f"substituters =\ntrusted-public-keys = {world.pk}\nrequire-sigs = false\n"
    got = compare(run_both(ROOT, fresh(world), steps, extra_conf=conf), steps)
    assert got["unsigned"][0] == 0 and got["otherkey"][0] == 0


# --- the narinfo disk cache: --offline, --refresh, TTLs --------------------------------


def test_negative_ttl_offline_refresh(world, server):
    """A negative look-up is remembered (narinfo-cache-negative-ttl): the path
    added to the cache afterwards is not seen; ``--offline`` does not fetch;
    ``nix --refresh`` does not reach the daemon in Nix 2.8; a TTL of 0 does."""
    growing = world.cache("growing")
    url = f"{server}/growing"

    def prepare(env):
        world.derived_cache("growing", paths=[])
        return {}
    prepare = fresh(world, prepare)

    def publish(env, ctx):
        world.derived_cache("growing", paths=[world.dep])
        return sorted(os.listdir(growing))

    d = world.dep
    steps = {
        "before": cli("nix-store", "-r", d),
        "publish": publish,
        "cached-negative": cli("nix-store", "-r", d),
        "dry-run-cached": cli("nix-store", "-r", "--dry-run", d),
        "offline": cli("nix", "build", "--offline", "--no-link", d),
        "refresh": cli("nix", "build", "--refresh", "--no-link", d),
        "ttl-0": cli("nix-store", "-r", d, "--option", "narinfo-cache-negative-ttl", "0"),
        "valid": cli("nix-store", "--check-validity", d),
    }
    conf = f"substituters = {url}\ntrusted-public-keys = {world.pk}\n"
    got = compare(run_both(ROOT, prepare, steps, extra_conf=conf), steps)
    assert got["before"][0] != 0 and got["cached-negative"][0] != 0
    assert f"error: build of '{d}' failed" in got["cached-negative"][2]
    assert got["offline"][0] != 0
    # Nix 2.8's `nix --refresh` sets the TTLs in the client only (not marked
    # as overridden, so not sent): the daemon's negative entry still holds.
    assert got["refresh"][0] != 0
    assert got["ttl-0"][:2] == (0, d + "\n")
    assert got["valid"][0] == 0


# --- who may add substituters ---------------------------------------------------------


def test_untrusted_user_substituters(world, server, user):
    """An untrusted client's substituter is used only if it is in
    trusted-substituters; others are ignored with Nix's warning."""
    allowed, other = f"{server}/xz", f"{server}/zstd"
    U = {"user": USER}
    steps = {
        "u-not-allowed": cli("nix-store", "-r", world.mid, *_opt(other), **U),
        "u-not-allowed-valid": cli("nix-store", "--check-validity", world.mid),
        "u-allowed": cli("nix-store", "-r", world.mid, *_opt(allowed), **U),
        "u-both": cli("nix-store", "-r", world.top, *_opt(other, allowed), **U),
        "path-info": cli(*PI, world.top),
        "marks": marks(world),
    }
    conf = (f"substituters =\ntrusted-substituters = {allowed}\n"
            f"trusted-public-keys = {world.pk}\n")
    got = compare(run_both(ROOT, fresh(world), steps, extra_conf=conf), steps)
    code, _, err = got["u-not-allowed"]
    assert code != 0 and f"ignoring untrusted substituter '{other}'" in err
    assert got["u-not-allowed-valid"][0] != 0
    assert got["u-allowed"][:2] == (0, world.mid + "\n")
    assert f"copying path '{world.mid}' from '{allowed}'" in got["u-allowed"][2]
    assert got["u-both"][0] == 0 and f"ignoring untrusted substituter '{other}'" in \
        got["u-both"][2]
    assert got["marks"] == []


# --- fallback ------------------------------------------------------------------------------


def test_fallback_builds_when_cache_fails(world, server):
    """A cache whose NARs fail (HTTP 500): without ``--fallback`` the build
    fails with Nix's message and nothing is built; with it, the derivation
    is built from source."""
    world.derived_cache("nar500", nar_prefix=f"{server}/fault-500/xz/nar/")
    url = f"{server}/nar500"
    steps = {
        "clear": clear_marks(world),
        "no-fallback": cli("nix-build", world.expr, "-A", "dep", "--no-out-link"),
        "marks-1": marks(world),
        "fallback": cli("nix-build", world.expr, "-A", "dep", "--no-out-link", "--fallback"),
        "marks-2": marks(world),
        "clear-2": clear_marks(world),
    }
    conf = (f"substituters = {url}\ntrusted-public-keys = {world.pk}\n"
            "download-attempts = 2\n")
    results = run_both(ROOT, fresh(world), steps, extra_conf=conf)
    got = compare(results, steps, loose={"no-fallback", "fallback"})
    code, out, err = full(results, "no-fallback")
    assert code != 0 and "try '--fallback' to build derivation from source" in err
    assert f"substitution of '{world.dep}' from '{url}' failed" in err
    assert "HTTP error 500" in err
    assert got["marks-1"] == []
    assert got["fallback"][:2] == (0, world.dep + "\n")
    assert got["marks-2"] == ["dep"]
