"""``builtin:buildenv``: the user-environment symlink forest (spec §8.10).

Holds ``build_profile`` and ``builtin_buildenv``, which follow Nix 2.8's
``builtins/buildenv.cc``: packages sorted by (priority, path), active ones
linked in; directories merged recursively (a symlink to a directory is
replaced by a real directory holding both trees); for files the lower
priority number wins and equal priorities are a collision error; a few
names are never linked; then packages named in
``nix-support/propagated-user-env-packages`` at priorities 1000, 1001, …;
finally ``manifest.nix`` -> ``$manifest``.  Messages are Nix's.

All paths are logical (``/nix/store/…``, as a sandboxed builder would see
them); file system access goes through a ``PathView``.  Symlinks are
created pointing at logical paths.

Process: the forked builder child, as the build user.

Trust: ``derivations`` and ``manifest`` come from the client's derivation.
The ``PathView`` limits what can be read to the input closure (in a
sandboxed build); tokens are parsed strictly, so malformed input is an
error, never an out-of-range read.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from nixwarden.supervisor.build.pathview import PathView

#: Entries never linked into a profile (``hasSuffix`` tests in buildenv.cc).
_SKIPPED_SUFFIXES = ("/propagated-build-inputs", "/nix-support", "/perllocal.pod",
                     "/info/dir", "/log", "/manifest.nix", "/manifest.json")
_STOI = re.compile(r"[ \t\n\r\f\v]*([+-]?[0-9]+)")
_PROPAGATED = "/nix-support/propagated-user-env-packages"


class BuildenvError(Exception):
    """A failure reported in the build log as Nix words it."""


@dataclass(frozen=True)
class Package:
    path: str
    active: bool
    priority: int


@dataclass
class _State:
    view: PathView
    warn: Callable[[str], None]
    priorities: dict[str, int] = field(default_factory=dict)
    symlinks: int = 0


def _sys_error(context: str, e: OSError) -> BuildenvError:
    return BuildenvError(f"{context}: {e.strerror}")


def _lstat_or_none(state: _State, path: str) -> os.stat_result | None:
    try:
        return state.view.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _sys_error(f"getting status of '{path}'", e) from None


def _read_directory(state: _State, src_dir: str) -> list[str] | None:
    try:
        return sorted(os.listdir(state.view.resolve(src_dir)))
    except NotADirectoryError:
        state.warn(f"not including '{src_dir}' in the user environment "
                   "because it's not a directory")
        return None
    except OSError as e:
        raise _sys_error(f"opening directory '{src_dir}'", e) from None


def _create_symlink(state: _State, target: str, link: str) -> None:
    try:
        os.symlink(target, state.view.host(link))
    except OSError as e:
        raise _sys_error(f"creating symlink from '{link}' to '{target}'", e) from None


def _link_dir(state: _State, src: str, dst: str, priority: int) -> bool:
    """A directory entry: merge into an existing tree; True if handled."""
    dst_st = _lstat_or_none(state, dst)
    if dst_st is None:
        return False
    if stat.S_ISDIR(dst_st.st_mode):
        create_links(state, src, dst, priority)
        return True
    if not stat.S_ISLNK(dst_st.st_mode):
        return False
    target = state.view.canon(dst)
    if not stat.S_ISDIR(state.view.lstat(target).st_mode):
        raise BuildenvError(f"collision between '{src}' and non-directory '{target}'")
    host = state.view.host(dst)
    os.unlink(host)
    os.mkdir(host, 0o755)
    create_links(state, target, dst, state.priorities.get(dst, 0))
    create_links(state, src, dst, priority)
    return True


def _link_file(state: _State, src: str, dst: str, priority: int) -> bool:
    """A non-directory entry: resolve a collision; True if it must be skipped."""
    dst_st = _lstat_or_none(state, dst)
    if dst_st is None:
        return False
    if stat.S_ISLNK(dst_st.st_mode):
        prev = state.priorities.get(dst, 0)
        if prev == priority:
            raise BuildenvError(
                f"packages '{src}' and '{os.readlink(state.view.host(dst))}' have the same "
                f"priority {priority}; use 'nix-env --set-flag priority NUMBER "
                "INSTALLED_PKGNAME' to change the priority of one of the conflicting "
                "packages (0 being the highest priority)")
        if prev < priority:
            return True
        os.unlink(state.view.host(dst))
    elif stat.S_ISDIR(dst_st.st_mode):
        raise BuildenvError(
            f"collision between non-directory '{src}' and directory '{dst}'")
    return False


def create_links(state: _State, src_dir: str, dst_dir: str, priority: int) -> None:
    """Link every entry of ``src_dir`` into ``dst_dir`` (``createLinks``)."""
    names = _read_directory(state, src_dir)
    for name in names or ():
        if name.startswith("."):
            continue
        src, dst = f"{src_dir}/{name}", f"{dst_dir}/{name}"
        try:
            src_st = state.view.stat(src)
        except (FileNotFoundError, NotADirectoryError):
            state.warn(f"skipping dangling symlink '{dst}'")
            continue
        except OSError as e:
            raise _sys_error(f"getting status of '{src}'", e) from None
        if src.endswith(_SKIPPED_SUFFIXES):
            continue
        if stat.S_ISDIR(src_st.st_mode):
            if _link_dir(state, src, dst, priority):
                continue
        elif _link_file(state, src, dst, priority):
            continue
        _create_symlink(state, src, dst)
        state.priorities[dst] = priority
        state.symlinks += 1


def _propagated(state: _State, pkg_dir: str) -> list[str]:
    try:
        with open(state.view.resolve(pkg_dir + _PROPAGATED), "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise _sys_error(f"opening file '{pkg_dir + _PROPAGATED}'", e) from None
    return [t for t in re.split(r"[ \n]+", text) if t]


def build_profile(out: str, packages: list[Package], view: PathView,
                  warn: Callable[[str], None]) -> int:
    """Fill the (existing) directory ``out``; returns the number of symlinks."""
    state = _State(view, warn)
    done: set[str] = set()
    postponed: set[str] = set()

    def add(pkg_dir: str, priority: int) -> None:
        if pkg_dir in done:
            return
        done.add(pkg_dir)
        create_links(state, pkg_dir, out, priority)
        postponed.update(p for p in _propagated(state, pkg_dir) if p not in done)

    for pkg in sorted(packages, key=lambda p: (p.priority, p.path)):
        if pkg.active:
            add(pkg.path, pkg.priority)
    counter = 1000
    while postponed:
        batch = sorted(postponed)
        postponed.clear()
        for pkg_dir in batch:
            add(pkg_dir, counter)
            counter += 1
    return state.symlinks


def _stoi(token: str) -> int:
    """C++ ``std::stoi``: leading integer, trailing text ignored."""
    m = _STOI.match(token)
    if not m:
        raise BuildenvError("stoi")
    value = int(m.group(1))
    if not -2**31 <= value < 2**31:
        raise BuildenvError("stoi")
    return value


def parse_derivations(text: str) -> list[Package]:
    """The ``derivations`` attribute: ``active priority n path₁…pathₙ`` repeated."""
    tokens = [t for t in re.split(r"[ \t\n\r]+", text) if t][::-1]
    packages = []
    try:
        while tokens:
            active = tokens.pop() != "false"
            priority = _stoi(tokens.pop())
            count = _stoi(tokens.pop())
            for _ in range(max(count, 0)):
                packages.append(Package(tokens.pop(), active, priority))
    except IndexError:
        raise BuildenvError("attribute 'derivations' is truncated") from None
    return packages


def _get_attr(env: Mapping[str, str], name: str) -> str:
    try:
        return env[name]
    except KeyError:
        raise BuildenvError(f"attribute '{name}' missing") from None


def builtin_buildenv(env: Mapping[str, str], view: PathView,
                     warn: Callable[[str], None]) -> None:
    """Run ``builtin:buildenv`` for derivation environment ``env``.

    Raises:
        BuildenvError: a missing attribute, a collision, an I/O failure.
    """
    out = _get_attr(env, "out")
    try:
        os.makedirs(view.host(out), 0o755, exist_ok=True)
    except OSError as e:
        raise _sys_error(f"creating directory '{out}'", e) from None
    packages = parse_derivations(_get_attr(env, "derivations"))
    build_profile(out, packages, view, warn)
    _create_symlink(_State(view, warn), _get_attr(env, "manifest"), out + "/manifest.nix")

