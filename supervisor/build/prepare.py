"""Everything a builder needs before it starts: user, directory, environment.

Decides build user and sandboxing from the session's settings, writes the
files the environment refers to (passAsFile, structured attributes,
exportReferencesGraph) into the build directory, and returns the
``spawn.Launch`` to run: the builder itself, bubblewrap around it, or a
``builtin:`` builder.  Process: session.

Trust: the derivation is client-controlled; the build directory belongs
to the build user, and nothing here runs client code.
"""

from __future__ import annotations

import json
import os

from nixwarden.shared.derivation import OutputKind
from nixwarden.shared.errors import StoreRefusal
from nixwarden.supervisor.build.spawn import Launch

HOMELESS = "/homeless-shelter"


def required_system_features(drv) -> set[str]:
    """Nix's ``getRequiredSystemFeatures``: ``requiredSystemFeatures`` (from
    the environment or the structured attributes), plus ``ca-derivations``
    for a derivation whose output paths are not known in advance."""
    if "__json" in drv.env:
        try:
            listed = json.loads(drv.env["__json"]).get("requiredSystemFeatures") or []
        except (ValueError, AttributeError):
            listed = []
        features = {f for f in listed if isinstance(f, str)} if isinstance(listed, list) \
            else set()
    else:
        features = set(drv.env.get("requiredSystemFeatures", "").split())
    if any(out.path is None and out.kind is not OutputKind.FIXED for out in drv.outputs.values()):
        features.add("ca-derivations")
    return features


class LaunchPreparer:
    def __init__(self, realiser):
        self.r = realiser
        s = realiser.settings
        self.group = s.get("build-users-group")
        sandbox = s.get("sandbox")
        self.sandbox_mode = sandbox  # True, False or "relaxed"
        self.cores = int(s.get("cores")) or os.cpu_count() or 1
        self.system = s.get("system")
        self.extra_platforms = tuple(s.get("extra-platforms"))

    # --- build users -------------------------------------------------------------

    def needs_build_user(self) -> bool:
        return bool(self.group) and os.geteuid() == 0

    def acquire_build_user(self):
        from nixwarden.supervisor.build import buildusers
        return buildusers.acquire_build_user(self.group, self.r.layout.userpool_dir,
                                             exclude_uid=os.geteuid())

    def kill_build_user(self, user) -> None:
        from nixwarden.supervisor.build import buildusers
        buildusers.kill_user_processes(user.user.uid)

    # --- the launch ----------------------------------------------------------------

    def system_features(self) -> set[str]:
        """What this store offers (Nix 2.8's store ``system-features``): the
        setting, plus the enabled experimental features that are also
        system features."""
        features = set(self.r.settings.get("system-features"))
        for feature in ("ca-derivations", "recursive-nix"):
            if self.r.settings.feature_enabled(feature):
                features.add(feature)
        return features

    def check_platform(self, goal) -> None:
        """Refuse a derivation for another system or needing features we lack."""
        drv = goal.drv
        required = required_system_features(drv)
        offered = self.system_features()
        platform_ok = (drv.platform == self.system or drv.platform in self.extra_platforms
                       or drv.is_builtin)
        if platform_ok and required <= offered:
            return
        raise StoreRefusal(
            f"a '{drv.platform}' with features {{{', '.join(sorted(required))}}} is required "
            f"to build '{goal.drv_path}', but I am a '{self.system}' with features "
            f"{{{', '.join(sorted(offered))}}}")

    def _sandboxed(self, goal) -> bool:
        if self.sandbox_mode is True:
            return True
        if self.sandbox_mode == "relaxed":
            return goal.drv.type().value not in ("fixed",) and \
                goal.drv.env.get("__noChroot") != "1"
        return False

    def runs_sandboxed(self, goal) -> bool:
        """Whether ``goal``'s builder will run in the sandbox."""
        return self._sandboxed(goal) and not goal.drv.is_builtin

    def launch(self, goal, build_dir: str, user, build_outputs: dict[str, str],
               extra_env=None) -> Launch:
        """Prepare ``build_dir`` and return how to start the builder.

        ``extra_env``: variables the daemon adds (recursive Nix's NIX_REMOTE).
        """
        from nixwarden.supervisor.build.env import builder_env
        sandboxed = self._sandboxed(goal)
        if not sandboxed and os.path.exists(HOMELESS):
            raise StoreRefusal(f"home directory '{HOMELESS}' exists; please remove it to "
                               "assure purity of builds without sandboxing")
        outputs = build_outputs
        setup = builder_env(goal.drv, store_dir=self.r.layout.store_dir, build_top=build_dir,
                            cores=self.cores, output_paths=outputs,
                            impure_env=os.environ, sandboxed=sandboxed,
                            input_paths=self.r.registrar.input_closure(goal),
                            closure_info=self._closure_info, drv_path=goal.drv_path)
        setup.env.update(extra_env or {})
        self._write_files(build_dir, setup.files, user)
        if sandboxed and not goal.drv.is_builtin:
            from nixwarden.supervisor.build import sandboxing
            return sandboxing.launch(self.r, goal, build_dir, user, setup, outputs)
        return self._plain_launch(goal, build_dir, user, setup, outputs)

    def _plain_launch(self, goal, build_dir, user, setup, outputs) -> Launch:
        drv = goal.drv
        ids = {}
        if user is not None:
            u = user.user
            ids = dict(uid=u.uid, gid=u.gid, groups=tuple(u.supplementary_gids))
        if drv.is_builtin:
            from nixwarden.supervisor.build import builtins
            env = dict(setup.env)
            out_map = {p: self.r.layout.real_path(p) for p in outputs.values()}
            store_dir = self.r.layout.store_dir
            mirrors = tuple(self.r.settings.get("hashed-mirrors"))
            return Launch([drv.builder], env, build_dir, **ids, builtin=lambda: builtins.run_builtin(
                drv.builder, env, out_map, store_dir=store_dir, hashed_mirrors=mirrors))
        argv = [drv.builder] + list(setup.args)
        return Launch(argv, setup.env, build_dir, **ids)

    def _write_files(self, build_dir: str, files: dict[str, bytes], user) -> None:
        for name, data in files.items():
            path = os.path.join(build_dir, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if user is not None:
                os.chown(path, user.user.uid, user.user.gid)
        if user is not None:
            os.chown(build_dir, user.user.uid, user.user.gid)

    def _closure_info(self, paths):
        """Nix's ``exportReferences``: the closure of ``paths`` and of the
        outputs of every derivation in it, as ``refgraph`` wants it."""
        closure = self.r.registrar.closure(paths)
        for drv in [p for p in closure if p.endswith(".drv")]:
            outs = self.r.db.query_derivation_outputs(drv).values()
            closure |= self.r.registrar.closure(o for o in outs if self.r.db.is_valid(o))
        out = []
        for path in sorted(closure):
            info = self.r.db.query_path_info(path)
            if info is None:
                out.append({"path": path, "valid": False})
                continue
            out.append({"path": path, "references": list(info.references),
                        "narHash": info.nar_hash, "narSize": info.nar_size,
                        "ca": info.ca, "deriver": info.deriver, "valid": True})
        return out
