"""Realising derived paths for one session: plan, schedule, build, report.

``Realiser.build`` is BuildPaths / BuildPathsWithResults: it plans the
goal graph (``goals.py``), runs up to ``max-jobs`` builds at a time in
dependency order (``job.py``), and returns one ``Outcome`` per target.
Builds by other sessions or other Nix processes are respected through
the CppNix path locks: a locked output waits, then is re-checked.  The
loop also watches the RPC channel, so a client that goes away stops its
builds.  Process: session.

Trust: targets and derivations come from a client.  Output paths are the
ones recomputed from the derivation by ``shared.derivation_hash``; a
derivation whose declared outputs differ never became valid.
"""

from __future__ import annotations

import selectors
import time

from nixwarden.shared.derivation import OutputKind, parse_derivation, print_derivation
from nixwarden.shared.derivation_hash import hash_derivation_modulo
from nixwarden.supervisor.build import ca
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.rpc.channel import ChannelClosed
from nixwarden.shared.storepath import StoreDir
from nixwarden.shared.logtypes import ActivityType, Verbosity
from nixwarden.supervisor.build import goals as g
from nixwarden.supervisor.build.job import BuildJob
from nixwarden.supervisor.build.prepare import LaunchPreparer
from nixwarden.supervisor.build.recursive import RecursiveDaemon
from nixwarden.supervisor.build.outputs import OutputRegistrar

LOCK_RETRY = 0.1
CHECK = 2  # build mode of --check


class ClientGone(ChannelClosed):
    """The worker closed the RPC channel while builds ran."""


class Realiser:
    def __init__(self, session):
        s = session.settings
        self.session = session
        self.layout = session.layout
        self.db = session.db
        self.temp_roots = session.temp_roots
        self.store_dir = StoreDir(self.layout.store_dir)
        self.store_fd = session.writer.store_fd
        self.client = session.client_log
        self.settings = s
        self.max_jobs = int(s.get("max-jobs"))
        self.keep_going = bool(s.get("keep-going"))
        self.keep_failed = bool(s.get("keep-failed"))
        self.max_silent_time = int(s.get("max-silent-time"))
        self.build_timeout = int(s.get("timeout"))
        self.log_lines = int(s.get("log-lines"))
        self.keep_log = bool(s.get("keep-build-log"))
        self.compress_log = bool(s.get("compress-build-log"))
        self.preparer = LaunchPreparer(self)
        self.registrar = OutputRegistrar(self)
        self.builds_act = 0
        self._drvs: dict = {}
        self._hash_cache = session.writer.drv_hashes  # shared across requests

    # --- what the store says -------------------------------------------------------

    def is_valid(self, path: str) -> bool:
        return self.db.is_valid(path)

    def read_derivation(self, drv_path: str):
        drv = self._drvs.get(drv_path)
        if drv is None:
            sp = self.store_dir.parse(drv_path)
            with open(self.layout.real_path(drv_path), "rb") as f:
                text = f.read()
            drv = parse_derivation(text, self.store_dir, sp.name[:-len(".drv")])
            self._drvs[drv_path] = drv
        return drv

    def drv_hash(self, drv):
        """Hash modulo of ``drv`` (outputs masked), with inputs read from the store."""
        return hash_derivation_modulo(drv, self.store_dir, self.read_derivation, True,
                                      self._hash_cache)

    def output_paths_and_deferred(self, drv_path: str, drv):
        """Known output paths (realisations for content-addressed ones) and
        whether the derivation's outputs depend on content addresses."""
        known = self.db.query_derivation_outputs(drv_path)
        paths = {name: known.get(name) or out.path for name, out in drv.outputs.items()}
        drv_hash = self.drv_hash(drv)
        if drv_hash.deferred:
            if not self.settings.feature_enabled(ca.FEATURE):
                raise StoreRefusal("experimental Nix feature 'ca-derivations' is disabled; "
                                   "use '--extra-experimental-features ca-derivations' to "
                                   "override")
            self.db.ensure_ca_schema()
            for name in paths:
                if paths[name] is None and drv.outputs[name].kind is not OutputKind.IMPURE:
                    found = self.db.query_realisation(ca.drv_output_id(drv_hash[name]), name)
                    paths[name] = found[0] if found else None
        return paths, drv_hash.deferred

    def all_valid(self, goal: g.DrvGoal) -> bool:
        paths = goal.output_paths.values()
        return all(p and self.db.is_valid(p) for p in paths)

    def wanted_valid(self, goal: g.DrvGoal) -> bool:
        return all(goal.output_paths.get(o) and self.db.is_valid(goal.output_paths[o])
                   for o in goal.wanted)

    # --- build users (delegated) ---------------------------------------------------

    def needs_build_user(self) -> bool:
        return self.preparer.needs_build_user()

    def acquire_build_user(self):
        return self.preparer.acquire_build_user()

    def kill_build_user(self, user) -> None:
        self.preparer.kill_build_user(user)

    def prepare_launch(self, goal, build_dir, user, build_outputs, extra_env=None):
        return self.preparer.launch(goal, build_dir, user, build_outputs, extra_env)

    def register_outputs(self, goal, user, build_outputs, added=frozenset()) -> dict[str, str]:
        return self.registrar.register(goal, user, build_outputs, added)

    def check_outputs(self, goal, build_outputs, keep: bool) -> dict[str, str]:
        return self.registrar.check(goal, build_outputs, keep)

    def scratch_path(self, goal, path: str) -> str:
        """Where a check build writes ``path`` (Nix's makeFallbackPath)."""
        from nixwarden.shared.hashes import Hash, HashAlgo
        sp = self.store_dir.parse(path)
        inner = f"rewrite:{goal.drv_path.rsplit('/', 1)[1]}:{sp.base}"
        return self.store_dir.print(self.store_dir.make_store_path(
            inner, Hash(HashAlgo.SHA256, bytes(32)), sp.name))

    # --- the entry point -----------------------------------------------------------

    def build(self, targets: list[str], mode: int) -> list[tuple[str, g.Outcome]]:
        """Realise every target; return (target, outcome) in request order."""
        plan = g.Planner(self, check=mode == CHECK).plan(targets)
        if mode == CHECK:
            for _, target in plan.targets:
                if not isinstance(target, str):
                    target.check = True
        self._run_reported(plan, mode)
        return [(text, self._target_outcome(target)) for text, target in plan.targets]

    def repair_outputs(self, drv_path: str) -> bool:
        """Rebuild a valid derivation's outputs and put them in place of the
        damaged ones (VerifyStore --repair without a substitute)."""
        plan = g.Planner(self, check=True).plan([drv_path + "!*"])
        goal = plan.targets[0][1]
        goal.check = goal.repair = True
        self._run_reported(plan, CHECK)
        return bool(goal.outcome and goal.outcome.ok)

    def build_basic(self, drv_path: str, drv, mode: int) -> g.Outcome:
        """BuildDerivation: build a derivation the client sent whole (its
        inputs are store paths that must be valid)."""
        paths = {name: out.path for name, out in drv.outputs.items()}
        goal = g.DrvGoal(drv_path, drv, paths, set(drv.outputs), expanded=True,
                         check=mode == CHECK)
        self._drvs[drv_path] = drv
        plan = g.Plan({drv_path: goal}, [(drv_path + "!*", goal)])
        self._run_reported(plan, mode)
        return self._target_outcome(goal)

    def _run_reported(self, plan: g.Plan, mode: int) -> None:
        """Run ``plan`` inside the realise and builds activities Nix shows."""
        act = self.client.start(Verbosity.ERROR, ActivityType.REALISE)
        self.builds_act = self.client.start(Verbosity.ERROR, ActivityType.BUILDS, "", (), act)
        try:
            self._run(plan, mode)
        finally:
            self.client.stop(self.builds_act)
            self.client.stop(act)

    def _target_outcome(self, target) -> g.Outcome:
        if isinstance(target, str):
            if self.db.is_valid(target):
                self.temp_roots.add(target)
                return g.Outcome(g.ALREADY_VALID)
            error = self._substitute([target]).get(target) if self._substitution_on() else None
            if self.db.is_valid(target):
                return g.Outcome(g.SUBSTITUTED)
            return g.Outcome(g.NO_SUBSTITUTERS, str(error) if error else
                             f"path '{target}' is required, but there is no substituter "
                             "that can build it")
        outcome = target.outcome
        if outcome.ok:
            outs = {o: target.output_paths[o] for o in sorted(target.wanted)
                    if target.output_paths.get(o)}
            drv_hash = self.drv_hash(target.drv)
            ids = {o: ca.drv_output_id(drv_hash[o]) for o in outs}
            return g.Outcome(outcome.status, "", outs, outcome.times_built,
                             outcome.start_time, outcome.stop_time, output_ids=ids)
        return outcome

    # --- scheduling ----------------------------------------------------------------

    def _run(self, plan: g.Plan, mode: int) -> None:
        pending = [goal for goal in _topological(plan.goals.values())]
        for goal in pending:
            for p in goal.output_paths.values():
                if p:
                    self.temp_roots.add(p)
        running: dict[int, BuildJob] = {}
        waiting_until = 0.0
        sel = selectors.DefaultSelector()
        sel.register(self.session.channel, selectors.EVENT_READ, None)
        try:
            while pending or running:
                pending = self._start_ready(pending, running, sel)
                if not running and pending and all(self._blocked(g_) for g_ in pending):
                    time.sleep(LOCK_RETRY)
                    continue
                self._wait(sel, running, timeout=LOCK_RETRY if pending else 1.0)
        except ClientGone:
            for job in running.values():
                job.kill()
                job.finish()
            raise
        finally:
            sel.close()

    # --- substitution --------------------------------------------------------------

    def _substitution_on(self) -> bool:
        return self.session.can_substitute()

    def _substitute(self, paths: list[str], cas: dict | None = None) -> dict:
        return self.session.substitute(paths, cas=cas)

    def _known_cas(self, goal: g.DrvGoal) -> dict[str, str]:
        """Content addresses of fixed outputs: such paths can come from caches
        of another store directory too."""
        from nixwarden.shared.storepath import ContentAddress
        cas = {}
        for name, out in goal.drv.outputs.items():
            digest = out.content_hash
            path = goal.output_paths.get(name)
            if digest is not None and path:
                cas[path] = ContentAddress(out.method, digest).render()
        return cas

    def try_substitute(self, goal: g.DrvGoal) -> bool:
        """Fetch a derivation's missing wanted outputs instead of building it.

        Returns True when the goal is settled (substituted, or failed
        without ``fallback``); False when it must be built.
        """
        env = goal.drv.env
        allowed = env.get("allowSubstitutes", "1") != "" or bool(
            self.settings.get("always-allow-substitutes"))
        if not self._substitution_on() or not allowed:
            return False
        wanted = [goal.output_paths.get(o) for o in sorted(goal.wanted)]
        if not all(wanted):
            return False
        missing = [p for p in wanted if not self.db.is_valid(p)]
        cas = self._known_cas(goal)
        results = self._substitute(missing, cas)
        errors = [results[p] for p in missing if results.get(p) is not None]
        if not errors:
            goal.outcome = g.Outcome(g.SUBSTITUTED)
            return True
        if any(getattr(e, "kind", "") == "failed" for e in errors) and \
                not self.settings.get("fallback"):
            goal.outcome = g.Outcome(
                g.MISC_FAILURE, f"some substitutes for the outputs of derivation "
                f"'{goal.drv_path}' failed (usually happens due to networking issues); try "
                "'--fallback' to build derivation from source ")
            self._failed = True
            return True
        return False

    def _ensure_sources(self, goal: g.DrvGoal) -> str | None:
        """Make the derivation's input sources valid; the error text if not."""
        missing = [p for p in goal.drv.input_srcs if not self.db.is_valid(p)]
        if not missing:
            return None
        results = self._substitute(missing) if self._substitution_on() else {}
        for path in missing:
            if not self.db.is_valid(path):
                error = results.get(path) or (f"dependency '{path}' of '{goal.drv_path}' does "
                                              "not exist, and substitution is disabled")
                return str(error)
        return None

    # --- content-addressed derivations ---------------------------------------------

    def _done(self, goal: g.DrvGoal, outcome: g.Outcome) -> None:
        """Record a finished goal (and the original a resolved one stands for)."""
        goal.outcome = outcome
        if not outcome.ok:
            self._failed = True
        original = goal.original
        if original is None:
            return
        if goal.wait_act:
            self.client.stop(goal.wait_act)
            goal.wait_act = 0
        status = outcome.status
        if outcome.ok and status == g.ALREADY_VALID:
            status = g.RESOLVES_TO_ALREADY_VALID
        original.outcome = g.Outcome(status, outcome.error, outcome.outputs,
                                     outcome.times_built, outcome.start_time,
                                     outcome.stop_time, outcome.exit_bits)
        if outcome.ok:
            self._realise_original(original, goal)

    def _realise_original(self, original: g.DrvGoal, resolved: g.DrvGoal) -> None:
        drv_hash = self.drv_hash(original.drv)
        inputs = self._input_realisations(original.drv)
        for name in original.drv.outputs:
            path = resolved.output_paths.get(name)
            if path and self.db.is_valid(path):
                original.output_paths[name] = path
                refs = set(self.db.query_path_info(path).references)
                self.db.register_realisation(
                    ca.drv_output_id(drv_hash[name]), name, path,
                    dependents=[d for d in inputs if d[2] in refs])

    def _input_realisations(self, drv) -> list[tuple[str, str, str]]:
        """The realisations of ``drv``'s inputs and, transitively, those they
        depend on, as (drv output, output name, path): what an output of the
        original (unresolved) derivation may depend on (Nix's
        ``drvOutputReferences``).  Inputs without a realisation are left out."""
        todo = []
        for input_drv, names in drv.input_drvs.items():
            hashes = self.drv_hash(self.read_derivation(input_drv))
            todo.extend((ca.drv_output_id(hashes[n]), n) for n in names if n in hashes.hashes)
        found: dict[tuple[str, str], str] = {}
        while todo:
            key = todo.pop()
            if key in found:
                continue
            known = self.db.query_realisation(*key)
            if known is None:
                continue
            found[key] = known[0]
            todo.extend(tuple(dep_id.rsplit("!", 1)) for dep_id, _ in known[2])
        return sorted((h, n, p) for (h, n), p in found.items())

    def _resolved(self, goal: g.DrvGoal) -> g.DrvGoal | None:
        """The resolved derivation to build instead of ``goal`` (written to
        the store), or None when its outputs are already valid."""
        realised = {}
        for dep in goal.deps:
            for out in goal.drv.input_drvs[dep.drv_path]:
                path = dep.output_paths.get(out)
                if not path:
                    raise StoreRefusal(f"output '{out}' of '{dep.drv_path}' is not realised")
                realised[(dep.drv_path, out)] = path
        names = {d.drv_path: d.drv.name for d in goal.deps}
        drv = ca.resolve(goal.drv, self.store_dir, names, realised, self.read_derivation)
        text = print_derivation(drv).encode("utf-8", "surrogateescape")
        from nixwarden.shared.storepath import ContentAddressMethod
        info = self.session.writer.add_content(
            drv.name + ".drv", ContentAddressMethod.parse("text:sha256"),
            sorted(drv.references), iter([text]), nar_input=False, repair=False)
        self._drvs[info.path] = drv
        paths, deferred = self.output_paths_and_deferred(info.path, drv)
        resolved = g.DrvGoal(info.path, drv, paths, set(goal.wanted), deferred=deferred,
                             original=goal, check=goal.check, request=goal.request)
        # Nix 2.8: an actBuildWaiting activity (info level) while the resolved one builds
        resolved.wait_act = self.client.start(
            Verbosity.INFO, ActivityType.BUILD_WAITING,
            f"resolved derivation: '{goal.drv_path}' -> '{info.path}'", (goal.drv_path, info.path))
        if all(p and self.db.is_valid(p) for p in paths.values()) and not goal.check:
            self._done(resolved, g.Outcome(g.ALREADY_VALID))
            return None
        return resolved

    def _blocked(self, goal) -> bool:
        return all(d.outcome is not None for d in goal.deps)

    def _start_ready(self, pending, running, sel):
        still = []
        for goal in pending:
            if goal.outcome is not None:
                continue
            if any(d.outcome is None for d in goal.deps):
                still.append(goal)
                continue
            failed = [d for d in goal.deps if not d.outcome.ok]
            if failed:
                goal.outcome = g.Outcome(g.DEPENDENCY_FAILED,
                                         f"{len(failed)} dependencies of derivation "
                                         f"'{goal.drv_path}' failed to build")
                continue
            if self._stopping():
                goal.outcome = g.Outcome(g.MISC_FAILURE, "build cancelled")
                continue
            if goal.check and not self.all_valid(goal):
                goal.outcome = g.Outcome(g.MISC_FAILURE, f"some outputs of '{goal.drv_path}' "
                                         "are not valid, so checking is not possible")
                continue
            if not goal.check and self.wanted_valid(goal):
                goal.outcome = g.Outcome(g.ALREADY_VALID)
                continue
            error = self._ensure_sources(goal)
            if error:
                goal.outcome = g.Outcome(g.MISC_FAILURE, error)
                self._failed = True
                continue
            if (running and len(running) >= self.max_jobs) or not self._try(goal, running, sel):
                still.append(goal)
        return still

    def _stopping(self) -> bool:
        return not self.keep_going and getattr(self, "_failed", False)

    def _try(self, goal, running, sel) -> bool:
        try:
            needs_resolve = goal.drv.input_drvs and (
                goal.deferred or any(d.deferred for d in goal.deps))
            job_goal = self._resolved(goal) if needs_resolve else goal
        except StoreRefusal as exc:
            goal.outcome = g.Outcome(g.MISC_FAILURE, exc.message)
            self._failed = True
            return True
        if job_goal is None:
            return True  # resolved to outputs that are already valid
        if self.max_jobs == 0:
            goal.outcome = g.Outcome(g.MISC_FAILURE,
                                     "unable to start any build; either increase '--max-jobs' "
                                     "or enable remote builds")
            self._failed = True
            return True
        job = BuildJob(self, job_goal)
        try:
            started = job.try_start()
        except StoreRefusal as exc:
            job.release()
            goal.outcome = g.Outcome(g.MISC_FAILURE, exc.message)
            self._failed = True
            return True
        if started is None:
            self._done(job_goal, g.Outcome(g.ALREADY_VALID))
            return True
        if not started:
            return False
        running[job.fd] = job
        sel.register(job.fd, selectors.EVENT_READ, job)
        if job.recursive is not None:
            sel.register(job.recursive, selectors.EVENT_READ, job.recursive)
        return True

    def _wait(self, sel, running, timeout: float) -> None:
        for key, _ in sel.select(timeout):
            job = key.data
            if job is None:
                if self.session.channel.peer_closed():
                    raise ClientGone()
                continue
            if isinstance(job, RecursiveDaemon):
                job.accept()
                continue
            if not job.on_readable():
                sel.unregister(job.fd)
                if job.recursive is not None:
                    sel.unregister(job.recursive)
                del running[job.fd]
                self._done(job.goal, job.finish())
        now = time.monotonic()
        for job in list(running.values()):
            job.check_timeouts(now)
            if job.recursive is not None:
                job.recursive.drain()


def _topological(goals) -> list[g.DrvGoal]:
    order, seen = [], set()

    def visit(goal):
        stack = [(goal, iter(goal.deps))]
        seen.add(id(goal))
        while stack:
            node, deps = stack[-1]
            for dep in deps:
                if id(dep) not in seen:
                    seen.add(id(dep))
                    stack.append((dep, iter(dep.deps)))
                    break
            else:
                order.append(node)
                stack.pop()

    for goal in goals:
        if id(goal) not in seen:
            visit(goal)
    return order
