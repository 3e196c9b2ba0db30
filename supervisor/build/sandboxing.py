"""Running one build inside the bubblewrap sandbox (``sandbox.py``).

Prepares the per-build chroot (input closure, ``/etc`` files, a writable
store directory for the outputs), returns the ``spawn.Launch`` that execs
bubblewrap with an empty environment, and after the builder exits moves
the produced outputs into the real store and removes the chroot.
Process: session (and the forked builder child for the exec).

Trust: the derivation is client-supplied; the sandbox sees only the
input closure, the sandbox paths of the daemon's configuration and its
build directory.  Network only for fixed-output derivations.
"""

from __future__ import annotations

import os

from nixwarden.shared.derivation import DerivationType
from nixwarden.supervisor.build import sandbox
from nixwarden.supervisor.build.spawn import Launch


def sandbox_paths(settings) -> tuple[str, ...]:
    configured = tuple(settings.get("sandbox-paths"))
    return configured or sandbox.DEFAULT_SANDBOX_PATHS


def launch(realiser, goal, build_dir: str, user, setup, build_outputs) -> Launch:
    """The launch of ``goal``'s builder in a fresh sandbox."""
    layout = realiser.layout
    build_gid = user.user.gid if user is not None else None
    dirs = sandbox.prepare_chroot(layout.real_store_dir, os.path.basename(goal.drv_path),
                                  layout.store_dir, build_gid=build_gid)
    inputs = {p: layout.real_path(p) for p in realiser.registrar.input_closure(goal)}
    network = goal.drv.type() in (DerivationType.FIXED, DerivationType.IMPURE)
    spec = sandbox.SandboxSpec(build_dir_host=build_dir, store_dir=layout.store_dir,
                               chroot_store_host=dirs.store, etc_dir_host=dirs.etc,
                               input_paths_host=inputs,
                               sandbox_paths=sandbox_paths(realiser.settings),
                               network=network)
    sandbox.populate_chroot(spec)
    argv = sandbox.bwrap_argv(spec, goal.drv.builder, setup.args, setup.env)
    outputs = [os.path.basename(p) for p in build_outputs.values()]

    def after_exit() -> None:
        try:
            sandbox.collect_outputs(dirs.store, outputs, layout.real_store_dir)
        finally:
            sandbox.cleanup_chroot(dirs)

    ids = {}
    if user is not None:
        u = user.user
        ids = dict(uid=u.uid, gid=u.gid, groups=tuple(u.supplementary_gids))
    return Launch(argv, dict(sandbox.BWRAP_ENV), build_dir, after_exit=after_exit, **ids)
