"""The garbage collector (spec local-store §6.3), safe against every Nix process.

Takes ``gc.lock`` exclusively, serves ``gc-socket/socket`` so processes
that add temporary roots meanwhile are heard (and wait if their path is
being deleted right now), finds the roots, then walks the store: a path
is garbage only if nothing reachable from it through referrers (and
derivers or outputs, per ``keep-derivations``/``keep-outputs``) is a root.
Garbage is invalidated in the database (one transaction per walk when no
limit is set) and deleted referrers first; each path is first renamed to a
trash name so a crash never leaves a half deleted valid path.  Process:
session.

Trust: the request (action, paths, limit) comes from a client through a
worker; paths were checked by the session, liveness can never be ignored.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import socket
import threading
from collections import deque

from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.storepath import BadStorePath, StoreDir, StorePath
from nixwarden.supervisor.store.gcroots import RootFinder
from nixwarden.supervisor.store.locks import gc_lock
from nixwarden.supervisor.store.restore import remove_entry

log = logging.getLogger("nixwarden.gc")

RETURN_LIVE, RETURN_DEAD, DELETE_DEAD, DELETE_SPECIFIC = 0, 1, 2, 3
NO_LIMIT = 2**64 - 1  # the max-freed clients send unless told otherwise


class LimitReached(Exception):
    pass


class RootsServer:
    """The GC socket: temporary roots announced while the collector runs."""

    def __init__(self, path: str):
        self.path = path
        self.hash_parts: set[str] = set()
        self.pending: frozenset[str] = frozenset()  # being deleted right now
        self.cond = threading.Condition()
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.sock.listen(64)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for raw in lines:
                path = raw.rstrip(b"\n").decode(errors="replace")
                hash_part = os.path.basename(path)[:32]
                with self.cond:
                    self.hash_parts.add(hash_part)
                    while hash_part in self.pending:
                        self.cond.wait()
                try:
                    conn.sendall(b"1")
                except OSError:
                    return

    def set_pending(self, hash_parts: frozenset[str]) -> None:
        with self.cond:
            self.pending = hash_parts
            self.cond.notify_all()

    def is_temp_root(self, hash_part: str) -> bool:
        with self.cond:
            return hash_part in self.hash_parts

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class TrashRemover:
    """Removes renamed-away trees (trash) on background threads.

    A path's deletion is complete for everyone once it is invalid and
    renamed to its trash name; emptying the trash is slow file-system work
    (unlinks that wait on the journal) and need not hold up the walk.  Only
    file-system calls on the store descriptor run here: no database, no
    client log.  A trash entry left by a failure is an invalid name in the
    store, removed by the next collection."""

    THREADS = 2

    def __init__(self, store_fd: int):
        self.store_fd = store_fd
        self.queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.freed = [0] * self.THREADS
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                         name=f"gc-trash-{i}")
                        for i in range(self.THREADS)]
        for thread in self.threads:
            thread.start()

    def submit(self, trash: str) -> None:
        self.queue.put(trash)

    def _run(self, index: int) -> None:
        while (trash := self.queue.get()) is not None:
            try:
                self.freed[index] += remove_entry(self.store_fd, trash)
            except OSError as exc:
                log.error("cannot empty the garbage collector's trash: %s", exc)

    def finish(self) -> int:
        """Wait for every removal; return the bytes they freed."""
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        return sum(self.freed)


class Collector:
    def __init__(self, layout, db, *, keep_outputs: bool, keep_derivations: bool, log):
        self.layout = layout
        self.db = db
        self.store_dir = StoreDir(layout.store_dir)
        self.keep_outputs = keep_outputs
        self.keep_derivations = keep_derivations
        self.log = log
        self.alive: set[str] = set()
        self.dead: set[str] = set()
        self.results: list[str] = []
        self.bytes_freed = 0
        # Trash names: unique within the run, and against a crashed run's leftovers.
        self.trash_prefix = f".nixwarden-trash-{secrets.token_hex(8)}-"
        self.trash_count = 0

    def collect(self, action: int, paths: list[str], max_freed: int) -> tuple[list[str], int]:
        deleting = action in (DELETE_DEAD, DELETE_SPECIFIC)
        if deleting:
            _unlink_quietly(os.path.join(self.layout.db_dir, "reserved"))
        with gc_lock(self.layout, exclusive=True):
            self.server = RootsServer(self.layout.gc_socket_path)
            self.store_fd = os.open(self.layout.real_store_dir,
                                    os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            # Without a limit, nothing waits for the bytes each deletion
            # frees: trash is emptied in the background, all of it before
            # the answer (and the GC lock) is given back.
            self.trash_remover = (TrashRemover(self.store_fd)
                                  if deleting and max_freed >= NO_LIMIT else None)
            try:
                self._collect_locked(action, paths, max_freed, deleting)
            finally:
                if self.trash_remover is not None:
                    self.bytes_freed += self.trash_remover.finish()
                os.close(self.store_fd)
                self.server.close()
        if action == RETURN_LIVE:
            return sorted(self.alive), 0
        if action == RETURN_DEAD:
            return sorted(self.dead), 0
        if deleting:
            self._delete_unused_links()
        return self.results, self.bytes_freed

    def _collect_locked(self, action, paths, max_freed, deleting) -> None:
        self.log("finding garbage collector roots...")
        finder = RootFinder(self.layout, self.db, log=self.log)
        self.roots = set(finder.permanent()) | set(finder.runtime(censor=True))
        for path in finder.temporary(censor=True):
            self.server.hash_parts.add(os.path.basename(path)[:32])
            self.roots.add(path)
        self.deleting, self.action, self.max_freed = deleting, action, max_freed
        self.requested = set(paths)
        try:
            if action == DELETE_SPECIFIC:
                for path in paths:
                    self._visit(path)
                    if path not in self.dead:
                        raise StoreRefusal(
                            f"Cannot delete path '{path}' since it is still alive. "
                            "To find out why, use: nix-store --query --roots")
            elif max_freed > 0:
                self.log("deleting garbage..." if deleting else "determining live/dead paths...")
                self._sweep()
        except LimitReached:
            pass

    def _sweep(self) -> None:
        with os.scandir(self.layout.real_store_dir) as entries:
            names = [e.name for e in entries if e.name != ".links"]
        for name in names:
            try:
                sp = StorePath.from_base(name)
            except (BadStorePath, ValueError):
                if self.deleting:
                    self._delete_entry(name)
                continue
            self._visit(self.store_dir.print(sp))

    # --- the walk ------------------------------------------------------------------

    def _visit(self, start: str) -> None:
        if start in self.dead or start in self.alive:  # settled by an earlier walk
            return
        visited, todo = {start}, deque([start])
        referrers: dict[str, list[str]] = {}  # of each path walked, for the order below
        while todo:
            path = todo.popleft()
            if path in self.alive:
                self.alive.add(start)
                return
            if path in self.dead:
                continue
            if path in self.roots or self.server.is_temp_root(os.path.basename(path)[:32]):
                self._mark_alive(path, start)
                return
            if self.action == DELETE_SPECIFIC and path not in self.requested:
                return
            for nxt in self._edges(path, referrers):
                if nxt not in visited:
                    visited.add(nxt)
                    todo.append(nxt)
        doomed = [p for p in self._referrers_first(visited, referrers) if p not in self.dead]
        if not self.deleting:
            self.dead.update(doomed)
            return
        # Without a limit, all of a walk's garbage goes in one transaction;
        # with one, path by path, to stop as soon as enough is freed.
        step = max(1, len(doomed)) if self.trash_remover is not None else 1
        for i in range(0, len(doomed), step):
            if not self._delete_paths(doomed[i:i + step]):
                self.alive.update(doomed[i:])  # one became a temporary root since the walk
                return

    def _edges(self, path: str, referrers: dict[str, list[str]]) -> list[str]:
        # (every query below answers nothing for an invalid path but the last)
        referrers[path] = self.db.query_referrers(path)
        out = list(referrers[path])
        if self.keep_derivations and path.endswith(".drv"):
            for o in self.db.query_derivation_outputs(path).values():
                if self.db.is_valid(o) and self.db.query_deriver(o) == path:
                    out.append(o)
        if self.keep_outputs and (out or self.db.is_valid(path)):
            out.extend(self.db.query_valid_derivers(path))
        return out

    def _mark_alive(self, path: str, start: str) -> None:
        self.alive.add(start)
        todo = [path]
        while todo:
            p = todo.pop()
            if p in self.alive and p != start:
                continue
            self.alive.add(p)
            info = self.db.query_path_info(p)
            if info is None:
                continue
            todo.extend(r for r in info.references if r not in self.alive)
            if self.keep_derivations and info.deriver and self.db.is_valid(info.deriver):
                todo.append(info.deriver)
            if self.keep_outputs and p.endswith(".drv"):
                todo.extend(o for o in self.db.query_derivation_outputs(p).values()
                            if self.db.is_valid(o))

    def _referrers_first(self, paths: set[str], referrers: dict[str, list[str]]) -> list[str]:
        """Order ``paths`` so that every referrer comes before what it refers to,
        exactly as Nix's ``topoSortPaths`` (depth first over the paths in
        name order, reversed post-order), so deletions happen in Nix's order.

        The references among ``paths`` are read off the walk's ``referrers``
        (a path the walk passed over as already deleted has none)."""
        key = os.path.basename
        refs_within: dict[str, list[str]] = {p: [] for p in paths}
        for path in paths:
            for referrer in referrers.get(path, ()):
                if referrer != path and referrer in refs_within:
                    refs_within[referrer].append(path)
        for refs in refs_within.values():
            refs.sort(key=key)
        order: list[str] = []
        seen: set[str] = set()
        for first in sorted(paths, key=key):
            if first in seen:
                continue
            seen.add(first)
            stack = [(first, iter(refs_within[first]))]
            while stack:
                path, children = stack[-1]
                for child in children:
                    if child not in seen:
                        seen.add(child)
                        stack.append((child, iter(refs_within[child])))
                        break
                else:
                    stack.pop()
                    order.append(path)
        order.reverse()
        return order

    # --- deleting --------------------------------------------------------------------

    def _delete_paths(self, paths: list[str]) -> bool:
        """Invalidate ``paths`` (referrers first) in one transaction and delete
        them; False, touching nothing, if one is a temporary root by now."""
        hash_parts = frozenset(os.path.basename(p)[:32] for p in paths)
        self.server.set_pending(hash_parts)  # their announcements wait until we are done
        try:
            if any(self.server.is_temp_root(h) for h in hash_parts):
                return False
            self.dead.update(paths)
            self.db.invalidate_paths(paths)  # (nothing to do for invalid ones)
            for path in paths:
                self._delete_entry(os.path.basename(path))
        finally:
            self.server.set_pending(frozenset())
        return True

    def _delete_entry(self, name: str) -> None:
        self.log(f"deleting '{self.store_dir}/{name}'")
        self.trash_count += 1
        trash = f"{self.trash_prefix}{self.trash_count}"
        try:
            os.rename(name, trash, src_dir_fd=self.store_fd, dst_dir_fd=self.store_fd)
        except FileNotFoundError:
            pass  # reported all the same, as Nix does (an invalid path)
        else:
            if self.trash_remover is not None:
                self.trash_remover.submit(trash)
            else:
                self.bytes_freed += remove_entry(self.store_fd, trash)
        self.results.append(f"{self.store_dir}/{name}")
        if self.bytes_freed > self.max_freed:
            self.log(f"deleted more than {self.max_freed} bytes; stopping")
            raise LimitReached()

    def _delete_unused_links(self) -> None:
        links = os.path.join(self.layout.real_store_dir, ".links")
        if not os.path.isdir(links):
            return
        self.log("deleting unused links...")
        actual = unshared = 0
        for entry in os.scandir(links):
            st = entry.stat(follow_symlinks=False)
            if st.st_nlink != 1:
                actual += st.st_size
                unshared += (st.st_nlink - 1) * st.st_size
                continue
            os.unlink(entry.path)
        overhead = os.stat(links).st_blocks * 512
        self.log(f"note: currently hard linking saves "
                 f"{(unshared - actual - overhead) / (1024.0 * 1024.0):.2f} MiB")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
