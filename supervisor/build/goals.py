"""What a build request means: derivation goals and their dependencies.

``plan`` turns derived paths (``path``, ``drv!*``, ``drv!a,b``) into a
graph of ``DrvGoal`` objects, one per derivation (wanted outputs merged),
reading each ``.drv`` from the store and following its input derivations.
Pure over the ``StoreView`` it is given.  Process: session.

Trust: targets come from a client; every path was checked by the
session, and every ``.drv`` is parsed strictly from the store itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nixwarden.shared.errors import StoreRefusal

# BuildResult statuses (spec worker-protocol §2.10)
BUILT, SUBSTITUTED, ALREADY_VALID = 0, 1, 2
PERMANENT_FAILURE, INPUT_REJECTED, OUTPUT_REJECTED = 3, 4, 5
TRANSIENT_FAILURE, TIMED_OUT, MISC_FAILURE, DEPENDENCY_FAILED = 6, 8, 9, 10
NOT_DETERMINISTIC, RESOLVES_TO_ALREADY_VALID, NO_SUBSTITUTERS = 12, 13, 14
SUCCESS = {BUILT, SUBSTITUTED, ALREADY_VALID, RESOLVES_TO_ALREADY_VALID}


@dataclass
class Outcome:
    status: int
    error: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    times_built: int = 0
    start_time: int = 0
    stop_time: int = 0
    exit_bits: int = 0  # 0x04 failure, 0x01 timeout, 0x02 hash mismatch, 0x08 check
    output_ids: dict[str, str] = field(default_factory=dict)  # output -> DrvOutput hash

    @property
    def ok(self) -> bool:
        return self.status in SUCCESS


@dataclass(eq=False)
class DrvGoal:
    drv_path: str
    drv: object  # shared.derivation.Derivation
    output_paths: dict[str, str | None]
    wanted: set[str]
    deps: list["DrvGoal"] = field(default_factory=list)
    dependents: list["DrvGoal"] = field(default_factory=list)
    outcome: Outcome | None = None
    check: bool = False  # --check: rebuild valid outputs and compare
    repair: bool = False  # with check: replace the valid outputs by the rebuild
    deferred: bool = False  # output paths depend on content-addressed inputs or outputs
    original: "DrvGoal | None" = None  # for a resolved derivation: the one it stands for
    expanded: bool = False  # input derivations added as goals
    request: str = "*"  # outputs first asked for ("*" = all), as Nix's goal name shows them
    wait_act: int = 0  # a resolved goal's "resolved derivation" activity, stopped when done

    @property
    def name(self) -> str:
        return self.drv.name


@dataclass
class Plan:
    goals: dict[str, DrvGoal]
    targets: list[tuple[str, object]]  # (target text, DrvGoal or opaque path)


def parse_target(text: str) -> tuple[str, str | None]:
    """``drv!outs`` → (drv, outs); an opaque path → (path, None)."""
    path, bang, outputs = text.partition("!")
    return (path, outputs) if bang else (path, None)


class Planner:
    """Builds the goal graph; ``view`` reads derivations and validity."""

    def __init__(self, view, *, check: bool = False):
        self.view = view
        self.check = check
        self.goals: dict[str, DrvGoal] = {}

    def goal(self, drv_path: str, wanted: set[str] | None) -> DrvGoal:
        """The goal for ``drv_path`` (``None`` = all outputs), created once.

        Its input derivations become goals only when a wanted output is
        not valid yet: like Nix, nothing is built for outputs that exist.
        """
        goal = self.goals.get(drv_path)
        if goal is None:
            if not self.view.is_valid(drv_path):
                raise StoreRefusal(f"cannot build missing derivation '{drv_path}'")
            self.view.temp_roots.add(drv_path)
            drv = self.view.read_derivation(drv_path)
            paths, deferred = self.view.output_paths_and_deferred(drv_path, drv)
            goal = DrvGoal(drv_path, drv, paths, set(), deferred=deferred,
                           request="*" if wanted is None else ",".join(sorted(wanted)))
            self.goals[drv_path] = goal
        names = set(goal.drv.outputs) if wanted is None else wanted
        missing = names - set(goal.drv.outputs)
        if missing:
            raise StoreRefusal(f"derivation '{drv_path}' does not have wanted outputs "
                               + ", ".join(f"'{m}'" for m in sorted(missing)))
        goal.wanted |= names
        if goal.expanded or goal.outcome is not None:
            return goal
        if not self.check and not self.view.wanted_valid(goal) and self.view.try_substitute(goal):
            return goal
        if self.check or not self.view.wanted_valid(goal):
            self._expand(goal)
        return goal

    def _expand(self, goal: DrvGoal) -> None:
        goal.expanded = True
        for dep_path, dep_outputs in goal.drv.input_drvs.items():
            dep = self.goal(dep_path, set(dep_outputs))
            _check_impure_input(goal, dep)
            goal.deps.append(dep)
            dep.dependents.append(goal)

    def plan(self, targets: list[str]) -> Plan:
        result = []
        for text in targets:
            path, outputs = parse_target(text)
            if outputs is None:
                result.append((text, path))
            else:
                wanted = None if outputs == "*" else set(outputs.split(","))
                result.append((text, self.goal(path, wanted)))
        return Plan(self.goals, result)


def _check_impure_input(goal: DrvGoal, dep: DrvGoal) -> None:
    """Only impure (or fixed-output) derivations may depend on impure ones."""
    impure = "impure"
    if dep.drv.type().value == impure and goal.drv.type().value not in (impure, "fixed"):
        raise StoreRefusal(f"pure derivation '{goal.drv_path}' depends on impure derivation "
                           f"'{dep.drv_path}'")
