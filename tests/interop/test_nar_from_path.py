"""NarFromPath (op 38, spec worker-protocol §5.34).

Which real Nix 2.8 clients send it (from the 2.8.0 source):

* Not unix-socket clients.  ``UDSRemoteStore`` (``daemon``, ``unix://``) is a
  ``LocalFSStore`` and overrides ``narFromPath`` and ``getFSAccessor`` with
  the local ones (src/libstore/uds-remote-store.hh), so ``nix store cat``,
  ``nix store ls``, ``nix store dump-path``, ``nix copy --from unix://…`` and
  ``nix-store --dump`` all read the store directory themselves.  A user
  who cannot read the store directory therefore fails on the client side,
  whatever the daemon does: there is no socket-client case to test.
* ``ssh-ng://`` clients do: ``SSHStore`` is a plain ``RemoteStore``, whose
  ``narFromPath`` sends wopNarFromPath and whose ``getFSAccessor`` is a
  ``RemoteFSAccessor`` over it (src/libstore/remote-store.cc,
  remote-fs-accessor.cc).  With host ``localhost`` ``SSHMaster`` runs no
  ssh at all but ``bash -c "<remote-program> --stdio"``
  (src/libstore/ssh.cc, ``fakeSSH``), so a real client reaches
  ``nixwarden daemon --stdio`` through ``ssh-ng://localhost?remote-program=…``.

So: (a) tests/lib/wclient.py at several protocol minors against the socket
daemon, compared with ``nix-store --dump`` run locally; (b) real clients over
``ssh-ng://localhost``, differentially against ``nix-daemon --stdio``;
(c) ``nix copy --from unix://…`` (queries through the daemon, NARs read
locally) against both daemons.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from conftest import needs_nix
from lib.nixenv import NixEnv, new_root, nixwarden_cmd, start_nixwarden
from lib.samplestore import populate
from lib.wclient import DaemonError, WClient

pytestmark = [needs_nix, pytest.mark.interop]

MINORS = [21, 32, 34, 35, 37, 38]
NAR_KEYS = ["file", "dir", "top_drv", "top_out", "top_dev"]


@pytest.fixture(scope="module")
def store():
    root = new_root()
    env = NixEnv(root)
    paths = populate(env)
    nars = {k: env.run("nix-store", "--dump", paths[k], remote="local").stdout
            for k in NAR_KEYS}
    yield env, paths, nars
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def warden(store):
    daemon = start_nixwarden(store[0])
    yield daemon
    daemon.stop()


# --- (a) wclient --------------------------------------------------------------------

@pytest.mark.parametrize("minor", MINORS)
def test_nar_bytes_equal_nix_store_dump(store, warden, minor):
    env, paths, nars = store
    c = WClient(env.socket_path, minor)
    for key in NAR_KEYS:
        got = c.nar_from_path(paths[key], len(nars[key]))
        assert got == nars[key], key
        assert c.is_valid_path(paths[key]) is True  # nothing left over in the stream
    assert c.rbuf == b""


@pytest.mark.parametrize("minor", [21, 38])
@pytest.mark.parametrize("which", ["invalid", "outside", "not-a-store-path"])
def test_nar_of_bad_path_is_an_error_then_the_connection_closes(store, warden, minor, which):
    """An error, then EOF: Nix <= 2.23 clients ignore this op's error and
    would wait for a NAR on an open connection (see worker/server.py)."""
    env, paths, nars = store
    arg = {"invalid": paths["invalid"], "outside": "/etc/passwd",
           "not-a-store-path": env.store_dir + "/sub/../x"}[which]
    c = WClient(env.socket_path, minor)
    with pytest.raises(DaemonError) as err:
        c.nar_from_path(arg, 1)
    message = {"invalid": f"path '{arg}' is not valid",
               "outside": f"path '{arg}' is not in the Nix store"}.get(which)
    if message:
        assert str(err.value) == message
    assert c.rbuf == b"" and c.sock.recv(1) == b""
    c = WClient(env.socket_path, minor)
    assert c.nar_from_path(paths["file"], len(nars["file"])) == nars["file"]


# --- (b) real clients over ssh-ng://localhost -----------------------------------------

def stdio_program(env: NixEnv) -> str:
    """An executable that runs ``nixwarden daemon`` with its arguments."""
    path = os.path.join(env.root, "home", "nixwarden-stdio")
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexec " + " ".join(nixwarden_cmd()) + ' "$@"\n')
    os.chmod(path, 0o755)
    return path


SSH_COMMANDS = {
    "cat": ("nix", "store", "cat", "{dir}/sub/data.txt"),
    "cat-link": ("nix", "store", "cat", "{dir}/link"),
    "cat-drv": ("nix", "store", "cat", "{top_drv}"),
    "cat-invalid": ("nix", "store", "cat", "{invalid}/x"),
    "ls": ("nix", "store", "ls", "-lR", "{dir}"),
    "ls-json": ("nix", "store", "ls", "--json", "-R", "{dir}"),
    "dump-path-dir": ("nix", "store", "dump-path", "{dir}"),
    "dump-path-out": ("nix", "store", "dump-path", "{top_out}"),
    "dump-path-invalid": ("nix", "store", "dump-path", "{invalid}"),
}


#: nixwarden's worker start-up lines, which reach an ssh-ng client's stderr
#: (the daemon's stderr is the ssh channel's); test_stdio.py checks them.
CONTAINMENT_LOG = re.compile(rb"^nixwarden\[\d+\] containment layer .*\n", re.M)


@pytest.fixture(scope="module")
def over_ssh_ng(store):
    """Each SSH_COMMANDS result with remote-program nix-daemon, then nixwarden."""
    env, paths, _ = store
    out = {}
    for name, program in (("nix-daemon", "nix-daemon"), ("nixwarden", stdio_program(env))):
        url = f"ssh-ng://localhost?remote-program={program}"
        out[name] = {}
        for key, cmd in SSH_COMMANDS.items():
            args = [a.format(**paths) for a in cmd] + ["--store", url]
            # NIX_REMOTE=local: the --stdio daemon serves the store itself
            # instead of forwarding to a socket (daemon-behaviour §7).
            proc = env.run(*args, remote="local", check=False, timeout=30)
            err = CONTAINMENT_LOG.sub(b"", proc.stderr)
            out[name][key] = (proc.returncode, proc.stdout, err)
    return out


@pytest.mark.parametrize("key", list(SSH_COMMANDS))
def test_ssh_ng_client_same_as_nix_daemon(over_ssh_ng, key):
    want = over_ssh_ng["nix-daemon"][key]
    got = over_ssh_ng["nixwarden"][key]
    if key == "dump-path-invalid":
        # Nix 2.8 reads the daemon's error as NAR bytes and copies them to
        # stdout until the connection ends; the bytes differ, the outcome not.
        assert got[0] == want[0] == 1
        assert got[2].splitlines()[-1] == want[2].splitlines()[-1] == b"error: unexpected end-of-file"
        return
    assert (got[0], got[2].decode(errors="replace")) == (want[0], want[2].decode(errors="replace"))
    assert got[1] == want[1]


def test_ssh_ng_comparison_is_not_vacuous(store, over_ssh_ng):
    _, _, nars = store
    real = over_ssh_ng["nix-daemon"]
    assert real["dump-path-dir"] == (0, nars["dir"], b"")
    assert real["cat"][1] == b"some data\n" * 100
    assert real["cat-invalid"][0] != 0


# --- (c) nix copy from a socket daemon to a binary cache ------------------------------

def tree_contents(top: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(top):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, top)] = f.read()
    return out


def test_nix_copy_from_unix_socket_to_binary_cache(store, warden, nix_daemon_factory):
    env, paths, _ = store
    real_socket = os.path.join(env.root, "var/nix/real-daemon.sock")
    nix_daemon_factory(env, socket_path=real_socket)
    caches = {}
    for name, sock in (("nix-daemon", real_socket), ("nixwarden", env.socket_path)):
        cache = os.path.join(env.root, f"cache-{name}")
        env.run("nix", "copy", "--from", f"unix://{sock}", "--to", f"file://{cache}",
                paths["top_out"], paths["dir"])
        caches[name] = tree_contents(cache)
    assert caches["nixwarden"] == caches["nix-daemon"]
    assert sum(n.endswith(".narinfo") for n in caches["nixwarden"]) == 3  # top, dep, dir
