"""Store optimisation: hard-link deduplication through ``.links`` (spec §7).

Holds ``optimise_path`` (one tree), ``optimise_store`` (every valid path,
what ``nix-store --optimise`` / OptimiseStore does) and ``auto_optimise``
(``auto-optimise-store`` after an add or a build).  The layout, the names
and the order of operations are those of Nix 2.8's ``optimise-store.cc``,
so CppNix and nixwarden can optimise and garbage-collect the same store:

* ``<real store>/.links/<nix32 sha256 of the file's NAR>`` holds one hard
  link per distinct file or symlink (the NAR includes the executable bit
  and the symlink target);
* a duplicate is replaced atomically: ``link(.links/h, .tmp-link-<pid>-<n>)``
  then ``rename`` over the file, its directory made writable for the
  moment and then restored to its canonical mode and mtime 1.

Process: session (the supervisor side, which owns the store).

Trust: the trees are store paths, whose content came from clients and
builders.  Nothing is followed: files are opened ``O_NOFOLLOW`` by the NAR
writer, symlinks are linked as themselves (``linkat`` without
``AT_SYMLINK_FOLLOW``), only regular files and symlinks are linked, and
writable regular files (modified store objects) are left alone.  A file
whose ``.links`` entry has another size (or, with ``repair``, another
content) finds that entry removed rather than trusted.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from dataclasses import dataclass
from typing import Callable, Protocol

from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.logtypes import ActivityType, ResultType, Verbosity, warning_line
from nixwarden.shared.nar import nar_hash_of_path
from nixwarden.supervisor.store.layout import StoreLayout

#: ``log(level, text)``: one message line for the client (Verbosity level).
LogFn = Callable[[int, str], None]
#: Called with ``(size, blocks)`` of each file replaced by a link.
LinkedFn = Callable[[int, int], None]


class ActivitySink(Protocol):
    """The activity half of the session's ``ClientLog``."""

    def start(self, level: int, activity_type: int, text: str = "",
              fields: tuple = (), parent: int = 0) -> int: ...

    def result(self, act: int, result_type: int, fields: tuple) -> None: ...

    def stop(self, act: int) -> None: ...


@dataclass
class OptimiseStats:
    """Nix's ``OptimiseStats``: what replacing files by links saved.

    ``bytes_freed`` and ``blocks_freed`` add up ``st_size`` / ``st_blocks``
    of every replaced file, as Nix counts them (even when the replaced
    inode had other links and so freed nothing).
    """

    files_linked: int = 0
    bytes_freed: int = 0
    blocks_freed: int = 0


def show_bytes(n: int) -> str:
    """Nix's ``showBytes``: ``"%.2f MiB"``."""
    return f"{n / (1024.0 * 1024.0):.2f} MiB"


def freed_message(stats: OptimiseStats) -> str:
    """The line ``optimiseStore()`` prints at the end (level INFO)."""
    return f"{show_bytes(stats.bytes_freed)} freed by hard-linking {stats.files_linked} files"


def _no_log(level: int, text: str) -> None:
    pass


def load_inodes(layout: StoreLayout, log: LogFn | None = None) -> set[int]:
    """The inode numbers of every ``.links`` entry (Nix's ``loadInodeHash``)."""
    with os.scandir(layout.links_dir) as it:
        inodes = {entry.inode() for entry in it}
    (log or _no_log)(Verbosity.TALKATIVE, f"loaded {len(inodes)} hash inodes")
    return inodes


class _Optimiser:
    """One optimisation run over one or more trees, sharing an inode set."""

    def __init__(self, layout: StoreLayout, inodes: set[int], stats: OptimiseStats,
                 *, repair: bool, log: LogFn | None):
        self.layout = layout
        self.inodes = inodes
        self.stats = stats
        self.repair = repair
        self.log = log or _no_log

    def tree(self, real_path: str, on_linked: LinkedFn | None = None) -> None:
        """Depth-first over ``real_path`` in directory order, as Nix recurses."""
        stack = [real_path]
        while stack:
            path = stack.pop()
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                stack.extend(reversed(self._entries(path)))
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                self._file(path, st, on_linked)

    def _entries(self, path: str) -> list[str]:
        """Directory entries whose inode is not already in ``.links``."""
        with os.scandir(path) as it:
            return [entry.path for entry in it if entry.inode() not in self.inodes]

    def _file(self, path: str, st: os.stat_result, on_linked: LinkedFn | None) -> None:
        if stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IWUSR:
            self.log(Verbosity.WARN, warning_line(f"skipping suspicious writable file '{path}'"))
            return
        if st.st_nlink > 1 and st.st_ino in self.inodes:
            return  # a top-level file already linked
        digest, _ = nar_hash_of_path(path)
        link_path = f"{self.layout.links_dir}/{digest.to_nix32()}"
        self._drop_corrupt_link(path, st, link_path, digest)
        if not _lexists(link_path) and self._make_link(path, st, link_path):
            return
        if self._replace(path, st, link_path):
            self.stats.files_linked += 1
            self.stats.bytes_freed += st.st_size
            self.stats.blocks_freed += st.st_blocks
            if on_linked is not None:
                on_linked(st.st_size, st.st_blocks)

    def _drop_corrupt_link(self, path: str, st: os.stat_result, link_path: str,
                           digest) -> None:
        """Remove a ``.links`` entry that cannot be the same file (spec §7)."""
        try:
            st_link = os.lstat(link_path)
        except FileNotFoundError:
            return
        if st.st_size == st_link.st_size and not (
                self.repair and nar_hash_of_path(link_path)[0] != digest):
            return
        self.log(Verbosity.WARN, warning_line(f"removing corrupted link '{link_path}'"))
        self.log(Verbosity.WARN, warning_line(
            "There may be more corrupted paths.\nYou should run "
            "`nix-store --verify --check-contents --repair` to fix them all"))
        _unlink_quietly(link_path)

    def _make_link(self, path: str, st: os.stat_result, link_path: str) -> bool:
        """Create ``.links/<h>`` for ``path``; True when there is nothing more to do."""
        try:
            os.link(path, link_path, follow_symlinks=False)
        except FileExistsError:
            return False  # another process was first: link to theirs
        except OSError as e:
            if e.errno == errno.ENOSPC:
                # A full directory index (ext4): this file stays as it is.
                self.log(Verbosity.INFO,
                         f"cannot link '{link_path}' to '{path}': {os.strerror(e.errno)}")
                return True
            raise StoreRefusal(f"cannot link '{link_path}' to '{path}': "
                               f"{os.strerror(e.errno or 0)}") from None
        self.inodes.add(st.st_ino)
        return True

    def _replace(self, path: str, st: os.stat_result, link_path: str) -> bool:
        """Replace ``path`` by a hard link to ``link_path``; whether it was."""
        if os.lstat(link_path).st_ino == st.st_ino:
            return False
        self.log(Verbosity.TALKATIVE, f"linking '{path}' to '{link_path}'")
        parent = os.path.dirname(path)
        toggle = parent != self.layout.real_store_dir
        if toggle:
            os.chmod(parent, os.lstat(parent).st_mode | stat.S_IWUSR)
        try:
            return self._swap_in(path, st, link_path)
        finally:
            if toggle:
                _restore_dir(parent)

    def _swap_in(self, path: str, st: os.stat_result, link_path: str) -> bool:
        temp = (f"{self.layout.real_store_dir}/.tmp-link-{os.getpid()}-"
                f"{random.randrange(2 ** 31)}")
        try:
            os.link(link_path, temp, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.EMLINK:  # >= 32000 links, likely an empty file
                if st.st_size:
                    self.log(Verbosity.INFO, f"'{link_path}' has maximum number of links")
                return False
            raise StoreRefusal(f"cannot link '{temp}' to '{link_path}': "
                               f"{os.strerror(e.errno or 0)}") from None
        try:
            os.rename(temp, path)
        except OSError as e:
            try:
                os.unlink(temp)
            except OSError:
                self.log(Verbosity.ERROR, f"unable to unlink '{temp}'")
            if e.errno == errno.EMLINK:
                return False
            raise StoreRefusal(f"cannot rename '{temp}' to '{path}': "
                               f"{os.strerror(e.errno or 0)}") from None
        return True


def _lexists(path: str) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _restore_dir(path: str) -> None:
    """Nix's ``canonicaliseTimestampAndPermissions`` for a directory.

    Mode back to 0555 (0444 without the owner x bit), mtime to 1, atime
    kept; failures are ignored, as in Nix's ``MakeReadOnly``.
    """
    try:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        if mode not in (0o444, 0o555):
            os.chmod(path, 0o555 if st.st_mode & stat.S_IXUSR else 0o444)
        if st.st_mtime != 1:
            os.utime(path, (int(st.st_atime), 1), follow_symlinks=False)
    except OSError:
        pass


def optimise_path(layout: StoreLayout, real_path: str, *, repair: bool = False,
                  log: LogFn | None = None, inodes: set[int] | None = None,
                  on_linked: LinkedFn | None = None) -> OptimiseStats:
    """Deduplicate the files of one store object (Nix's ``optimisePath_``).

    Args:
        real_path: the object's real path (``layout.real_path(p)``).
        repair: also compare the content of an existing ``.links`` entry.
        log: receives warnings and talkative lines.
        inodes: the ``.links`` inode set of this run (updated); empty when
            None, which is what Nix's per-path ``optimisePath`` uses.
        on_linked: called with ``(st_size, st_blocks)`` per linked file.
    Returns:
        What this call saved.
    Raises:
        StoreRefusal: a link or rename failed other than by ENOSPC/EMLINK.
        OSError: the tree could not be read.
    """
    stats = OptimiseStats()
    run = _Optimiser(layout, set() if inodes is None else inodes, stats,
                     repair=repair, log=log)
    run.tree(real_path, on_linked)
    return stats


def auto_optimise(layout: StoreLayout, real_path: str, *, repair: bool = False,
                  log: LogFn | None = None) -> None:
    """``auto-optimise-store``: deduplicate a path just added or built.

    Nix's ``LocalStore::optimisePath``: the caller checks the setting and
    calls this on the canonicalised real path before registering it
    (``repair`` as the add or build had it); only warnings are reported.
    """
    optimise_path(layout, real_path, repair=repair, log=log)


def optimise_store(layout: StoreLayout, db, log: LogFn | None, *,
                   acts: ActivitySink | None = None,
                   add_temp_root: Callable[[str], None] | None = None) -> OptimiseStats:
    """Deduplicate every valid path (OptimiseStore, ``nix-store --optimise``).

    Mirrors ``LocalStore::optimiseStore()`` of 2.8: an ``OPTIMISE_STORE``
    activity with progress results, per path a temp root, a validity
    re-check and a talkative ``optimising path '…'`` activity that gets a
    ``FILE_LINKED (size, blocks)`` result per replaced file; at the end the
    INFO line ``"<x.xx> MiB freed by hard-linking <n> files"``.

    Args:
        db: the ``StoreDB``.
        log: ``log(level, text)`` for the client.
        acts: the session's activity sink (``ClientLog``), if any.
        add_temp_root: registers a temp root for a path before it is
            touched, so that a concurrent GC leaves it alone.
    Returns:
        The totals.
    Raises:
        StoreRefusal: as ``optimise_path``.
    """
    log = log or _no_log
    paths = db.query_all_valid_paths()
    stats = OptimiseStats()
    run = _Optimiser(layout, load_inodes(layout, log), stats, repair=False, log=log)
    top = acts.start(Verbosity.INFO, ActivityType.OPTIMISE_STORE) if acts else 0
    try:
        _progress(acts, top, 0, len(paths))
        for done, path in enumerate(paths, 1):
            if add_temp_root is not None:
                add_temp_root(path)
            if db.is_valid(path):  # else collected meanwhile
                _optimise_one(run, acts, path)
            _progress(acts, top, done, len(paths))
    finally:
        if acts:
            acts.stop(top)
    log(Verbosity.INFO, freed_message(stats))
    return stats


def _optimise_one(run: _Optimiser, acts: ActivitySink | None, path: str) -> None:
    if acts is None:
        run.tree(run.layout.real_path(path))
        return
    act = acts.start(Verbosity.TALKATIVE, ActivityType.UNKNOWN, f"optimising path '{path}'")
    try:
        run.tree(run.layout.real_path(path),
                 lambda size, blocks: acts.result(act, ResultType.FILE_LINKED, (size, blocks)))
    finally:
        acts.stop(act)


def _progress(acts: ActivitySink | None, act: int, done: int, expected: int) -> None:
    """Nix's ``Activity::progress``: ``PROGRESS (done, expected, running, failed)``."""
    if acts:
        acts.result(act, ResultType.PROGRESS, (done, expected, 0, 0))
