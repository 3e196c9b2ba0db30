"""Where a local Nix store keeps its files (spec/local-store.md §1).

Holds ``StoreLayout``: the logical store directory (the one that is part of
store path hashes), the real directory where the files live (different for
chroot stores, ``local?root=R``), the state and log directories, and every
path derived from them (database, lock files, temp roots, GC roots).
``ensure_directories`` creates the state layout the way Nix 2.8's
``LocalStore`` constructor does, so that real Nix tools accept the store.

Runs in the supervisor process (the only process with a writable store).

Trust: the directories come from the daemon's own configuration and
environment (``NIX_STORE_DIR`` etc.), never from a client or worker.  Store
paths handed to ``real_path`` must already have been validated as lying in
the store directory by the caller (DESIGN.md §2.4); ``real_path`` only
checks the prefix again and refuses anything else.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

#: Nix's ``gc-reserved-space`` default (spec §1.2, ``db/reserved``).
DEFAULT_RESERVED_SIZE = 8 * 1024 * 1024


@dataclass(frozen=True)
class StoreLayout:
    """The directories of one local store.

    ``store_dir`` is logical (e.g. ``/nix/store``); ``real_store_dir`` is
    where the objects are on disk; both are absolute, without trailing
    slash.
    """

    store_dir: str
    real_store_dir: str
    state_dir: str
    log_dir: str

    @classmethod
    def default(cls) -> "StoreLayout":
        """The layout for ``/nix/store`` with Nix's default state dirs."""
        return cls("/nix/store", "/nix/store", "/nix/var/nix", "/nix/var/log/nix")

    @classmethod
    def chroot(cls, root: str, store_dir: str = "/nix/store") -> "StoreLayout":
        """The layout of ``local?root=<root>`` (spec §1.1)."""
        root = root.rstrip("/")
        return cls(store_dir, root + store_dir, root + "/nix/var/nix",
                   root + "/nix/var/log/nix")

    # -- derived paths ------------------------------------------------------

    @property
    def db_dir(self) -> str:
        return self.state_dir + "/db"

    @property
    def db_path(self) -> str:
        return self.db_dir + "/db.sqlite"

    @property
    def schema_path(self) -> str:
        return self.db_dir + "/schema"

    @property
    def big_lock_path(self) -> str:
        return self.db_dir + "/big-lock"

    @property
    def reserved_path(self) -> str:
        return self.db_dir + "/reserved"

    @property
    def gc_lock_path(self) -> str:
        return self.state_dir + "/gc.lock"

    @property
    def gc_socket_path(self) -> str:
        return self.state_dir + "/gc-socket/socket"

    @property
    def temproots_dir(self) -> str:
        return self.state_dir + "/temproots"

    @property
    def gcroots_dir(self) -> str:
        return self.state_dir + "/gcroots"

    @property
    def profiles_dir(self) -> str:
        return self.state_dir + "/profiles"

    @property
    def userpool_dir(self) -> str:
        return self.state_dir + "/userpool"

    @property
    def links_dir(self) -> str:
        return self.real_store_dir + "/.links"

    @property
    def daemon_socket_default(self) -> str:
        return self.state_dir + "/daemon-socket/socket"

    def real_path(self, store_path_full: str) -> str:
        """Map a logical store path (or a path inside one) to its real file.

        Raises:
            ValueError: the path is not below the logical store directory.
        """
        prefix = self.store_dir + "/"
        if not store_path_full.startswith(prefix) or len(store_path_full) == len(prefix):
            raise ValueError(f"path '{store_path_full}' is not in the Nix store")
        return self.real_store_dir + "/" + store_path_full[len(prefix):]

    # -- creation -----------------------------------------------------------

    def ensure_directories(self, *, as_root: bool) -> None:
        """Create the §1.2 layout (idempotent), as Nix 2.8 does on open.

        The store directory gets 0755 when newly created; multi-user
        ownership (root:nixbld 01775) is left to the caller.  ``as_root``
        selects the per-user directory name: ``root`` or the calling user.
        """
        _mkdirs(self.real_store_dir)
        _mkdirs(self.links_dir)
        _mkdirs(self.profiles_dir)
        _mkdirs(self.temproots_dir)
        _mkdirs(self.db_dir)
        if not os.path.isdir(self.gcroots_dir):
            _mkdirs(self.gcroots_dir)
            link = self.gcroots_dir + "/profiles"
            try:  # several processes may create a new store at once
                os.symlink(self.profiles_dir, link)
            except FileExistsError:
                pass
        for per_user in (self.profiles_dir + "/per-user", self.gcroots_dir + "/per-user"):
            _mkdirs(per_user)
            os.chmod(per_user, 0o755)
        self._ensure_user_dirs(as_root)

    def _ensure_user_dirs(self, as_root: bool) -> None:
        uid = 0 if as_root else os.getuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = "root" if uid == 0 else str(uid)
        for base in (self.profiles_dir, self.gcroots_dir):
            path = f"{base}/per-user/{name}"
            _mkdirs(path)
            os.chmod(path, 0o755)
            if os.getuid() == 0:
                os.chown(path, uid, os.getgid())

    def read_schema_version(self) -> int:
        """The legacy schema version in ``db/schema`` (0 if missing).

        Raises:
            ValueError: the file does not hold an integer ("is corrupt").
        """
        try:
            with open(self.schema_path, "rb") as f:
                text = f.read().decode("ascii", "replace")
        except FileNotFoundError:
            return 0
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(f"'{self.schema_path}' is corrupt") from None

    def write_schema_version(self, version: int) -> None:
        """Write ``db/schema`` as Nix does: decimal, no newline, 0666 & ~umask.

        Written to a temporary name and renamed, so a reader never sees it
        empty.
        """
        temp = f"{self.schema_path}.tmp-{os.getpid()}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, str(version).encode())
        finally:
            os.close(fd)
        os.rename(temp, self.schema_path)

    def ensure_reserved(self, size: int = DEFAULT_RESERVED_SIZE) -> None:
        """(Re)create ``db/reserved`` (deleted by every GC); errors ignored."""
        try:
            st = os.stat(self.reserved_path)
            if st.st_size == size:
                return
        except OSError:
            pass
        try:
            fd = os.open(self.reserved_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
        finally:
            os.close(fd)


def _mkdirs(path: str) -> None:
    """``mkdir -p`` with mode 0755 for the directories that are created."""
    os.makedirs(path, mode=0o755, exist_ok=True)
