"""Adding store objects: receive, verify, lock, move into place, register.

``add_nar`` serves AddToStoreNar/AddMultipleToStore (a NAR with claimed
metadata); ``add_content`` serves AddToStore/AddTextToStore (content whose
store path follows from its hash).  Both receive into a temporary entry
(``incoming.py``), compare every claim with what was computed, take the
CppNix path lock on the destination, and then either drop the temporary
entry (the path became valid meanwhile) or rename it into place and
register it in one transaction.  On any error the temporary entry is
removed and nothing is registered.  Process: session.

Trust: claims (hash, size, content address, references, signatures) come
from a client; each is checked here against what was received, and the
signature policy follows the session's trust (spec worker-protocol §6).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from nixwarden.shared import nar
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.hashes import Hash, HashAlgo
from nixwarden.shared.storepath import (ContentAddress, ContentAddressMethod,
                                        StoreDir, StorePath)
from nixwarden.supervisor.store import signatures
from nixwarden.supervisor.store.incoming import Incoming, NotRegularFile, temp_entry_name
from nixwarden.supervisor.store.locks import PathLock
from nixwarden.supervisor.store.pathinfo import PathInfo
from nixwarden.supervisor.store.restore import remove_entry


@dataclass(frozen=True)
class NarClaim:
    """What a client says about a NAR it sends (AddToStoreNar)."""

    path: str
    deriver: str | None
    nar_hash: Hash
    references: tuple[str, ...]
    registration_time: int
    nar_size: int
    ultimate: bool
    sigs: tuple[str, ...]
    ca: ContentAddress | None


class StoreWriter:
    """The adding side of one session's local store."""

    def __init__(self, layout, db, temp_roots, settings):
        self.layout = layout
        self.db = db
        self.temp_roots = temp_roots
        self.store_dir = StoreDir(layout.store_dir)
        self.set_policy(settings)
        self.store_fd = os.open(layout.real_store_dir,
                                os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # Hashes modulo of the input derivations of added .drv files, by
        # path: a .drv's path fixes its content, so they never go stale.
        self.drv_hashes: dict = {}

    def close(self) -> None:
        os.close(self.store_fd)

    def set_policy(self, settings) -> None:
        """Signature policy from the session's settings (again after SetOptions)."""
        self.require_sigs = bool(settings.require_sigs)
        self.auto_optimise = bool(getattr(settings, "get", lambda _: False)("auto-optimise-store"))
        self.public_keys = signatures.load_public_keys(settings.trusted_public_keys,
                                                       settings.secret_key_files)

    # --- receiving ---------------------------------------------------------------

    def _receive(self, chunks, *, nar_input: bool, ca: ContentAddressMethod | None):
        name = temp_entry_name()
        self.temp_roots.add(f"{self.store_dir}/{name}")
        incoming = Incoming(self.store_fd, name, nar_input=nar_input, ca=ca)
        try:
            for data in chunks:
                incoming.feed(data)
            return name, incoming.finish()
        except BaseException as exc:
            try:
                drain(chunks)  # keep the worker's stream in sync, then fail
            finally:
                incoming.abort()  # even when the client vanished while draining
            refusal = _receive_refusal(exc)
            if refusal is None:
                raise
            raise refusal from None

    # --- AddToStoreNar -----------------------------------------------------------

    def add_nar(self, claim: NarClaim, chunks, *, repair: bool, check_sigs: bool) -> None:
        """Add a NAR under its claimed path, checking every claim.

        Raises:
            StoreRefusal: a failed check, with CppNix's message.
        """
        if check_sigs and self._untrusted(claim):
            drain(chunks)
            raise StoreRefusal(f"cannot add path '{claim.path}' because it lacks a valid signature")
        self.temp_roots.add(claim.path)
        if not repair and self.db.is_valid(claim.path):
            drain(chunks)
            return
        ca_method = claim.ca.method_algo if claim.ca else None
        name, got = self._receive(chunks, nar_input=True, ca=ca_method)
        self._current_entry = name
        try:
            self._check_nar(claim, got)
        except BaseException:
            remove_entry(self.store_fd, name)
            raise
        info = PathInfo(claim.path, claim.deriver, f"sha256:{got.nar_hash.to_base16()}",
                        claim.references, claim.registration_time, got.nar_size,
                        claim.ultimate, claim.sigs, claim.ca.render() if claim.ca else None)
        self._commit(name, info, repair)

    def _check_nar(self, claim: NarClaim, got) -> None:
        if got.nar_hash != claim.nar_hash:
            raise StoreRefusal(
                f"hash mismatch importing path '{claim.path}';\n"
                f"  specified: {claim.nar_hash.to_prefixed('nix32')}\n"
                f"  got:       {got.nar_hash.to_prefixed('nix32')}")
        if got.nar_size != claim.nar_size:
            raise StoreRefusal(
                f"size mismatch importing path '{claim.path}';\n"
                f"  specified: {claim.nar_size}\n  got:       {got.nar_size}")
        if claim.ca is not None:
            got_ca = got.ca_hash
            if claim.path in claim.references:
                got_ca = self._ca_hash_modulo_self(claim)
            if got_ca != claim.ca.hash:
                raise StoreRefusal(
                    f"ca hash mismatch importing path '{claim.path}';\n"
                    f"  specified: {claim.ca.hash.to_prefixed('nix32')}\n"
                    f"  got:       {got_ca.to_prefixed('nix32')}")
            if not self._ca_matches_path(claim.path, claim.ca, claim.references):
                raise StoreRefusal(
                    f"cannot add path '{claim.path}' to the Nix store because it claims "
                    "to be content-addressed but isn't")

    def _ca_hash_modulo_self(self, claim: NarClaim) -> Hash:
        """The content hash of a self-referencing object (spec SF §11.3)."""
        from nixwarden.shared import nar
        from nixwarden.supervisor.build.ca import hash_modulo_self
        real = os.path.join(self.layout.real_store_dir, self._current_entry)
        hash_part = self.store_dir.parse(claim.path).hash_part
        if claim.ca.method == "nar":
            return hash_modulo_self(nar.dump(real), hash_part, claim.ca.hash.algo)
        with open(real, "rb") as f:
            return hash_modulo_self(iter(lambda: f.read(1 << 20), b""), hash_part,
                                    claim.ca.hash.algo)

    def _ca_matches_path(self, path: str, ca: ContentAddress, references) -> bool:
        sp = self.store_dir.parse(path)
        refs = [self.store_dir.parse(r) for r in references if r != path]
        try:
            expected = self.store_dir.make_path_from_ca(sp.name, ca, refs, path in references)
        except ValueError:
            return False
        return expected == sp

    def _untrusted(self, claim: NarClaim) -> bool:
        """CppNix's pathInfoIsUntrusted: no CA proof and no trusted signature."""
        if not self.require_sigs:
            return False
        if claim.ca is not None and self._ca_matches_path(claim.path, claim.ca, claim.references):
            return False
        if claim.nar_size == 0:
            return True
        return signatures.check_path_sigs(claim.path, claim.nar_hash, claim.nar_size,
                                          claim.references, claim.sigs, self.public_keys) == 0

    def import_nar(self, chunks, read_claim, *, check_sigs: bool) -> None:
        """Add one path of the legacy export format (ImportPaths).

        The format puts the metadata after the NAR, so the NAR is received
        first; ``read_claim(nar_hash, nar_size)`` then returns the claim.
        """
        name, got = self._receive(chunks, nar_input=True, ca=None)
        try:
            claim = read_claim(got.nar_hash, got.nar_size)
            if check_sigs and self._untrusted(claim):
                raise StoreRefusal(
                    f"cannot add path '{claim.path}' because it lacks a valid signature")
            self.temp_roots.add(claim.path)
        except BaseException:
            remove_entry(self.store_fd, name)
            raise
        info = PathInfo(claim.path, claim.deriver, f"sha256:{got.nar_hash.to_base16()}",
                        claim.references, 0, got.nar_size, False, (), None)
        self._commit(name, info, repair=False)

    # --- AddToStore / AddTextToStore ---------------------------------------------

    def add_content(self, name: str, method: ContentAddressMethod, references: list[str],
                    chunks, *, nar_input: bool, repair: bool) -> PathInfo:
        """Add content under the path its hash gives; return the path's info."""
        if method.method == "git":
            drain(chunks)
            raise StoreRefusal("git hashing is not supported by this daemon")
        refs = [self.store_dir.parse(r) for r in references]
        if refs and not (method.method == "text" or
                         (method.method == "nar" and method.algo == HashAlgo.SHA256)):
            drain(chunks)
            raise StoreRefusal(f"cannot add '{name}' with references: only text and "
                               "recursive sha256 content addresses may have references")
        try:
            entry, got = self._receive(chunks, nar_input=nar_input, ca=method)
        except NotRegularFile:
            raise StoreRefusal("regular file expected") from None  # CppNix's words
        try:
            ca = ContentAddress(method.method, got.ca_hash)
            path = self.store_dir.print(self.store_dir.make_path_from_ca(name, ca, refs, False))
        except (ValueError, StoreRefusal) as exc:
            remove_entry(self.store_fd, entry)
            raise StoreRefusal(str(exc)) from None
        self.temp_roots.add(path)
        info = PathInfo(path, None, f"sha256:{got.nar_hash.to_base16()}",
                        tuple(sorted(references)), 0, got.nar_size, False, (), ca.render())
        self._commit(entry, info, repair)
        return self.db.query_path_info(path)

    # --- moving into place ---------------------------------------------------------

    def _commit(self, entry: str, info: PathInfo, repair: bool) -> None:
        """Move ``entry`` into place as ``info.path`` and register it, under
        the path's lock; a path found valid meanwhile is kept as it is (the
        entry is dropped) unless repairing."""
        base = self.store_dir.parse(info.path).base
        moved = False
        try:
            with PathLock([self.layout.real_path(info.path)]):
                if not repair and self.db.is_valid(info.path):
                    return
                self._move_into_place(entry, base)
                moved = True
                if self.auto_optimise:
                    from nixwarden.supervisor.store.optimise import auto_optimise
                    auto_optimise(self.layout, self.layout.real_path(info.path))
                try:
                    self.db.register_valid_paths([info], self._derivation_outputs(info))
                except BaseException:
                    remove_entry(self.store_fd, base)
                    raise
        finally:
            if not moved:
                remove_entry(self.store_fd, entry)

    def _move_into_place(self, entry: str, base: str) -> None:
        """Rename ``entry`` to ``base``; whatever is at ``base`` (an invalid
        left-over, or the old copy when repairing) is replaced: by the
        rename itself for a file, removed first for a directory."""
        try:
            os.rename(entry, base, src_dir_fd=self.store_fd, dst_dir_fd=self.store_fd)
            return
        except OSError as exc:
            if exc.errno not in _IN_THE_WAY:
                raise
        remove_entry(self.store_fd, base)
        os.rename(entry, base, src_dir_fd=self.store_fd, dst_dir_fd=self.store_fd)

    def _derivation_outputs(self, info: PathInfo):
        if not info.path.endswith(".drv"):
            return None
        from nixwarden.supervisor.store import drvoutputs
        return drvoutputs.outputs_for_new_drv(self, info.path)


def _receive_refusal(exc: BaseException) -> StoreRefusal | None:
    """The client's error for a failed receive, or None to let ``exc`` through.

    The whole stream has been drained, so the connection is in sync and the
    client can be told: a malformed NAR (``bad archive``, as CppNix words
    it) or a full disk.  Anything else (the worker went away, a bug) ends
    the session as before.
    """
    if isinstance(exc, nar.NarError):
        return StoreRefusal(f"bad archive: {exc}")
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return StoreRefusal(f"writing to file: {os.strerror(exc.errno)}")
    return None


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
#: rename(2)'s errors when something it cannot replace is at the target:
#: a non-empty directory, or a directory where the entry is not one (or
#: the reverse).
_IN_THE_WAY = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)


def drain(chunks) -> None:
    """Consume bulk data that will not be used (the stream stays in sync)."""
    for _ in chunks:
        pass
