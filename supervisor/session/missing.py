"""QueryMissing: what realising some derived paths would build and fetch.

Like Nix 2.8's ``Store::queryMissing``: an opaque path that is not valid
is substituted if a cache has it (its references are then needed too),
else unknown; a derivation whose wanted outputs are not all valid is
substituted if every missing output can be, else it will be built and its
inputs are needed in turn.  Download and NAR sizes add up over what will
be fetched.  Process: session.

Trust: targets were checked by the caller; derivations are read from the
store.
"""

from __future__ import annotations

from nixwarden.shared.rpc import schema


def query_missing(session, targets: list[str]) -> schema.Missing:
    will_build, will_substitute, unknown = set(), set(), set()
    sizes = [0, 0]
    todo, seen = list(targets), set()
    while todo:
        # One round per level of the closure, its opaque paths looked up in
        # the caches together (in parallel), as Nix's queryMissing does.
        batch = [t for t in dict.fromkeys(todo) if t not in seen]
        seen.update(batch)
        todo = []
        opaque = [t for t in batch if "!" not in t]
        _opaque(session, opaque, will_substitute, unknown, sizes, todo)
        for target in batch:
            path, bang, outputs = target.partition("!")
            if not bang:
                continue
            if not session.db.is_valid(path):
                unknown.add(path)
            elif path.endswith(".drv"):
                _derivation(session, path, outputs, will_build, will_substitute, sizes, todo)
            # A valid path that is no derivation has no outputs: nothing is
            # missing (as nix-daemon 2.8 answers).
    return schema.Missing(sorted(will_build), sorted(will_substitute), sorted(unknown),
                          sizes[0], sizes[1])


def _fetchable(session, paths: list[str]) -> dict | None:
    if not session.can_substitute():
        return None
    infos = session.substituters.query_infos(paths)
    return infos if len(infos) == len(paths) else None


def _opaque(session, paths, will_substitute, unknown, sizes, todo) -> None:
    invalid = [p for p in paths if not session.db.is_valid(p)]
    if not invalid:
        return
    infos = session.substituters.query_infos(invalid) \
        if session.can_substitute() else {}
    for path in invalid:
        if path in infos:
            _add_fetched({path: infos[path]}, will_substitute, sizes, todo)
        else:
            unknown.add(path)


def _add_fetched(infos, will_substitute, sizes, todo) -> None:
    for info in infos.values():
        will_substitute.add(info.path)
        sizes[0] += info.download_size
        sizes[1] += info.nar_size
        todo.extend(r for r in info.references if r != info.path)


def _derivation(session, drv_path, outputs, will_build, will_substitute, sizes, todo) -> None:
    from nixwarden.supervisor.build import ca
    from nixwarden.supervisor.store.drvoutputs import read_drv

    def read(p):
        return read_drv(session.writer.store_fd, session.store_dir, p)

    drv = read(drv_path)
    known = ca.output_map(session.db, session.store_dir, read, drv_path)
    wanted = known if outputs == "*" else {o: known.get(o) for o in outputs.split(",")}
    missing = [p for p in wanted.values() if not p or not session.db.is_valid(p)]
    if not missing:
        return
    infos = _fetchable(session, missing) if all(missing) else None
    if infos is not None:
        _add_fetched(infos, will_substitute, sizes, todo)
        return
    will_build.add(drv_path)
    for dep, outs in drv.input_drvs.items():
        todo.append(f"{dep}!{','.join(outs)}")
    todo.extend(drv.input_srcs)
