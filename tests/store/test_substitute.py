"""Substitution from binary caches made by the real Nix (issue 6), no mocks.

A scratch source store (logical dir ``<tmp>/src/store``) is filled by the
real Nix (two built, input-addressed paths ``top`` -> ``dep`` plus a
content-addressed ``nix-store --add`` file) and copied with
``nix copy --to file://...`` into caches: one per compression (signed with
a key from ``nix-store --generate-binary-cache-key``), an unsigned one, one
signed by another key, and one with damaged signatures.  They are served
by ``file://`` and by a loopback HTTP server (``cacheserver.py``, also the
fault server).  Each test substitutes into a fresh diverted store with the
same logical dir (``Substituters`` + a real ``StoreWriter``) and checks
the result with the real ``nix-store --verify --check-contents``.

A cache of another store dir (``/fnord/store``) is made by the real Nix as
in Nix 2.8's tests/fetchurl.sh (``nix --store file://...?store=/fnord/store
store add-file``): its flat content-addressed files can be substituted as
our paths when their content address is known (``cas``), and not otherwise.
"""

from __future__ import annotations

import json
import os
import types
import shutil
import subprocess

import pytest

from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.hashes import Hash, HashAlgo
from nixwarden.shared.storepath import ContentAddress, StoreDir
from nixwarden.supervisor.config import Settings
from nixwarden.supervisor.store import signatures
from nixwarden.supervisor.store.adding import StoreWriter
from nixwarden.supervisor.store.db import StoreDB
from nixwarden.supervisor.store.layout import StoreLayout
from nixwarden.supervisor.store.locks import TempRoots
from nixwarden.supervisor.store.substitute import Substituters

import cacheserver
from nixenv import make_nix_env, needs_nix

pytestmark = needs_nix

EXPR = r"""
let mk = attrs: builtins.derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; } // attrs);
  dep = mk { name = "dep"; args = [ "-c" "echo dependency > $out" ]; };
  top = mk { name = "top"; args = [ "-c" ''
    /bin/mkdir $out; echo ${dep} > $out/ref; echo $out > $out/self
    i=0; while [ $i -lt 4000 ]; do echo "line $i $i $i $i $i $i $i"; i=$((i+1)); done > $out/big
  '' ]; };
in top
"""
COMPRESSIONS = ("xz", "bzip2", "zstd", "none")
NIX = ("nix", "--extra-experimental-features", "nix-command")
FNORD = "/fnord/store"


class ForeignFile:
    """A file added by the real Nix to the ``fnord`` cache (store dir /fnord/store)."""

    def __init__(self, world: "World", name: str, content: bytes):
        src = os.path.join(world.tmp, name)
        with open(src, "wb") as f:
            f.write(content)
        self.theirs = world.src.out(*NIX, "--store", f"file://{world.cache('fnord')}?store={FNORD}",
                                    "store", "add-file", src)
        # the content address computed here, not taken from the cache
        self.ca = ContentAddress("flat", Hash.compute(HashAlgo.SHA256, content))
        self.ours = StoreDir(world.store_dir).print(
            StoreDir(world.store_dir).make_path_from_ca(name, self.ca))
        self.content = content
        assert StoreDir(FNORD).print(StoreDir(FNORD).make_path_from_ca(name, self.ca)) \
            == self.theirs


class World:
    """The source store, keys and caches shared by all tests of the module."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.src = make_nix_env(os.path.join(tmp, "src"))
        self.store_dir = self.src.layout.store_dir
        with open(os.path.join(tmp, "e.nix"), "w") as f:
            f.write(EXPR)
        self.top = self.src.out("nix-build", os.path.join(tmp, "e.nix"), "--no-out-link")
        self.dep, = [p for p in self.src.lines("nix-store", "-q", "--references", self.top)
                     if p != self.top]
        with open(os.path.join(tmp, "ca.txt"), "w") as f:
            f.write("content-addressed\n")
        self.ca = self.src.out("nix-store", "--add", os.path.join(tmp, "ca.txt"))
        self.caches = os.path.join(tmp, "caches")
        self.sk, self.pk = self._key("test-1")
        self.sk2, self.pk2 = self._key("other-1")
        self._copy("unsigned", "xz")
        self._copy("otherkey", "xz", f"&secret-key={self.sk2}")
        self.src.run(*NIX, "store", "sign", "--key-file", self.sk, "-r", self.top)
        for c in COMPRESSIONS:
            self._copy(c, c)
        self._copy("second", "xz")
        self._copy("badsig", "xz")
        for name in os.listdir(self.cache("badsig")):
            if name.endswith(".narinfo"):
                self._edit(self.cache("badsig", name), "Sig: test-1:", "Sig: test-1:AAAA")
        self.fnord = ForeignFile(self, "fnord.txt", b"substituted from another store dir\n")
        self.fnord2 = ForeignFile(self, "other.txt", b"some other content\n" * 50)

    def _key(self, name: str) -> tuple[str, str]:
        sk, pk = (os.path.join(self.tmp, f"{name}.{k}") for k in ("sk", "pk"))
        self.src.run("nix-store", "--generate-binary-cache-key", name, sk, pk)
        with open(pk) as f:
            return sk, f.read().strip()

    def _copy(self, name: str, compression: str, extra: str = "") -> None:
        url = f"file://{self.cache(name)}?compression={compression}{extra}"
        self.src.run(*NIX, "copy", "--to", url, self.top, self.ca)

    @staticmethod
    def _edit(path: str, old: str, new: str) -> None:
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace(old, new))

    def cache(self, *parts: str) -> str:
        return os.path.join(self.caches, *parts)

    def narinfo_path(self, cache: str, path: str) -> str:
        return self.cache(cache, os.path.basename(path)[:32] + ".narinfo")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("subst")))


@pytest.fixture(scope="module")
def server(world):
    proc, url = cacheserver.start(world.caches)
    yield url
    cacheserver.stop(proc)


class Log:
    """Records what a ClientLog would send."""

    def __init__(self):
        self.acts, self.results, self.lines, self.stopped = {}, [], [], []

    def start(self, level, type_, text="", fields=(), parent=0):
        act = len(self.acts) + 1
        self.acts[act] = (int(level), int(type_), text, tuple(fields), parent)
        return act

    def result(self, act, type_, fields):
        self.results.append((act, int(type_), tuple(fields)))

    def stop(self, act):
        self.stopped.append(act)

    def log(self, level, text):
        self.lines.append((int(level), text))

    def text(self) -> str:
        return "\n".join(t for _, t in self.lines)


class Dest:
    """A fresh diverted store with the source's logical store dir."""

    def __init__(self, world: World, root: str, *, require_sigs=True):
        self.world = world
        self.root = root
        self.layout = StoreLayout.chroot(root, world.store_dir)
        self.db = StoreDB.open(self.layout)
        self.roots = TempRoots(self.layout)
        policy = types.SimpleNamespace(require_sigs=require_sigs,
                                       trusted_public_keys=[world.pk], secret_key_files=[])
        self.writer = StoreWriter(self.layout, self.db, self.roots, policy)
        self.log = Log()
        self.messages = []

    def close(self):
        self.writer.close()
        self.roots.close()
        self.db.close()

    def subs(self, *urls, offline=False, refresh=False, **settings) -> Substituters:
        values = {"substituters": tuple(urls), "trusted-public-keys": (self.world.pk,),
                  "download-attempts": 2}
        values.update({k.replace("_", "-"): v for k, v in settings.items()})
        s = Settings.defaults(os.environ, 0).with_values(values)
        return Substituters(s, StoreDir(self.world.store_dir), self.layout.state_dir,
                            offline=offline, refresh=refresh,
                            log=lambda level, text: self.messages.append(text))

    def substitute(self, paths, *urls, cas=None, **kw):
        subs = self.subs(*urls, **kw)
        try:
            return subs.substitute(paths, self.writer, self.log, cas=cas)
        finally:
            subs.close()

    def nix(self, *args: str, check=True) -> subprocess.CompletedProcess:
        spec = (f"local?root={self.root}&store={self.world.store_dir}"
                f"&real={self.layout.real_store_dir}")
        env = dict(self.world.src.env)
        for k in ("NIX_STORE_DIR", "NIX_STATE_DIR", "NIX_LOG_DIR", "NIX_REMOTE"):
            env.pop(k)
        proc = subprocess.run([args[0], "--store", spec, *args[1:]], env=env,
                              capture_output=True, timeout=120)
        assert not check or proc.returncode == 0, proc.stderr.decode()
        return proc

    def verify(self) -> None:
        proc = self.nix("nix-store", "--verify", "--check-contents")
        assert b"error" not in proc.stderr and b"disappeared" not in proc.stderr, proc.stderr

    def valid(self, path: str) -> bool:
        return self.db.is_valid(path)

    def leftovers(self) -> list[str]:
        return [n for n in os.listdir(self.layout.real_store_dir)
                if n not in (".links",) and not self.db.is_valid(f"{self.world.store_dir}/{n}")]


@pytest.fixture
def dest(world, tmp_path):
    d = Dest(world, str(tmp_path / "dst"))
    yield d
    d.close()


def file_url(world, name, params=""):
    return f"file://{world.cache(name)}{params}"


# --- success ------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("scheme", ["file", "http"])
def test_closure_substituted_and_verified(world, server, dest, compression, scheme):
    url = file_url(world, compression) if scheme == "file" else f"{server}/{compression}"
    got = dest.substitute([world.top], url)
    assert got == {world.top: None, world.dep: None}
    dest.verify()
    refs = dest.nix("nix-store", "-q", "--references", world.top).stdout.decode().split()
    assert sorted(refs) == sorted([world.top, world.dep])
    info = dest.db.query_path_info(world.top)
    src_info = world.src.out("nix-store", "-q", "--hash", world.top)
    assert info.nar_hash == "sha256:" + _hex(src_info)
    assert info.deriver == world.src.out("nix-store", "-q", "--deriver", world.top)
    assert info.sigs and all(s.startswith("test-1:") for s in info.sigs)
    assert not info.ultimate and info.ca is None
    assert dest.leftovers() == []


def _hex(nix32_prefixed: str) -> str:
    from nixwarden.shared.hashes import Hash
    return Hash.parse(nix32_prefixed).to_base16()


def test_activities_like_nix_daemon(world, server, dest):
    url = f"{server}/xz"
    dest.substitute([world.dep], url)
    acts = list(dest.log.acts.items())
    (sub_id, sub), (copy_id, copy), (ft_id, ft) = acts
    assert sub == (0, 108, "", (world.dep, url), 0)
    assert copy == (3, 100, f"copying path '{world.dep}' from '{url}'",
                    (world.dep, url, "local"), sub_id)
    nar_url = ft[3][0]
    assert ft[:3] == (4, 101, f"downloading '{nar_url}'") and ft[4] == copy_id
    assert nar_url.startswith(f"{url}/nar/") and nar_url.endswith(".nar.xz")
    nar_size = dest.db.query_path_info(world.dep).nar_size
    assert (copy_id, 105, (nar_size, nar_size, 0, 0)) in dest.log.results
    assert any(a == ft_id and t == 105 for a, t, _ in dest.log.results)
    assert sorted(dest.log.stopped) == [sub_id, copy_id, ft_id]


def test_already_valid_paths_are_skipped(world, dest):
    url = file_url(world, "xz")
    dest.substitute([world.dep], url)
    dest.log = Log()
    assert dest.substitute([world.top], url) == {world.top: None, world.dep: None}
    assert [a[3][0] for a in dest.log.acts.values() if a[1] == 108] == [world.top]


def test_queries(world, server, dest):
    subs = dest.subs(file_url(world, "zstd"))
    infos = subs.query_infos([world.top, world.dep, dest.world.store_dir + "/" + "0" * 32 + "-x"])
    assert set(infos) == {world.top, world.dep}
    top = infos[world.top]
    assert top.references == tuple(sorted([world.dep, world.top]))
    assert top.nar_size == top.narinfo.nar_size and top.download_size == top.narinfo.file_size
    assert top.download_size == os.path.getsize(world.cache("zstd", top.narinfo.url))
    assert subs.query_substitutable([world.top]) == set()  # no WantMassQuery
    subs = dest.subs(file_url(world, "zstd", "?want-mass-query=1"))
    assert subs.query_substitutable([world.top, world.store_dir + "/" + "1" * 32 + "-y"]) \
        == {world.top}


def test_priority_orders_caches(world, server, dest):
    slow = f"{server}/xz?priority=60"
    fast = f"{server}/zstd?priority=10"
    dest.substitute([world.dep], slow, fast)
    assert {a[3][1] for a in dest.log.acts.values() if a[1] == 108} == {f"{server}/zstd"}


def test_store_dir_mismatch_serves_no_input_addressed_paths(world, tmp_path, dest):
    other = tmp_path / "other"
    shutil.copytree(world.cache("xz"), other)
    (other / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    got = dest.substitute([world.dep], f"file://{other}")
    assert got[world.dep].kind == "no-substituter"
    assert any(f"binary cache 'file://{other}' is for Nix stores with prefix '/nix/store', "
               f"not '{world.store_dir}'" in t for _, t in dest.log.lines)


# --- signatures -----------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["unsigned", "otherkey"])
def test_unsigned_or_badly_signed_refused(world, dest, cache):
    url = file_url(world, cache)
    got = dest.substitute([world.top], url)
    assert got[world.top] == (f"path '{world.top}' is required, but there is no "
                              "substituter that can build it")
    assert got[world.top].kind == "no-substituter"
    assert (f"the substitute for '{world.top}' from '{url}' is not signed by any of the keys "
            "in 'trusted-public-keys'") in dest.log.text()
    assert not dest.valid(world.top) and dest.leftovers() == []


def test_malformed_signature_aborts(world, dest):
    """A trusted key's signature of the wrong length: Nix 2.8's verifyDetached
    throws, which ends the whole substitution (no next cache, no warning)."""
    with pytest.raises(StoreRefusal, match="^signature is not valid$"):
        dest.substitute([world.top], file_url(world, "badsig"))
    assert not dest.valid(world.top) and dest.leftovers() == []


def test_next_cache_used_after_unsigned(world, dest):
    got = dest.substitute([world.top], file_url(world, "unsigned"), file_url(world, "second"))
    assert got[world.top] is None
    dest.verify()


def test_trusted_cache_and_require_sigs_off(world, dest, tmp_path):
    assert dest.substitute([world.top], file_url(world, "unsigned", "?trusted=1"))[world.top] \
        is None
    dest.verify()
    lax = Dest(world, str(tmp_path / "lax"), require_sigs=False)
    try:
        assert lax.substitute([world.top], file_url(world, "otherkey"))[world.top] is None
        lax.verify()
    finally:
        lax.close()


def test_content_addressed_needs_no_signature(world, dest):
    assert dest.substitute([world.ca], file_url(world, "unsigned")) == {world.ca: None}
    assert dest.db.query_path_info(world.ca).ca.startswith("fixed:r:sha256:")
    dest.verify()


# --- bad caches -------------------------------------------------------------------------------


def _stats(server):
    import urllib.request
    with urllib.request.urlopen(f"{server}/_stats") as r:
        return json.load(r)


@pytest.mark.parametrize("mode,expect", [
    ("500", "HTTP error 500 ('Internal Server Error')"),
    ("stall", "Timeout was reached (28)"),
    ("truncate", "Transferred a partial file (18)"),
    ("corrupt", ("hash mismatch importing path", "bad archive")),
])
def test_faulty_nar_download(world, server, dest, mode, expect):
    ok_narinfo = _narinfo_only_cache(world, server, mode)
    got = dest.substitute([world.dep], ok_narinfo, stalled_download_timeout=1)
    failure = got[world.dep]
    assert failure.kind == "failed", failure
    expect = (expect,) if isinstance(expect, str) else expect
    assert any(e in failure for e in expect), failure
    assert f"'{world.dep}'" in failure and server in failure
    assert any(e in dest.log.text() for e in expect)
    assert not dest.valid(world.dep) and dest.leftovers() == []
    # the next cache is used
    dest.log = Log()
    got = dest.substitute([world.dep], ok_narinfo, file_url(world, "second"),
                          stalled_download_timeout=1)
    assert got[world.dep] is None
    dest.verify()


def _narinfo_only_cache(world, server, mode) -> str:
    """A cache whose narinfo files are served fine but whose NARs are faulty.

    The narinfo is copied to a cache dir ``<mode>-narinfo`` with an absolute
    URL pointing at the fault server's NAR."""
    src = "none" if mode == "corrupt" else "xz"
    name = f"narinfo-{mode}"
    target = world.cache(name)
    if not os.path.exists(target):
        shutil.copytree(world.cache(src), target)
        for f in os.listdir(target):
            if f.endswith(".narinfo"):
                World._edit(os.path.join(target, f), "URL: nar/",
                            f"URL: {server}/fault-{mode}/{src}/nar/")
    return f"{server}/{name}"


def test_retries_as_nix(world, server, dest):
    url = _narinfo_only_cache(world, server, "500once")
    before = _stats(server)
    got = dest.substitute([world.dep], url, download_attempts=3)
    assert got[world.dep] is None
    nar = next(p for p in _stats(server) if "fault-500once" in p and world.dep not in p)
    assert _stats(server)[nar] - before.get(nar, 0) == 2
    # The warning carries the response body as Nix's FileTransferError does.
    assert ("HTTP error 500 ('Internal Server Error')\n\nresponse body:\n\n"
            "\x1b[35;1moops\x1b[0m; retrying in") in dest.log.text()
    dest.verify()


def test_500_retried_download_attempts_times(world, server, dest):
    url = _narinfo_only_cache(world, server, "500")
    before = _stats(server)
    dest.substitute([world.dep], url, download_attempts=3)
    after = _stats(server)
    counts = [after[p] - before.get(p, 0) for p in after if "/fault-500/" in p]
    assert counts == [3]


def test_malformed_narinfo(world, server, dest):
    bad = world.cache("malformed")
    if not os.path.exists(bad):
        shutil.copytree(world.cache("xz"), bad)
        World._edit(world.narinfo_path("malformed", world.dep), "NarSize: ", "NarSize: x")
    url = f"{server}/malformed"
    got = dest.substitute([world.dep], url, file_url(world, "second", "?priority=99"))
    failure = got[world.dep]
    assert failure.kind == "failed"
    hash_part = os.path.basename(world.dep)[:32]
    assert f"NAR info file '{url}/{hash_part}.narinfo' is corrupt (bad NarSize" in failure
    assert not dest.valid(world.dep)
    # with fallback the next cache is used, after the error is shown
    got = dest.substitute([world.dep], url, file_url(world, "second", "?priority=99"),
                          fallback=True)
    assert got[world.dep] is None
    assert "is corrupt" in "\n".join(dest.messages + [dest.log.text()])


def test_missing_nar_is_gone(world, tmp_path, dest):
    gone = tmp_path / "gone"
    shutil.copytree(world.cache("xz"), gone)
    shutil.rmtree(gone / "nar")
    got = dest.substitute([world.dep], f"file://{gone}")
    assert got[world.dep].kind == "no-substituter"
    assert "does not exist in binary cache" in dest.log.text()


# --- disk cache, refresh, offline -----------------------------------------------------------


def test_negative_and_positive_ttls_refresh_offline(world, server, dest, tmp_path):
    cache = tmp_path / "growing"
    (cache / "nar").mkdir(parents=True)
    shutil.copy(world.cache("xz", "nix-cache-info"), cache / "nix-cache-info")
    link = world.cache("growing")
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(cache, link)
    url = f"{server}/growing"
    assert dest.subs(url).query_infos([world.dep]) == {}
    src_info = world.narinfo_path("xz", world.dep)
    shutil.copy(src_info, cache)
    for name in os.listdir(world.cache("xz", "nar")):
        shutil.copy(world.cache("xz", "nar", name), cache / "nar")
    assert dest.subs(url).query_infos([world.dep]) == {}            # negative entry
    assert set(dest.subs(url, narinfo_cache_negative_ttl=0).query_infos([world.dep])) \
        == {world.dep}
    os.unlink(cache / os.path.basename(src_info))
    assert set(dest.subs(url).query_infos([world.dep])) == {world.dep}  # positive entry
    assert dest.subs(url, refresh=True).query_infos([world.dep]) == {}
    assert dest.subs(url, narinfo_cache_positive_ttl=0).query_infos([world.dep]) == {}
    assert dest.subs(url, offline=True).query_infos([world.dep]) == {}
    assert dest.substitute([world.dep], file_url(world, "xz"), offline=True)[world.dep].kind \
        == "no-substituter"
    assert dest.substitute([world.dep], file_url(world, "xz"), substitute=False)[world.dep] \
        .kind == "no-substituter"


# --- a cache of another store dir: content-addressed paths only ---------------------------


def _fnord_url(world, server, form):
    return {"param": file_url(world, "fnord", f"?store={FNORD}"),
            "plain": file_url(world, "fnord"),
            "http": f"{server}/fnord?store={FNORD}&priority=5"}[form]


@pytest.mark.parametrize("form", ["param", "plain", "http"])
def test_other_store_dir_ca_path_substituted(world, server, dest, form):
    f = world.fnord
    url = _fnord_url(world, server, form)
    uri = url.split("?")[0]
    got = dest.substitute([f.ours], url, cas={f.ours: f.ca.render()})
    assert got == {f.ours: None}
    dest.verify()
    with open(os.path.join(dest.layout.real_store_dir, os.path.basename(f.ours)), "rb") as fh:
        assert fh.read() == f.content
    info = dest.db.query_path_info(f.ours)
    assert info.ca == f.ca.render() and info.ca.startswith("fixed:sha256:")
    assert info.references == () and info.deriver is None and info.sigs == ()
    real = dest.nix(*NIX, "path-info", "--json", f.ours).stdout.decode()
    assert f'"ca":"{f.ca.render()}"' in real.replace(" ", "")
    # Nix 2.8's warning only where the URL does not name the cache's store dir
    mismatch = (f"binary cache '{uri}' is for Nix stores with prefix '{FNORD}', "
                f"not '{world.store_dir}'")
    assert (mismatch in dest.log.text()) == (form == "plain")
    # copyStorePath names the path as the cache has it
    copy, = [a for a in dest.log.acts.values() if a[1] == 100]
    assert copy[2] == f"copying path '{f.theirs}' from '{uri}'"
    assert dest.leftovers() == []


def test_other_store_dir_queries(world, server, dest):
    f = world.fnord
    subs = dest.subs(_fnord_url(world, server, "http"), file_url(world, "unsigned"))
    try:
        infos = subs.query_infos([f.ours, world.ca, world.dep],
                                 {f.ours: f.ca.render(), world.ca: "", world.dep: None})
        assert set(infos) == {f.ours, world.ca, world.dep}
        mine = infos[f.ours]
        assert mine.path == f.ours and mine.references == () and mine.deriver is None
        assert mine.nar_size == mine.narinfo.nar_size and mine.narinfo.ca == f.ca
        assert mine.cache.uri == f"{server}/fnord" and mine.cache.foreign
        assert f.ours not in subs.query_infos([f.ours])  # without its CA
        assert subs.query_substitutable([f.ours]) == set()  # never for mass queries
    finally:
        subs.close()


def test_other_store_dir_without_ca_not_looked_up(world, server, dest):
    f = world.fnord
    url = _fnord_url(world, server, "http")
    before = _stats(server)
    got = dest.substitute([f.ours, world.dep], url)
    assert got[f.ours].kind == "no-substituter" and got[world.dep].kind == "no-substituter"
    # a CA that does not give our path cannot be translated: not looked up either
    got = dest.substitute([f.ours], url, cas={f.ours: world.fnord2.ca.render()})
    assert got[f.ours].kind == "no-substituter"
    asked = [p for p, n in _stats(server).items()
             if p.startswith("/fnord/") and p.endswith(".narinfo") and n != before.get(p)]
    assert asked == []
    assert not dest.valid(f.ours) and dest.leftovers() == []


def _foreign_copy(world, tmp_path) -> str:
    copy = tmp_path / "fnord-copy"
    shutil.copytree(world.cache("fnord"), copy)
    return str(copy)


def _narinfo_of(cache: str, path: str) -> str:
    return os.path.join(cache, os.path.basename(path)[:32] + ".narinfo")


@pytest.mark.parametrize("lie", ["ca", "references"])
def test_other_store_dir_lying_narinfo_refused(world, dest, tmp_path, lie):
    f = world.fnord
    cache = _foreign_copy(world, tmp_path)
    narinfo = _narinfo_of(cache, f.theirs)
    if lie == "ca":
        World._edit(narinfo, f"CA: {f.ca.render()}", f"CA: {world.fnord2.ca.render()}")
    else:
        World._edit(narinfo, "References: ",
                    "References: " + os.path.basename(world.fnord2.theirs))
    url = f"file://{cache}?store={FNORD}"
    got = dest.substitute([f.ours], url, cas={f.ours: f.ca.render()})
    assert got[f.ours].kind == "no-substituter"
    assert f"asked 'file://{cache}' for '{f.ours}' but got '{f.theirs}'" in dest.log.text()
    if lie == "ca":
        assert (f"warning: path '{f.theirs}' claims to be content-addressed but isn't"
                in dest.log.text())
    assert not dest.valid(f.ours) and dest.leftovers() == []
    assert dest.db.query_path_info(f.ours) is None


def test_other_store_dir_wrong_content_refused(world, dest, tmp_path):
    """A narinfo with the right StorePath and CA but another file's NAR."""
    f, other = world.fnord, world.fnord2
    cache = _foreign_copy(world, tmp_path)
    with open(_narinfo_of(cache, other.theirs)) as fh:
        theirs = dict(line.split(": ", 1) for line in fh.read().splitlines())
    lines = [f"StorePath: {f.theirs}"]
    lines += [f"{k}: {theirs[k]}" for k in ("URL", "Compression", "FileHash", "FileSize",
                                            "NarHash", "NarSize")]
    lines += ["References: ", f"CA: {f.ca.render()}"]
    with open(_narinfo_of(cache, f.theirs), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    got = dest.substitute([f.ours], f"file://{cache}?store={FNORD}",
                          cas={f.ours: f.ca.render()})
    assert got[f.ours].kind == "failed"
    assert f"ca hash mismatch importing path '{f.ours}'" in got[f.ours]
    assert not dest.valid(f.ours) and dest.leftovers() == []


def test_same_store_dir_cache_with_cas(world, dest):
    ca = json.loads(world.src.out(*NIX, "path-info", "--json", world.ca))[0]["ca"]
    assert dest.substitute([world.ca], file_url(world, "unsigned"), cas={world.ca: ca}) \
        == {world.ca: None}
    assert dest.db.query_path_info(world.ca).ca == ca
    dest.verify()
