"""Sandboxed builds through nixwarden with real nix-build (issue 4, sandbox).

Root only.  nix.conf has ``sandbox = true`` and ``build-users-group =
nixbld`` (group and users nixbld1..4 are created when missing); sandbox-paths
is left at nixwarden's default, ``/bin/sh=/bin/busybox`` (Debian's
busybox-static).  Inside the sandbox ``/bin/sh`` is therefore busybox, whose
shell runs its applets (``wget``, ``id``, ``ls``, ``hostname``) without a
``PATH`` -- which is how these derivations reach a network client at all:
no host binary but /bin/sh is visible in the sandbox.

The network test serves a payload from a loopback HTTP server started by the
test.  A normal derivation runs in its own network namespace (only its own
``lo``), so 127.0.0.1:<port> refuses the connection and the server sees no
request.  A fixed-output derivation shares the host's network namespace
(as in Nix) and fetches the payload with ``wget``; its hash is checked.
(Debian's busybox 1.35 ``wget -T`` segfaults, so no timeout option is used;
a refused connection fails at once anyway.)

These are not differential: Debian's nix-daemon has an empty default
``sandbox-paths`` (no /bin/sh in its sandbox), so the same derivations
would not even start there.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading

import pytest

from lib.builds import ensure_build_users, write_expr
from lib.nixenv import NixEnv, new_root, start_nixwarden

pytestmark = [
    pytest.mark.interop, pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (build users, sandbox)"),
    pytest.mark.skipif(shutil.which("nix-build") is None, reason="needs the real Nix"),
    pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="needs bubblewrap"),
    pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="needs busybox-static"),
]

CONF = "sandbox = true\nbuild-users-group = nixbld\n"
PAYLOAD = b"payload served over loopback\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def world(server):
    ensure_build_users()
    root = new_root("nw-sandbox-")
    env = NixEnv(root, CONF)
    daemon = start_nixwarden(env)
    try:
        outside = env.add_text("outside", "not in the closure\n")
        port = server.server_address[1]
        expr = write_expr(f"{root}/home/s.nix", EXPR.replace("@OUTSIDE@", outside)
                          .replace("@DB@", f"{root}/var/nix/db/db.sqlite")
                          .replace("@STORE@", env.store_dir)
                          .replace("@URL@", f"http://127.0.0.1:{port}")
                          .replace("@SHA@", hashlib.sha256(PAYLOAD).hexdigest()))
        yield env, expr, outside
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


EXPR = r"""
rec {
  input = mk "input" "echo input > $out" {};

  probe = mk "probe" ''
    r() { if [ -e "$1" ]; then echo "$2 present"; else echo "$2 absent"; fi; }
    {
      r ${input} input
      r @OUTSIDE@ outside
      r @DB@ db
      r /root root
      r /etc/shadow shadow
      r /usr/bin usr
      echo "uid $(id -u) gid $(id -g)"
      echo "hostname $(hostname)"
      echo "top $NIX_BUILD_TOP pwd $PWD"
      echo "store" $(ls @STORE@)
      if echo x > @STORE@/00000000000000000000000000000000-foreign; then echo "foreign made"; fi
      if echo x > /tmp/scratch && [ -f /tmp/scratch ]; then echo "tmp writable"; fi
    } > $out
  '' {};

  net = mk "net" ''
    if wget -q -O got @URL@/normal 2> err; then echo "reached"; else echo "unreachable"; fi > $out
  '' {};

  fod = mk "fod" "wget -q -O $out @URL@/fixed"
    { outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "@SHA@"; };
}
"""


def _build(env, expr, attr):
    proc = env.run("nix-build", expr, "-A", attr, "--no-out-link", check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    path = proc.stdout.decode().strip()
    with open(path) as f:
        return path, f.read()


def test_sandbox_sees_only_the_closure(world):
    env, expr, outside = world
    path, text = _build(env, expr, "probe")
    lines = text.splitlines()
    assert "input present" in lines
    assert "outside absent" in lines  # a valid store path not in the input closure
    assert "db absent" in lines  # the daemon's state
    assert "root absent" in lines and "shadow absent" in lines and "usr absent" in lines
    assert "uid 1000 gid 100" in lines  # Nix's uid mapping
    assert "hostname localhost" in lines
    assert "top /build pwd /build" in lines
    [listing] = [ln for ln in lines if ln.startswith("store")]
    # the store holds the input closure and the output being written, nothing else
    assert sorted(listing.split()[1:]) == sorted(
        [os.path.basename(_build(env, expr, "input")[0]), os.path.basename(path)]), listing
    assert "tmp writable" in lines  # a private /tmp
    # a stray entry made in the sandbox's store never reaches the real store
    assert "foreign made" in lines
    assert not os.path.lexists(f"{env.store_dir}/00000000000000000000000000000000-foreign")
    assert not [e for e in os.listdir(env.store_dir) if e.endswith(".chroot")]


def test_normal_derivation_has_no_network(world, server):
    env, expr, _ = world
    before = list(_Handler.requests)
    _, text = _build(env, expr, "net")
    assert text == "unreachable\n"
    assert "/normal" not in _Handler.requests[len(before):]


def test_fixed_output_derivation_reaches_the_network(world, server):
    env, expr, _ = world
    path, text = _build(env, expr, "fod")
    assert text == PAYLOAD.decode()
    assert "/fixed" in _Handler.requests
    info = env.run("nix", "path-info", "--json", path).stdout.decode()
    assert '"ca":"fixed:sha256:' in info
