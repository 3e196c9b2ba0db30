"""The metadata of one valid store path, as kept in the ``ValidPaths`` table.

Holds ``PathInfo``, the value type passed between the store database
(``supervisor/store/db.py``) and the rest of the supervisor.  No I/O.

Runs in the supervisor process.

Trust: a ``PathInfo`` read from the database is the store's own record.  A
``PathInfo`` built from a worker's request is a claim (DESIGN.md §2.5): its
hash, size and references must be checked against the content before it is
registered; this module checks only its shape and, for a batch, the
absence of reference cycles.
"""

from __future__ import annotations

from dataclasses import dataclass

from nixwarden.shared.errors import StoreRefusal


@dataclass(frozen=True)
class PathInfo:
    """One ``ValidPaths`` row plus its references (spec §2.4, §4.5).

    All paths are full logical store paths.  ``nar_hash`` is kept exactly
    as stored (normally ``sha256:<base16>``).  ``references`` and ``sigs``
    are sorted tuples; ``references`` may contain ``path`` itself.
    ``registration_time`` 0 means "now" when registering.
    """

    path: str
    deriver: str | None
    nar_hash: str
    references: tuple[str, ...] = ()
    registration_time: int = 0
    nar_size: int = 0
    ultimate: bool = False
    sigs: tuple[str, ...] = ()
    ca: str | None = None

    def __post_init__(self) -> None:
        refs = tuple(sorted(set(self.references)))
        if refs != self.references:
            object.__setattr__(self, "references", refs)
        sigs = tuple(sorted(set(s for s in self.sigs if s)))
        if sigs != self.sigs:
            object.__setattr__(self, "sigs", sigs)
        if self.deriver == "":
            object.__setattr__(self, "deriver", None)
        if self.ca == "":
            object.__setattr__(self, "ca", None)
        if self.nar_size < 0 or self.registration_time < 0:
            raise ValueError("negative narSize or registrationTime")
        if ":" not in self.nar_hash:
            raise ValueError(f"NAR hash '{self.nar_hash}' lacks an algorithm prefix")


def check_acyclic(batch: dict[str, PathInfo]) -> None:
    """Refuse reference cycles within a batch of infos keyed by path.

    Self-references and references outside the batch are ignored, as in
    Nix's topological sort in ``registerValidPaths`` (spec §4.3).

    Raises:
        StoreRefusal: "cycle detected in the references of '<p>' from '<q>'".
    """
    done: set[str] = set()
    for start in sorted(batch):
        if start in done:
            continue
        on_stack = {start}
        stack = [(start, iter(batch[start].references))]
        while stack:
            path, refs = stack[-1]
            ref = next(refs, None)
            if ref is None:
                stack.pop()
                on_stack.discard(path)
                done.add(path)
            elif ref != path and ref in batch and ref not in done:
                if ref in on_stack:
                    raise StoreRefusal(
                        f"cycle detected in the references of '{ref}' from '{path}'")
                on_stack.add(ref)
                stack.append((ref, iter(batch[ref].references)))
