"""One derivation build: prepare, run the builder, collect its log, finish.

A ``BuildJob`` takes the output locks, a build user and a build
directory, computes the builder's environment, starts the builder
(``spawn.py``), relays its output to the client and the log file, and on
exit hands the outputs to ``outputs.register`` or reports the failure in
Nix's words.  Process: session.

Trust: the derivation is client-controlled.  The builder runs as a build
user (or the daemon's own account when there are none), its outputs are
checked and canonicalised before they are registered.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time

from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.logtypes import ActivityType, ResultType, Verbosity
from nixwarden.supervisor.build import ca
from nixwarden.supervisor.build import goals as g
from nixwarden.supervisor.build import recursive, spawn
from nixwarden.supervisor.build.buildlog import BuildLogWriter
from nixwarden.supervisor.store.locks import PathLock
from nixwarden.supervisor.store.restore import remove_entry


class BuildJob:
    def __init__(self, realiser, goal: g.DrvGoal):
        self.r = realiser
        self.goal = goal
        self.pid: int | None = None
        self.fd: int | None = None
        self.lock: PathLock | None = None
        self.user = None
        self.build_dir: str | None = None
        self.log: BuildLogWriter | None = None
        self.tail: collections.deque = collections.deque(maxlen=realiser.log_lines)
        self.partial = b""
        self.act = 0
        self.started = 0
        self.last_output = 0.0
        self.timed_out = ""
        self.after_exit = None
        self.recursive = None  # recursive.RecursiveDaemon of a recursive-nix build
        self.added: set[str] = set()  # what recursive Nix calls added

    # --- starting ------------------------------------------------------------------

    def try_start(self) -> bool | None:
        """Start the build; False when it must wait (lock or build user busy),
        None when it turned out not to be needed (outputs became valid)."""
        paths = [p for p in self.goal.output_paths.values() if p]
        self.lock = PathLock([self.r.layout.real_path(p) for p in paths])
        if not self.lock.acquire(wait=False):
            self.lock = None
            return False
        if self.r.wanted_valid(self.goal) and not self.goal.check:
            self.release()
            return None
        if self.r.needs_build_user():
            self.user = self.r.acquire_build_user()
            if self.user is None:
                self.release()
                return False
        self._launch()
        return True

    def _launch(self) -> None:
        goal = self.goal
        self.build_outputs = {n: self._build_path(n, p) for n, p in goal.output_paths.items()}
        for p in self.build_outputs.values():
            self.r.temp_roots.add(p)
            remove_entry(self.r.store_fd, os.path.basename(self.r.layout.real_path(p)))
        self.r.preparer.check_platform(goal)
        wants_daemon = recursive.wanted(goal.drv)
        if wants_daemon:
            recursive.check_available(self.r)
        self.build_dir = _make_build_dir(goal.drv_path)
        extra_env = None
        if wants_daemon:
            self.recursive = self._recursive_daemon()
            extra_env = self.recursive.env
        launch = self.r.prepare_launch(goal, self.build_dir, self.user, self.build_outputs,
                                       extra_env)
        self.log = BuildLogWriter(self.r.layout.log_dir, os.path.basename(goal.drv_path),
                                  self.r.compress_log) if self.r.keep_log else None
        verb = ("repairing outputs of" if goal.repair else
                "checking outputs of" if goal.check else "building")
        self.act = self.r.client.start(
            Verbosity.INFO, ActivityType.BUILD, f"{verb} '{goal.drv_path}'",
            (goal.drv_path, "", 1, 1), self.r.builds_act)
        self.started = int(time.time())
        self.last_output = time.monotonic()
        self.after_exit = launch.after_exit
        self.pid, self.fd = spawn.start(launch)

    def _recursive_daemon(self):
        goal, layout = self.goal, self.r.layout
        inside, materialise = self.build_dir, None
        if self.r.preparer.runs_sandboxed(goal):
            from nixwarden.supervisor.build import sandbox
            inside = sandbox.SandboxSpec.build_dir_inside
            store = sandbox.ChrootDirs.for_drv(layout.real_store_dir,
                                               os.path.basename(goal.drv_path),
                                               layout.store_dir).store
            hardlink = self.user is not None  # the builder cannot write root's files

            def materialise(path: str) -> None:
                sandbox.materialise(store, layout.store_dir, path, layout.real_path(path),
                                    hardlink=hardlink)
        return recursive.RecursiveDaemon(self.r, self.build_dir, inside, self.user,
                                         self.r.registrar.input_closure(goal), materialise)

    def _build_path(self, name: str, path: str | None) -> str:
        """Where the builder writes output ``name``: its path, or a scratch
        path for --check and for floating content-addressed outputs."""
        if path is None or self.goal.drv.outputs[name].path is None:
            if self.goal.check and path:
                return self.r.scratch_path(self.goal, path)
            return ca.floating_scratch_path(self.r.store_dir, self.goal.drv_path,
                                            self.goal.drv.name, name)
        return self.r.scratch_path(self.goal, path) if self.goal.check else path

    # --- running -------------------------------------------------------------------

    def on_readable(self) -> bool:
        """Read builder output; False at end of output."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        except OSError:  # EIO: every writer of the pty is gone
            data = b""
        if not data:
            return False
        self.last_output = time.monotonic()
        if self.log:
            self.log.write(data)
        self._lines(data)
        return True

    def _lines(self, data: bytes) -> None:
        *lines, self.partial = (self.partial + data).split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            self.tail.append(line)
            self.r.client.result(self.act, ResultType.BUILD_LOG_LINE, (line,))

    def check_timeouts(self, now: float) -> None:
        max_silent, timeout = self.r.max_silent_time, self.r.build_timeout
        # Nix's DerivationGoal name: the derived path first asked for
        name = f"building of '{self.goal.drv_path}!{self.goal.request}' from .drv file"
        if max_silent and now - self.last_output > max_silent:
            self.timed_out = f"{name} timed out after {max_silent} seconds of silence"
        elif timeout and time.time() - self.started > timeout:
            self.timed_out = f"{name} timed out after {timeout} seconds"
        if self.timed_out:
            self.kill()

    def kill(self) -> None:
        if self.pid:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.user is not None:
            self.r.kill_build_user(self.user)

    # --- finishing -----------------------------------------------------------------

    def finish(self) -> g.Outcome:
        """Wait for the builder, then register the outputs or describe the failure."""
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        if self.partial:
            self._lines(b"\n")
        os.close(self.fd)
        if self.log:
            self.log.close()
        if self.recursive is not None:
            self.added = self.recursive.close()
        if self.user is not None:
            self.r.kill_build_user(self.user)
        try:
            if self.after_exit is not None:
                self.after_exit()
            return self._outcome(status)
        finally:
            self.r.client.stop(self.act)
            self.release()

    def _outcome(self, status: int) -> g.Outcome:
        stopped = int(time.time())
        if self.timed_out:
            return self._failed(g.TIMED_OUT, self.timed_out, 0x01, stopped, keep=True)
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            return self._failed(g.PERMANENT_FAILURE, self._failure_text(status), 0x04, stopped,
                                keep=True)
        try:
            if self.goal.check:
                outputs = self.r.check_outputs(self.goal, self.build_outputs, self.r.keep_failed)
            else:
                outputs = self.r.register_outputs(self.goal, self.user, self.build_outputs,
                                                  self.added)
        except StoreRefusal as exc:
            bits = 0x02 if "hash mismatch" in exc.message else 0
            status = g.OUTPUT_REJECTED if bits else g.MISC_FAILURE
            if "may not be deterministic" in exc.message:
                bits, status = 0x08, g.NOT_DETERMINISTIC
            return self._failed(status, exc.message, bits, stopped, keep=False)
        self._remove_build_dir()
        try:
            run_post_build_hook(self.r, self.goal.drv_path, outputs.values())
        except StoreRefusal as exc:
            return g.Outcome(g.MISC_FAILURE, exc.message, {}, 1, self.started, stopped)
        return g.Outcome(g.BUILT, "", outputs, 1, self.started, stopped)

    def _failure_text(self, status: int) -> str:
        msg = f"builder for '{self.goal.drv_path}' {_status_text(status)}"
        if self.tail:
            msg += f";\nlast {len(self.tail)} log lines:\n"
            msg += "".join(f"> {line}\n" for line in self.tail)
            msg += f"For full logs, run '\x1b[1mnix log {self.goal.drv_path}\x1b[0m'."
        return msg

    def _failed(self, status, text, bits, stopped, *, keep: bool) -> g.Outcome:
        if keep and self.r.keep_failed and self.build_dir:
            os.chmod(self.build_dir, 0o755)
            self.r.client.log(Verbosity.ERROR, f"note: keeping build directory '{self.build_dir}'")
        else:
            self._remove_build_dir()
        for p in getattr(self, "build_outputs", {}).values():
            if not self.r.db.is_valid(p):
                remove_entry(self.r.store_fd, os.path.basename(self.r.layout.real_path(p)))
        return g.Outcome(status, text, {}, 1, self.started, stopped, bits)

    def _remove_build_dir(self) -> None:
        if self.build_dir:
            parent, name = os.path.split(self.build_dir)
            fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                remove_entry(fd, name)
            finally:
                os.close(fd)
            self.build_dir = None

    def release(self) -> None:
        if self.user is not None:
            self.user.release()
            self.user = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _status_text(status: int) -> str:
    if os.WIFEXITED(status):
        return f"failed with exit code {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"failed due to signal {sig} ({signal.strsignal(sig)})"
    return "died abnormally"


def _make_build_dir(drv_path: str) -> str:
    """``$TMPDIR/nix-build-<drv name>-<n>``, mode 0700 (spec local-store §8.2)."""
    tmp = os.environ.get("TMPDIR") or "/tmp"
    base = os.path.basename(drv_path).split("-", 1)[1]
    n = 0
    while True:
        path = os.path.join(tmp, f"nix-build-{base}-{n}")
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            n += 1


def run_post_build_hook(r, drv_path: str, outputs) -> None:
    """Run the ``post-build-hook`` program, as nix-daemon does after each build.

    Raises:
        StoreRefusal: the hook failed (the build counts as failed).
    """
    hook = r.settings.get("post-build-hook")
    if not hook:
        return
    env = dict(os.environ, DRV_PATH=drv_path, OUT_PATHS=" ".join(sorted(outputs)),
               NIX_CONFIG="".join(f"{name} = {r.settings.raw(name)}\n"
                                  for name in sorted(r.settings.overridden)))
    act = r.client.start(Verbosity.INFO, ActivityType.POST_BUILD_HOOK,
                         f"running post-build-hook '{hook}'", (drv_path,), r.builds_act)
    try:
        proc = subprocess.run([hook], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout.decode(errors="replace").splitlines():
            r.client.result(act, ResultType.POST_BUILD_LOG_LINE, (line,))
    except OSError as exc:
        raise StoreRefusal(f"executing '{hook}': {exc.strerror}") from None
    finally:
        r.client.stop(act)
    if proc.returncode != 0:
        raise StoreRefusal(f"program '{hook}' {_status_text(proc.returncode << 8)}")
