"""After a successful builder: check, canonicalise, scan and register outputs.

For each output (spec local-store §8.7): it must exist; it must not be
group- or world-writable nor owned by anyone but the build user; its
metadata is made canonical; its references are found by scanning for the
hash parts of the input closure and of the derivation's own outputs; a
fixed output's content hash must match the derivation's.  All outputs
are then registered in one transaction with the deriver, ``ultimate``
and the signatures of ``secret-key-files``.  Process: session.

Trust: the output trees were written by client-controlled code; every
fact registered about them is computed here.
"""

from __future__ import annotations

import os
import stat

from nixwarden.shared import nar
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.hashes import Hash, HashAlgo, HashSink
from nixwarden.shared.storepath import ContentAddress
from nixwarden.shared.derivation import OutputKind
from nixwarden.shared.storepath import output_path_name
from nixwarden.supervisor.build import ca
from nixwarden.supervisor.build.canonical import canonicalise
from nixwarden.supervisor.build.outputchecks import check_outputs
from nixwarden.supervisor.store import signatures
from nixwarden.supervisor.store.pathinfo import PathInfo
from nixwarden.supervisor.store.restore import remove_entry


class OutputRegistrar:
    def __init__(self, realiser):
        self.r = realiser
        self._input_closures: dict[str, frozenset[str]] = {}

    def input_closure(self, goal) -> frozenset[str]:
        """Every path the builder may refer to: the closure of its inputs
        (computed once per derivation: its inputs are built before it)."""
        known = self._input_closures.get(goal.drv_path)
        if known is not None:
            return known
        roots = set(goal.drv.input_srcs)
        for dep in goal.deps:
            for out in goal.drv.input_drvs.get(dep.drv_path, ()):
                if dep.output_paths.get(out):
                    roots.add(dep.output_paths[out])
        closure = self._input_closures[goal.drv_path] = frozenset(self.closure(roots))
        return closure

    def closure(self, roots) -> set[str]:
        """The closure of ``roots``, every path of it temp-rooted."""
        return self.r.db.closure(roots, visit=self.r.temp_roots.add)

    def register(self, goal, user, build_outputs: dict[str, str],
                 added=frozenset()) -> dict[str, str]:
        """Register every output of ``goal``; return {output name: path}.

        ``added``: paths the builder added through recursive Nix, which its
        outputs may refer to as to its inputs.

        Floating content-addressed outputs move from their scratch path to
        the path their content gives, and get a realisation.

        Raises:
            StoreRefusal: a missing or suspicious output, a hash mismatch.
        """
        from nixwarden.supervisor.build.refscan import rewrite_hashes, scan_references
        candidates = self.input_closure(goal) | set(added) | set(build_outputs.values())
        scanned = {}
        for name, built in sorted(build_outputs.items()):
            real = self.r.layout.real_path(built)
            self._check_output(goal, name, built, real, user)
            canonicalise(real, from_uid=user.user.uid if user else None)
            scanned[name] = scan_references(real, candidates, self.r.layout.store_dir)
        infos, realisations, rewrites = {}, [], {}
        for name in _outputs_in_reference_order(build_outputs, scanned, goal.drv_path):
            built = build_outputs[name]
            real = self.r.layout.real_path(built)
            refs = scanned[name]
            if rewrites and refs & set(rewrites):
                _make_dirs_writable(real)
                rewrite_hashes(real, {_hash_part(a): _hash_part(b) for a, b in rewrites.items()})
                canonicalise(real, from_uid=None)
                refs = {rewrites.get(r, r) for r in refs}
            ca_text = self._check_fixed(goal, name, built, real)
            path = built
            if goal.drv.outputs[name].path is None:
                path, refs, ca_text = self._settle_floating(goal, name, built, real, refs)
                rewrites[built] = path
                real = self.r.layout.real_path(path)
                if goal.drv.outputs[name].kind is not OutputKind.IMPURE:
                    realisations.append((name, path))
            if self.r.settings.get("auto-optimise-store"):
                from nixwarden.supervisor.store.optimise import auto_optimise
                auto_optimise(self.r.layout, real)
            nar_hash, nar_size = nar.nar_hash_of_path(real)
            infos[name] = PathInfo(path, goal.drv_path, f"sha256:{nar_hash.to_base16()}",
                                   tuple(sorted(refs)), 0, nar_size, True,
                                   self._sign(path, nar_hash, nar_size, refs), ca_text)
        check_outputs(goal, infos, self.r.store_dir, self.r.db.query_path_info)
        self.r.db.register_valid_paths([i for i in infos.values()
                                        if not self.r.db.is_valid(i.path)])
        if realisations:
            drv_hash = self.r.drv_hash(goal.drv)
            for name, path in realisations:
                self.r.db.register_realisation(ca.drv_output_id(drv_hash[name]), name, path)
        for name, info in infos.items():
            goal.output_paths[name] = info.path
        return {name: info.path for name, info in infos.items()}

    def _settle_floating(self, goal, name, scratch, real, refs):
        """Move a floating output to the path its content (modulo
        self-references) gives; return (path, references, content address)."""
        from nixwarden.supervisor.build.refscan import rewrite_hashes
        out = goal.drv.outputs[name]
        method, algo = out.method, out.algo
        scratch_hash = _hash_part(scratch)
        chunks = nar.dump(real) if method == "nar" else _file_chunks(real)
        modulo = ca.hash_modulo_self(chunks, scratch_hash, algo)
        has_self = scratch in refs
        others = [self.r.store_dir.parse(r) for r in refs if r != scratch]
        store_dir = self.r.store_dir
        final_sp = store_dir.make_fixed_output_path(
            method, modulo, output_path_name(goal.drv.name, name), others, has_self)
        final = store_dir.print(final_sp)
        _make_dirs_writable(real)
        rewrite_hashes(real, {scratch_hash: final_sp.hash_part})
        canonicalise(real, from_uid=None)
        self.r.temp_roots.add(final)
        if self.r.db.is_valid(final):
            remove_entry(self.r.store_fd, os.path.basename(real))
        else:
            remove_entry(self.r.store_fd, final_sp.base)
            os.rename(real, self.r.layout.real_path(final))
        new_refs = {final if r == scratch else r for r in refs}
        return final, new_refs, ContentAddress(method, modulo).render()

    def check(self, goal, build_outputs: dict[str, str], keep: bool) -> dict[str, str]:
        """``--check``: compare a rebuild (at scratch paths) with the valid outputs.

        Raises:
            StoreRefusal: an output differs ("may not be deterministic"),
                or a fixed output's hash does not match.
        """
        from nixwarden.supervisor.build.refscan import rewrite_hashes
        outputs = {}
        for name, scratch in sorted(build_outputs.items()):
            final = goal.output_paths[name]
            real, real_final = self.r.layout.real_path(scratch), self.r.layout.real_path(final)
            self._check_output(goal, name, final, real, None, check_owner=False)
            rewrite_hashes(real, {_hash_part(scratch): _hash_part(final)})
            canonicalise(real, from_uid=None)
            try:
                self._check_fixed(goal, name, final, real, keep_mismatch=False)
                got, size = nar.nar_hash_of_path(real)
                if goal.repair:
                    self._replace(real, final, got, size)
                    outputs[name] = final
                    continue
                want = Hash.parse(self.r.db.query_path_info(final).nar_hash)
                if got != want:
                    detail = ""
                    if keep:
                        os.rename(real, real_final + ".check")
                        detail = f" from '{final}.check'"
                    raise StoreRefusal(f"derivation '{goal.drv_path}' may not be deterministic: "
                                       f"output '{final}' differs{detail}")
            finally:
                if os.path.lexists(real):
                    remove_entry(self.r.store_fd, os.path.basename(real))
            outputs[name] = final
        return outputs

    def _replace(self, real: str, final: str, nar_hash: Hash, nar_size: int) -> None:
        """Repair: put a rebuilt output in place of a damaged valid one."""
        base = os.path.basename(self.r.layout.real_path(final))
        remove_entry(self.r.store_fd, base)
        os.rename(real, self.r.layout.real_path(final))
        self.r.db.update_path_info(final, nar_hash=f"sha256:{nar_hash.to_base16()}",
                                   nar_size=nar_size)

    def _check_output(self, goal, name, path, real, user, check_owner=True) -> None:
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            raise StoreRefusal(f"builder for '{goal.drv_path}' failed to produce output path "
                               f"for output '{name}' at '{path}'") from None
        writable = not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable or (user is not None and st.st_uid != user.user.uid):
            raise StoreRefusal(f"suspicious ownership or permission on '{path}' for output "
                               f"'{name}'; rejecting this build output")

    def _check_fixed(self, goal, name, path, real, keep_mismatch: bool = True) -> str | None:
        out = goal.drv.outputs[name]
        wanted = out.content_hash
        if wanted is None:
            return None
        method = out.method
        got = _content_hash(real, method, wanted.algo)
        if got != wanted:
            if keep_mismatch:
                self._keep_mismatched(goal, path, real, ContentAddress(method, got))
            raise StoreRefusal(
                f"hash mismatch in fixed-output derivation '{goal.drv_path}':\n"
                f"  specified: {wanted.to_sri()}\n     got:    {got.to_sri()}")
        return ContentAddress(method, got).render()

    def _keep_mismatched(self, goal, path, real, ca: ContentAddress) -> None:
        """Register what a fixed-output builder produced under the path its
        actual hash gives, as Nix 2.8 does, so the work is not lost."""
        store_dir = self.r.store_dir
        actual = store_dir.print(store_dir.make_path_from_ca(goal.drv.name, ca, [], False))
        if self.r.db.is_valid(actual):
            return
        self.r.temp_roots.add(actual)
        canonicalise(real, from_uid=None)
        os.rename(real, self.r.layout.real_path(actual))
        nar_hash, nar_size = nar.nar_hash_of_path(self.r.layout.real_path(actual))
        self.r.db.register_valid_paths([PathInfo(
            actual, goal.drv_path, f"sha256:{nar_hash.to_base16()}", (), 0, nar_size,
            True, (), ca.render())])

    def _secret_keys(self):
        """The keys of ``secret-key-files`` (read once per build request)."""
        if not hasattr(self, "_keys"):
            self._keys = []
            for name in self.r.settings.get("secret-key-files"):
                with open(name) as f:
                    self._keys.append(signatures.parse_secret_key(f.read()))
        return self._keys

    def _sign(self, path, nar_hash, nar_size, refs) -> tuple[str, ...]:
        keys = self._secret_keys()
        if not keys:
            return ()
        fp = signatures.fingerprint(path, nar_hash, nar_size, sorted(refs))
        return tuple(sorted(signatures.sign(k, fp) for k in keys))


def _content_hash(real: str, method: str, algo: HashAlgo) -> Hash:
    sink = HashSink(algo)
    if method == "nar":
        for chunk in nar.dump(real):
            sink.update(chunk)
        return sink.finish()
    st = os.lstat(real)
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o111:
        raise StoreRefusal(f"output path '{real}' should be a non-executable regular file "
                           "since recursive hashing is not enabled (outputHashMode=flat)")
    with open(real, "rb") as f:
        while chunk := f.read(1 << 20):
            sink.update(chunk)
    return sink.finish()


def _hash_part(path: str) -> str:
    return os.path.basename(path)[:32]


def _outputs_in_reference_order(build_outputs, scanned, drv_path) -> list[str]:
    """Outputs ordered so that each comes after the outputs it refers to.

    Raises:
        StoreRefusal: the outputs refer to each other in a cycle.
    """
    by_path = {p: n for n, p in build_outputs.items()}
    deps = {n: {by_path[r] for r in scanned[n] if r in by_path and by_path[r] != n}
            for n in build_outputs}
    order, done = [], set()
    while len(order) < len(deps):
        ready = sorted(n for n in deps if n not in done and deps[n] <= done)
        if not ready:
            cyclic = sorted(n for n in deps if n not in done)
            raise StoreRefusal(f"cycle detected in the references of '{build_outputs[cyclic[0]]}'"
                               f" from '{build_outputs[cyclic[-1]]}'")
        order.extend(ready)
        done.update(ready)
    return order


def _make_dirs_writable(real: str) -> None:
    """Directories of a canonical tree are 0555; renaming entries inside them
    (rewriting hash parts in names) needs write access even for their owner."""
    if os.path.isdir(real) and not os.path.islink(real):
        os.chmod(real, 0o755)
        for root, dirs, _files, root_fd in os.fwalk(real):
            for name in dirs:
                if stat.S_ISDIR(os.stat(name, dir_fd=root_fd, follow_symlinks=False).st_mode):
                    os.chmod(name, 0o755, dir_fd=root_fd)


def _file_chunks(real: str):
    with open(real, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk
