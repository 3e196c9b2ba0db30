"""The bubblewrap sandbox, run for real as a build user (spec §8.6).

Root only: creates build users if absent, drops a forked child to one of
them and execs bwrap from there, exactly as a session does.  /bin/sh in the
sandbox is Debian's static busybox (package busybox-static).
"""

from __future__ import annotations

import http.server
import os
import shutil
import sys
import tempfile
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_buildusers import GROUP, _ensure_build_users  # noqa: E402

from nixwarden.supervisor.build import sandbox  # noqa: E402
from nixwarden.supervisor.build.buildusers import (  # noqa: E402
    acquire_build_user, become_build_user)

STORE = "/nix/store"
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (build users)"),
    pytest.mark.skipif(not os.path.exists(sandbox.BWRAP), reason="needs bubblewrap"),
    pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="needs busybox-static"),
]


@pytest.fixture(scope="module")
def build_user():
    _ensure_build_users()
    pool = tempfile.mkdtemp(prefix="nw-userpool-")
    lock = acquire_build_user(GROUP, pool, exclude_uid=0)
    assert lock is not None
    yield lock.user
    lock.release()
    shutil.rmtree(pool)


@pytest.fixture
def world(build_user):
    """A fake real store with inputs, a chroot and a build dir, all traversable."""
    top = tempfile.mkdtemp(prefix="nw-sandbox-", dir="/tmp")
    os.chmod(top, 0o755)
    real = top + "/store"
    os.makedirs(real + "/aaaa-input-dir/bin", 0o755)
    with open(real + "/aaaa-input-dir/bin/data", "w") as f:
        f.write("input data\n")
    with open(real + "/bbbb-input-file", "w") as f:
        f.write("a file\n")
    os.symlink("aaaa-input-dir/bin/data", real + "/cccc-input-link")
    os.makedirs(real + "/zzzz-not-an-input", 0o755)
    build = top + "/nix-build-x.drv-0"
    os.mkdir(build, 0o700)
    os.chown(build, build_user.uid, build_user.gid)
    dirs = sandbox.prepare_chroot(real, "dddd-x.drv", STORE, build_gid=build_user.gid)
    inputs = {f"{STORE}/{b}": f"{real}/{b}"
              for b in ("aaaa-input-dir", "bbbb-input-file", "cccc-input-link")}
    yield {"top": top, "real": real, "dirs": dirs, "build": build, "inputs": inputs}
    sandbox.cleanup_chroot(dirs)
    shutil.rmtree(top)


def make_spec(world, **kw) -> sandbox.SandboxSpec:
    spec = sandbox.SandboxSpec(build_dir_host=world["build"], store_dir=STORE,
                               chroot_store_host=world["dirs"].store,
                               etc_dir_host=world["dirs"].etc,
                               input_paths_host=world["inputs"], **kw)
    sandbox.populate_chroot(spec)
    return spec


def run(spec, script: str, user, env=None) -> tuple[int, str]:
    """Fork, drop to ``user`` (None: stay root), exec the sandbox running ``script``."""
    env = {"PATH": "/path-not-set", "out": f"{STORE}/eeee-out"} if env is None else env
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.closerange(3, 1024)
            if user is not None:
                become_build_user(user)
            sandbox.exec_sandbox(spec, "/bin/sh", ["-c", script], env)
        finally:
            os._exit(127)
    os.close(w)
    with os.fdopen(r, errors="replace") as f:
        output = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


def test_identity_and_etc(world, build_user):
    spec = make_spec(world)
    code, out = run(spec, "id; hostname; cat /etc/passwd /etc/group /etc/hosts; "
                          "cat /proc/self/uid_map; pwd", build_user)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "uid=1000(nixbld) gid=100(nixbld) groups=100(nixbld)"
    assert lines[1] == "localhost"
    assert "\n".join(lines[2:5]) + "\n" == sandbox.default_passwd()
    assert "\n".join(lines[5:8]) + "\n" == "root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n"
    assert "\n".join(lines[8:10]) + "\n" == sandbox.DEFAULT_HOSTS
    assert lines[10].split()[0] == "1000"
    assert lines[-1] == "/build"


def test_store_shows_only_the_closure(world, build_user):
    spec = make_spec(world)
    code, out = run(spec, f"ls {STORE}; cat {STORE}/aaaa-input-dir/bin/data "
                          f"{STORE}/bbbb-input-file {STORE}/cccc-input-link; "
                          f"readlink {STORE}/cccc-input-link; "
                          f"test -e {STORE}/zzzz-not-an-input || echo absent; "
                          f"touch {STORE}/aaaa-input-dir/new 2>/dev/null || echo ro; "
                          f"rm -f {STORE}/bbbb-input-file 2>/dev/null; "
                          f"test -e {STORE}/bbbb-input-file && echo kept", build_user)
    assert code == 0, out
    assert out.splitlines() == ["aaaa-input-dir", "bbbb-input-file", "cccc-input-link",
                                "input data", "a file", "input data",
                                "aaaa-input-dir/bin/data", "absent", "ro", "kept"]


def test_output_is_collected(world, build_user):
    spec = make_spec(world)
    code, out = run(spec, f"mkdir $out && echo built > $out/result && "
                          f"echo second > {STORE}/ffff-out2", build_user)
    assert code == 0, out
    moved = sandbox.collect_outputs(spec.chroot_store_host,
                                    ["eeee-out", "ffff-out2", "gggg-missing"], world["real"])
    assert moved == ["eeee-out", "ffff-out2"]
    with open(world["real"] + "/eeee-out/result") as f:
        assert f.read() == "built\n"
    assert os.stat(world["real"] + "/eeee-out").st_uid == build_user.uid
    assert not os.path.exists(spec.chroot_store_host + "/eeee-out")
    sandbox.cleanup_chroot(world["dirs"])
    assert not os.path.exists(world["dirs"].root)


def test_chroot_layout(world, build_user):
    dirs = world["dirs"]
    assert dirs.root == world["real"] + "/dddd-x.drv.chroot"
    st = os.stat(dirs.root)
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 0, build_user.gid)
    st = os.stat(dirs.store)
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o1775, 0, build_user.gid)


def test_tmp_writable_host_hidden(world, build_user):
    spec = make_spec(world)
    code, out = run(spec, "echo x > /tmp/f && cat /tmp/f; stat -c %a /tmp; "
                          "ls /root 2>/dev/null || echo noroot; "
                          "test -e /etc/shadow || echo noshadow; ls /dev", build_user)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[:4] == ["x", "1777", "noroot", "noshadow"]
    devs = set(" ".join(lines[4:]).split())
    assert {"full", "null", "random", "tty", "urandom", "zero", "pts", "shm"} <= devs
    assert "sda" not in devs and "kmsg" not in devs


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "6")
        self.end_headers()
        self.wfile.write(b"hello\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("network", [False, True])
def test_network(world, build_user, http_server, network):
    spec = make_spec(world, network=network)
    code, out = run(spec, f"wget -q -O- http://127.0.0.1:{http_server}/ 2>&1; "
                          "ls /etc", build_user)
    assert code == 0, out
    if network:
        assert out.startswith("hello\n")
        assert "nsswitch.conf" in out
    else:
        assert "hello" not in out and "can't connect" in out


def test_env_and_option_like_builder(world, build_user):
    spec = make_spec(world)
    code, out = run(spec, "echo \"[$FOO] [$LD_PRELOAD] [$HOME]\"", build_user,
                    env={"FOO": "b a r", "LD_PRELOAD": "/nonexistent.so", "HOME": "-x"})
    assert code == 0, out
    assert out == "[b a r] [/nonexistent.so] [-x]\n"  # nothing from ld.so for bwrap
    argv = sandbox.bwrap_argv(spec, "--version", [], {})
    assert argv[-2:] == ["--", "--version"]
    with pytest.raises(ValueError):
        sandbox.bwrap_argv(spec, "/bin/sh", [], {"A=B": "x"})


def test_root_without_build_users(world):
    os.chown(world["build"], 0, 0)  # no build user: the build dir is the daemon's
    spec = make_spec(world)
    code, out = run(spec, "id -u; cat /proc/self/uid_map; echo y > $out; "
                          f"chmod u+w {STORE}/bbbb-input-file 2>/dev/null || echo ro; "
                          f"{{ echo evil >> {STORE}/bbbb-input-file; }} 2>/dev/null || echo ro", None)
    assert code == 0, out
    assert out.split() == ["1000", "1000", "0", "1", "ro", "ro"]
    with open(world["real"] + "/bbbb-input-file") as f:
        assert f.read() == "a file\n"
    assert os.stat(spec.chroot_store_host + "/eeee-out").st_uid == 0


def test_sandbox_paths_syntax():
    assert sandbox.parse_sandbox_paths(["/bin/sh=/bin/busybox", "/usr/x?", "/etc/y", ""]) == [
        ("/bin/sh", "/bin/busybox", False), ("/usr/x", "/usr/x", True),
        ("/etc/y", "/etc/y", False)]
    assert sandbox._sandbox_path_args(["/dev/kvm?", "/a=/b"]) == [
        "--dev-bind-try", "/dev/kvm", "/dev/kvm", "--ro-bind", "/b", "/a"]


def test_optional_missing_sandbox_path(world, build_user):
    spec = make_spec(world, sandbox_paths=["/bin/sh=/bin/busybox", "/nonexistent-nw?"])
    code, out = run(spec, "echo ok", build_user)
    assert (code, out) == (0, "ok\n")
    spec2 = sandbox.SandboxSpec(**{**spec.__dict__, "sandbox_paths": ["/bin/sh=/bin/busybox",
                                                                      "/nonexistent-nw"]})
    code, out = run(spec2, "echo ok", build_user)
    assert code != 0 and "nonexistent-nw" in out


@pytest.mark.parametrize("hardlink", [True, False])
def test_path_added_during_the_build_appears_in_the_sandbox(world, build_user, hardlink):
    """Recursive Nix: a path materialised while the builder runs becomes
    visible in its store, read-only, and the real store is untouched."""
    real = world["real"] + "/zzzz-not-an-input"
    os.makedirs(real + "/sub", 0o755)
    with open(real + "/sub/f", "w") as f:
        f.write("added later\n")
    os.chmod(real + "/sub/f", 0o444)
    os.symlink("sub/f", real + "/link")
    spec = make_spec(world)
    script = (f"i=0; while [ ! -e {STORE}/zzzz-not-an-input/link ] && [ $i -lt 200 ]; "
              f"do sleep 0.05; i=$((i+1)); done; cat {STORE}/zzzz-not-an-input/link; "
              f"{{ echo x >> {STORE}/zzzz-not-an-input/sub/f; }} 2>/dev/null || echo ro; "
              f"rm -f {STORE}/zzzz-not-an-input/sub/f 2>/dev/null; "
              f"test -e {STORE}/zzzz-not-an-input/sub/f && echo kept")
    got = {}
    runner = threading.Thread(target=lambda: got.update(r=run(spec, script, build_user)))
    runner.start()
    time.sleep(0.5)
    sandbox.materialise(world["dirs"].store, STORE, f"{STORE}/zzzz-not-an-input", real,
                        hardlink=hardlink)
    sandbox.materialise(world["dirs"].store, STORE, f"{STORE}/zzzz-not-an-input", real,
                        hardlink=hardlink)  # again: nothing to do
    runner.join(30)
    code, out = got["r"]
    assert code == 0, out
    assert out.splitlines() == ["added later", "ro", "kept"]
    copied = world["dirs"].store + "/zzzz-not-an-input/sub/f"
    assert (os.stat(copied).st_ino == os.stat(real + "/sub/f").st_ino) == hardlink
    sandbox.cleanup_chroot(world["dirs"])
    with open(real + "/sub/f") as f:
        assert f.read() == "added later\n"
    assert os.stat(real + "/sub/f").st_mode & 0o777 == 0o444
