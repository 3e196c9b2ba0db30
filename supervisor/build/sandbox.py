"""The Linux build sandbox, built from bubblewrap (spec §8.6).

Holds ``SandboxSpec`` (what the builder may see), ``prepare_chroot`` /
``populate_chroot`` / ``cleanup_chroot`` (the per-build host directory
``<real store>/<drv base>.chroot/`` as in Nix 2.8: ``etc/`` files and the
writable store directory in which outputs are created), ``bwrap_argv`` (the
bubblewrap command line), ``exec_sandbox`` (exec it with an empty
environment) and ``collect_outputs`` (move produced outputs into the real
store).

How a sandboxed build runs: the session (root) prepares and populates the
chroot, then forks a child that sets up the pty and session, drops to the
build user (or stays the daemon user when there are no build users) and
calls ``exec_sandbox``.  bwrap is *not* setuid: it creates an unprivileged
user namespace in which uid ``uid_inside`` (1000) and gid ``gid_inside``
(100) map to the build user and its group outside, and new mount, PID, IPC,
UTS (hostname ``localhost``), cgroup and network namespaces (network kept
only for fixed-output or impure derivations).  Inside: a tmpfs root, the
chroot's store directory bound writable at the logical store directory,
every directory and file of the input closure bound read-only on top of
it (symlinks are recreated, so they stay symlinks; nothing is hard-linked,
unlike Nix's ``linkOrCopy``), the build directory at ``/build``, a fresh
``/proc``, bwrap's minimal ``/dev`` (full null random tty urandom zero,
fd/stdin/stdout/stderr links, a private devpts with ptmx) plus a tmpfs
``/dev/shm``, a tmpfs ``/tmp`` (01777), ``/etc/passwd``, ``/etc/group``
and (for sandboxed derivations) ``/etc/hosts`` as §8.6, and the
``sandbox-paths`` bind mounts.  After exec bwrap holds no capabilities.

Differences from Nix 2.8: bwrap 0.8 has no ``--argv0``, so the builder's
``argv[0]`` is its full path (Nix passes the base name); the NIS domain
name is inherited rather than ``(none)``; non-directory inputs are bound,
not hard-linked.

``/bin/sh``: Debian's ``/bin/sh`` is dash, which is dynamically linked
against libc, so binding it alone gives a shell that cannot start.  Like
Nix (whose default is a bundled static busybox) the default
``sandbox-paths`` is ``/bin/sh=/bin/busybox`` from Debian's
``busybox-static`` (its shell runs applets such as ``id`` without a
``PATH``).  The caller passes its own list from the ``sandbox-paths``
setting; the store closure of store paths named there must be added to
``input_paths_host`` by the caller.

Process: session (prepare/populate/cleanup/collect, as root) and the
forked builder child (``exec_sandbox``, as the build user).

Trust: the derivation is client-supplied, so builder, arguments and
environment are hostile.  bwrap is exec'd with an *empty* environment (the
builder's variables travel as ``--setenv`` arguments after
``--clearenv``), so ``LD_PRELOAD`` and friends in a derivation never reach
bwrap, which runs outside the sandbox; the command follows ``--`` so a
builder named like an option is not parsed as one; variable names are
checked.  Paths in the spec come from the daemon (validated store paths,
the daemon's configuration), never from the client.  Outputs are
collected by ``rename`` without following links; the caller must kill the
build user's processes first and check ownership and modes afterwards
(§8.7).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nixwarden.supervisor.store.restore import remove_path

#: Where bubblewrap lives (Debian's ``bubblewrap`` package).
BWRAP = "/usr/bin/bwrap"

#: Default for the ``sandbox-paths`` setting: a static shell as /bin/sh.
DEFAULT_SANDBOX_PATHS: tuple[str, ...] = ("/bin/sh=/bin/busybox",)

#: Environment bwrap itself is started with (the builder's goes in argv).
BWRAP_ENV: dict[str, str] = {}

_NSSWITCH_FOD = "hosts: files dns\nservices: files\n"
#: Host files a network-enabled (FOD/impure) build sees, if they exist.
_FOD_HOST_ETC = ("/etc/resolv.conf", "/etc/services", "/etc/hosts")


def default_passwd(uid: int = 1000, gid: int = 100, build_dir: str = "/build") -> str:
    """``/etc/passwd`` inside the sandbox, byte-exact with Nix 2.8 (§8.6)."""
    return (f"root:x:0:0:Nix build user:{build_dir}:/noshell\n"
            f"nixbld:x:{uid}:{gid}:Nix build user:{build_dir}:/noshell\n"
            "nobody:x:65534:65534:Nobody:/:/noshell\n")


def default_group(gid: int = 100) -> str:
    """``/etc/group`` inside the sandbox (§8.6)."""
    return f"root:x:0:\nnixbld:!:{gid}:\nnogroup:x:65534:\n"


DEFAULT_HOSTS = "127.0.0.1 localhost\n::1 localhost\n"


@dataclass(frozen=True)
class ChrootDirs:
    """The per-build host directories (all below ``root``)."""

    root: str   # <real store>/<drv base>.chroot, 0750 root:<build group>
    store: str  # root + logical store dir, 01775 root:<build group>
    etc: str    # root + /etc, 0755 root

    @classmethod
    def for_drv(cls, real_store_dir: str, drv_basename: str, store_dir: str) -> "ChrootDirs":
        root = f"{real_store_dir}/{drv_basename}.chroot"
        return cls(root, root + store_dir, root + "/etc")


@dataclass
class SandboxSpec:
    """What one sandboxed builder sees.

    ``input_paths_host`` maps each path of the input closure as seen inside
    (a logical store path) to where it is on the host (its real path).
    ``sandbox_paths`` uses the setting's syntax: ``/p``, ``inside=host``,
    trailing ``?`` for optional.  ``etc_*`` default to §8.6's texts.
    """

    build_dir_host: str
    store_dir: str
    chroot_store_host: str
    etc_dir_host: str
    input_paths_host: dict[str, str] = field(default_factory=dict)
    sandbox_paths: Sequence[str] = DEFAULT_SANDBOX_PATHS
    network: bool = False
    build_dir_inside: str = "/build"
    uid_inside: int = 1000
    gid_inside: int = 100
    hostname: str = "localhost"
    etc_passwd: str | None = None
    etc_group: str | None = None
    etc_hosts: str = DEFAULT_HOSTS
    disable_userns: bool = False  # Nix 2.8 allows nested user namespaces
    new_session: bool = False     # see bwrap_argv

    def etc_files(self) -> dict[str, str]:
        """File name in /etc -> contents, as Nix writes them (§8.6)."""
        files = {
            "passwd": self.etc_passwd if self.etc_passwd is not None else
            default_passwd(self.uid_inside, self.gid_inside, self.build_dir_inside),
            "group": self.etc_group if self.etc_group is not None else
            default_group(self.gid_inside),
        }
        if self.network:
            files["nsswitch.conf"] = _NSSWITCH_FOD
        else:
            files["hosts"] = self.etc_hosts
        return files


# -- the chroot directory on the host ----------------------------------------


def prepare_chroot(real_store_dir: str, drv_basename: str, store_dir: str, *,
                   build_gid: int | None) -> ChrootDirs:
    """Create a fresh ``<real store>/<drv base>.chroot`` (Nix 2.8 layout).

    Any leftover from an earlier build is deleted first.  The root is 0750
    and the store directory 01775, both group ``build_gid`` (when there
    are build users) so the builder can create outputs but not delete
    others' entries.

    Raises:
        OSError: the directories cannot be created.
    """
    dirs = ChrootDirs.for_drv(real_store_dir, drv_basename, store_dir)
    cleanup_chroot(dirs)
    os.mkdir(dirs.root, 0o750)
    os.chmod(dirs.root, 0o750)
    os.makedirs(dirs.etc, 0o755)
    os.makedirs(dirs.store, 0o755)
    os.chmod(dirs.store, 0o1775)
    if build_gid is not None:
        os.chown(dirs.root, 0, build_gid)
        os.chown(dirs.store, 0, build_gid)
    return dirs


def populate_chroot(spec: SandboxSpec) -> None:
    """Write the ``/etc`` files and put the input closure's mount points in place.

    Directories and files of the closure get an empty directory or file
    that bwrap binds the real one over (read-only); symlinks are recreated
    with the same target.  Unlike Nix's ``linkOrCopy`` nothing is
    hard-linked, so no inode of the real store is reachable writably, even
    when the builder's uid maps to the store owner (no build users).
    Everything is owned by the caller (root), so a builder running as a
    build user cannot remove it from the sticky store directory.

    Raises:
        ValueError: an input is not a store path below ``store_dir``.
        OSError: a file cannot be written or created.
    """
    for name, text in spec.etc_files().items():
        _write_file(f"{spec.etc_dir_host}/{name}", text)
    for inside, host in spec.input_paths_host.items():
        target = spec.chroot_store_host + "/" + _store_basename(inside, spec.store_dir)
        mode = os.lstat(host).st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(target, 0o555)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(host), target)
        else:
            _write_file(target, "")


def materialise(chroot_store_host: str, store_dir: str, path: str, real_path: str, *,
                hardlink: bool) -> None:
    """Make store path ``path`` appear in a running sandbox (recursive Nix
    added it): a copy of its tree in the chroot's store, whose directory the
    sandbox has bound.  Files are hard links when ``hardlink`` (the builder
    runs as a build user and cannot write root's read-only files), copies
    otherwise.  Directories are the caller's (root's), as for the inputs.
    Nothing is done when the entry exists (an input, or added before).
    """
    target = chroot_store_host + "/" + _store_basename(path, store_dir)
    if os.path.lexists(target):
        return
    _copy_entry(real_path, target, hardlink)


def _copy_entry(src: str, dst: str, hardlink: bool) -> None:
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dst, 0o700)
        for name in sorted(os.listdir(src)):
            _copy_entry(os.path.join(src, name), os.path.join(dst, name), hardlink)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    elif hardlink:
        os.link(src, dst, follow_symlinks=False)
    else:
        shutil.copyfile(src, dst, follow_symlinks=False)
        os.chmod(dst, stat.S_IMODE(st.st_mode))


def _store_basename(path: str, store_dir: str) -> str:
    base = path[len(store_dir) + 1:]
    if not path.startswith(store_dir + "/") or not base or "/" in base or base in (".", ".."):
        raise ValueError(f"'{path}' is not a store path in '{store_dir}'")
    return base


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o444)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def cleanup_chroot(dirs: ChrootDirs) -> None:
    """Remove the chroot directory tree (missing is fine); never follows links."""
    remove_path(dirs.root)


def collect_outputs(chroot_store_host: str, output_basenames: Sequence[str],
                    real_store_dir: str) -> list[str]:
    """Move the outputs the builder produced into the real store (§8.7 step 8).

    Each ``<chroot store>/<base>`` that exists (of any type; links are
    moved, not followed) is renamed to ``<real store>/<base>``, replacing
    an invalid leftover there.  Both directories are on one file system,
    since the chroot lives inside the real store.

    Returns:
        The base names that were moved; a missing one is the caller's
        "failed to produce output path" error.

    Raises:
        ValueError: a base name is not a single path component.
        OSError: a rename failed.
    """
    moved = []
    for base in output_basenames:
        if not base or "/" in base or base in (".", ".."):
            raise ValueError(f"bad output name '{base}'")
        src = f"{chroot_store_host}/{base}"
        if not os.path.lexists(src):
            continue
        dst = f"{real_store_dir}/{base}"
        remove_path(dst)  # an invalid leftover
        os.rename(src, dst)
        moved.append(base)
    return moved


# -- the bubblewrap command line ----------------------------------------------


def parse_sandbox_paths(entries: Sequence[str]) -> list[tuple[str, str, bool]]:
    """``sandbox-paths`` entries as (inside, host, optional), Nix's syntax."""
    parsed = []
    for entry in entries:
        optional = entry.endswith("?")
        if optional:
            entry = entry[:-1]
        if not entry:
            continue
        inside, eq, host = entry.partition("=")
        parsed.append((inside, host if eq else inside, optional))
    return parsed


def bwrap_argv(spec: SandboxSpec, builder: str, args: Sequence[str],
               env: Mapping[str, str], *, bwrap: str = BWRAP) -> list[str]:
    """The bubblewrap command line that runs ``builder args…`` in ``spec``.

    ``env`` is the builder's complete environment (§8.3); it is passed as
    ``--clearenv --setenv …`` so bwrap must be exec'd with ``BWRAP_ENV``.
    ``--new-session`` is off by default: the caller already made the child
    a session leader without a controlling terminal, and the pty is private
    to this build, so TIOCSTI cannot reach anyone else.  The chroot must
    have been populated (``populate_chroot``).

    Raises:
        ValueError: an environment variable name bwrap cannot set, or a
            bad input path.
    """
    argv = [bwrap, *_namespace_args(spec), "--die-with-parent"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm",
             "--perms", "1777", "--tmpfs", "/tmp"]
    argv += _store_args(spec)
    argv += _etc_args(spec)
    argv += _sandbox_path_args(spec.sandbox_paths)
    argv += ["--bind", spec.build_dir_host, spec.build_dir_inside,
             "--chdir", spec.build_dir_inside]
    argv += _env_args(env)
    return argv + ["--", builder, *args]


def _namespace_args(spec: SandboxSpec) -> list[str]:
    argv = ["--unshare-all"]
    if spec.network:
        argv.append("--share-net")
    argv += ["--uid", str(spec.uid_inside), "--gid", str(spec.gid_inside),
             "--hostname", spec.hostname]
    if spec.disable_userns:
        argv.append("--disable-userns")
    if spec.new_session:
        argv.append("--new-session")
    return argv


def _store_args(spec: SandboxSpec) -> list[str]:
    """The writable chroot store, then each input read-only on it (not links)."""
    argv = ["--bind", spec.chroot_store_host, spec.store_dir]
    for inside, host in sorted(spec.input_paths_host.items()):
        _store_basename(inside, spec.store_dir)
        if not stat.S_ISLNK(os.lstat(host).st_mode):
            argv += ["--ro-bind", host, inside]
    return argv


def _etc_args(spec: SandboxSpec) -> list[str]:
    argv = []
    for name in spec.etc_files():
        argv += ["--ro-bind", f"{spec.etc_dir_host}/{name}", f"/etc/{name}"]
    if spec.network:
        for path in _FOD_HOST_ETC:
            argv += ["--ro-bind-try", path, path]
    return argv


def _sandbox_path_args(entries: Sequence[str]) -> list[str]:
    argv = []
    for inside, host, optional in parse_sandbox_paths(entries):
        is_dev = inside == "/dev" or inside.startswith("/dev/")
        verb = "--dev-bind" if is_dev else "--ro-bind"
        argv += [verb + ("-try" if optional else ""), host, inside]
    return argv


def _env_args(env: Mapping[str, str]) -> list[str]:
    argv = ["--clearenv"]
    for name, value in env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise ValueError(f"environment variable name '{name}' cannot be passed")
        argv += ["--setenv", name, value]
    return argv


def exec_sandbox(spec: SandboxSpec, builder: str, args: Sequence[str],
                 env: Mapping[str, str], *, bwrap: str = BWRAP) -> None:
    """Replace the calling (already dropped) builder child with bwrap.

    Raises:
        OSError: the exec failed; the child must report and exit.
    """
    argv = bwrap_argv(spec, builder, args, env, bwrap=bwrap)
    os.execve(bwrap, argv, BWRAP_ENV)
