"""``shoal chaos``: randomized, seeded fault trials, each checked against the promises.

Every trial runs ``shoal train`` with planned faults and asserts: the run completes; the
final model equals an undisturbed run's within 1e-5 relative (under async, whose updates
apply in the order they arrive, and under compression, where a death loses that member's
error feedback: it ends at most twice as far from the task's optimum); every sample counts
exactly once per epoch (from the sample log); no process is left behind. Detection and
recovery times come from the run's own results.json. Link cuts and coordinator restarts need
several hosts (network namespaces, root): they run when those can be built.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.coordinator import for_slow_collective
from shoal.reliability import chaos_script
from shoal.reliability.checks import (
    exactly_once_violations,
    kill_processes,
    leftover_processes,
    relative_difference,
)
from shoal.reliability.cluster import node_shares, run_cluster_trial, strategy_flags
from shoal.reliability.script_cluster import (
    SCRIPT_KINDS,
    STEP_SECONDS,
    UNDISTURBED,
    WAITING_STEP_SECONDS,
    run_script_trial,
    script_environment,
)
from shoal.tasks import TASKS

__all__ = ["ARRIVAL_ORDER_STRATEGIES", "CLUSTER_KINDS", "KINDS", "LAUNCHERS", "LOCAL_STATE_STRATEGIES",
           "SCRIPT_KINDS", "ChaosSettings", "TrialOutcome", "TrialPlan", "default_task", "plan_trials",
           "run_chaos"]

KINDS = ("kill", "hang", "exception", "kill-rank0", "two-in-one-step", "kill-and-rejoin",
         "killed-again-after-rejoin", "kill-during-commit", "kill-during-heal", "lost-answer")
CLUSTER_KINDS = ("link-cut", "coordinator-restart")
"""Kinds that run on several namespace hosts (``ChaosSettings.cluster``)."""
LAUNCHERS = ("train", "run")
"""What every trial runs: ``shoal train`` (the built-in task, with its own fault flags), or
``shoal run --coordinator`` on namespace hosts (a ``shoal.train`` script, faults done to its
processes and links from outside: ``SCRIPT_KINDS``)."""
_TOLERANCE = 1e-5
LOCAL_STATE_STRATEGIES = ("localsgd", "diloco")
"""Strategies whose members each keep their own inner optimizer state, which a death loses:
the undisturbed model is reached exactly only on a task whose optimizer keeps none."""
ARRIVAL_ORDER_STRATEGIES = ("async",)
"""Strategies that apply updates in the order they arrive, so that two undisturbed runs end
apart (async: 6-12% relative on quadratic). A trial is checked by its distance to the task's
optimum instead: at most ``_OPTIMUM_FACTOR`` times the undisturbed run's. (Ten undisturbed
async runs on quadratic, seed 7: 0.24-0.35, from a start 18 away.)"""
_OPTIMUM_FACTOR = 2.0


def default_task(strategy: str) -> str:
    """``quadratic``, or for localsgd and diloco ``quadratic-sgd`` (no optimizer state)."""
    return "quadratic-sgd" if strategy in LOCAL_STATE_STRATEGIES else "quadratic"


@dataclass(kw_only=True, slots=True)
class ChaosSettings:
    trials: int = 10
    seed: int = 0
    strategy: str = "allreduce"
    task: str = ""
    """Empty: ``default_task(strategy)``."""
    workers: int = 4
    steps: int = 600
    batch_size: int = 64
    heartbeat_timeout: float = 2.0
    trial_timeout: float = 300.0
    cluster: bool = False
    """Include link cuts and coordinator restarts (needs root for network namespaces)."""
    compress: str = "none"
    """``--compress`` for every run."""
    launcher: str = "train"
    """One of ``LAUNCHERS``; ``run`` needs ``cluster``."""
    link_mbit: float | None = None
    """``--launcher run``: every namespace host's link limited to this many Mbit/s (``tbf``)."""
    ballast: int = 0
    """``--launcher run``: parameters added to the script's model, for a payload (``chaos_script``)."""

    def __post_init__(self):
        self.task = self.task or default_task(self.strategy)

    @property
    def kinds(self) -> tuple[str, ...]:
        if self.launcher == "run":
            return SCRIPT_KINDS
        # async's members agree on no step, so none can miss the answer of one
        agreeing = self.strategy not in ARRIVAL_ORDER_STRATEGIES
        local = tuple(kind for kind in KINDS if kind != "lost-answer" or agreeing)
        return local + (CLUSTER_KINDS if self.cluster else ())

    @property
    def checked_by_optimum(self) -> str | None:
        """Why a trial's model is checked by its distance to the optimum rather than against
        the undisturbed model (None: it is checked against the model)."""
        if self.strategy in ARRIVAL_ORDER_STRATEGIES:
            return (f"{self.strategy} applies updates in the order they arrive, so no two of its "
                    "runs end alike, disturbed or not")
        if self.compress != "none":
            return (f"under --compress {self.compress} a death loses what that member's compression "
                    "left out (its error feedback), and fewer members round the sum differently")
        return None


@dataclass(slots=True)
class TrialPlan:
    index: int
    kind: str
    faults: list[list[str]]  # [[flag, "RANK@STEP"], ...]
    restart: bool = False
    wait_for_rejoin: bool = False
    """Survivors wait for the restarted worker (``--min-workers`` = all), so a heal happens."""
    event: dict | None = None
    """A cluster fault: ``{"step", "host"}`` for a link cut, ``{"step", "outage"}`` (seconds)
    for a coordinator restart; under ``--launcher run`` also the local rank of a worker
    struck, a node's time away, and whether the launchers restart workers (``_script_event``)."""

    def describe(self, workers: int) -> str:
        event = self.event or {}
        restarts = " (--max-restarts 1)" if event.get("restarts") else ""
        if self.kind == "coordinator-restart-in-pause":
            return (f"SIGKILL host {event['host']}'s local worker {event['local_rank']} at step {event['step']}"
                    f"{restarts}, --min-workers all: coordinator down {event['outage']:g} s in the pause")
        if self.kind in ("worker-kill", "worker-restart", "worker-hang"):
            verb = "SIGSTOP" if self.kind == "worker-hang" else "SIGKILL"
            return (f"{verb} host {event['host']}'s local worker {event['local_rank']} at step "
                    f"{event['step']}{restarts}")
        if self.kind == "node-kill-and-return":
            return (f"SIGKILL host {event['host']}'s node at step {event['step']}, "
                    f"back after {event['down']:g} s")
        if self.kind == "link-cut":
            return f"cut host {event['host']}'s link at step {event['step']}{restarts}"
        if self.kind == "coordinator-restart":
            return f"coordinator down {self.event['outage']:g} s at step {self.event['step']}"
        return " ".join(self.flags(workers))

    def flags(self, workers: int) -> list[str]:
        return [part for flag, spec in self.faults for part in (flag, spec)] + \
            (["--restart"] if self.restart else []) + \
            (["--min-workers", str(workers)] if self.wait_for_rejoin else [])


@dataclass(slots=True)
class TrialOutcome:
    plan: TrialPlan
    passed: bool
    problems: list[str] = field(default_factory=list)
    detection_seconds: list[float] = field(default_factory=list)
    recovery_seconds: list[float] = field(default_factory=list)
    rejoins: int = 0
    outage_steps: int | None = None
    """Steps committed while the coordinator was down (coordinator restarts)."""
    seconds: float = 0.0
    fault_skipped: bool = False
    """A cluster trial whose job ended before the fault's step was seen (a note says so)."""
    optimum_ratio: float | None = None
    """Trials checked by the optimum (async, compression): the final model's distance to it
    over the undisturbed run's."""
    notes: list[str] = field(default_factory=list)
    """Oddities that did not fail the trial (a slow exit), with where to read more."""


def plan_trials(settings: ChaosSettings) -> list[TrialPlan]:
    """The seeded fault plan: the same seed gives the same trials."""
    rng = random.Random(settings.seed)
    last = max(6, settings.steps * 2 // 3)
    early = max(6, settings.steps // 4)  # leaves time for a restarted worker to rejoin
    plans = []
    kinds = settings.kinds
    for index in range(settings.trials):
        kind = kinds[index] if index < len(kinds) else rng.choice(kinds)
        rank = rng.randrange(settings.workers)
        step = rng.randrange(5, last)
        other = (rank + 1 + rng.randrange(settings.workers - 1)) % settings.workers
        if settings.launcher == "run":
            plans.append(TrialPlan(index, kind, [], event=_script_event(kind, rng, settings, step, early)))
            continue
        faults, restart = {
            "kill": ([["--kill", f"{rank}@{step}"]], False),
            "hang": ([["--hang", f"{rank}@{step}"]], False),
            "exception": ([["--fail", f"{rank}@{step}"]], False),
            "kill-rank0": ([["--kill", f"0@{step}"]], False),
            "two-in-one-step": ([["--kill", f"{rank}@{step}"], ["--kill", f"{other}@{step}"]], False),
            "kill-and-rejoin": ([["--kill", f"{rank}@{rng.randrange(5, early)}"]], True),
            "killed-again-after-rejoin": (
                [["--kill", f"{rank}@{rng.randrange(5, early)}"], ["--kill", f"{rank}@{last}"]], True),
            "kill-during-commit": ([["--kill", f"{rank}@{step}:commit"]], False),
            "kill-during-heal": (
                [["--kill", f"{rank}@{step}"], ["--kill", f"{other}@{step}:heal"]], True),
            # two, so that under zero both holders of a shard miss it, a third of the time
            "lost-answer": (
                [["--lose-answer", f"{rank}@{step}"], ["--lose-answer", f"{other}@{step}"]], False),
        }.get(kind, ([], False))
        event = {"link-cut": lambda: {"step": step, "host": rng.choice((1, 2))},
                 "coordinator-restart": lambda: {"step": step, "outage": round(rng.uniform(0.2, 3.0), 1)},
                 }.get(kind, lambda: None)()
        plans.append(TrialPlan(index, kind, faults, restart, wait_for_rejoin=kind == "kill-during-heal",
                               event=event))
    return plans


def _script_event(kind: str, rng: random.Random, settings: ChaosSettings, step: int, early: int) -> dict:
    """Where and when a trial of ``shoal run --coordinator`` strikes. A worker restarted, or a
    node started again, strikes early: it should rejoin before the job ends."""
    host = rng.choice((1, 2))
    local_rank = rng.randrange(node_shares(settings.workers)[host])
    struck = {"step": step, "host": host, "local_rank": local_rank}
    return {
        "worker-kill": lambda: struck,
        "worker-hang": lambda: struck,
        "worker-restart": lambda: {**struck, "step": rng.randrange(5, early), "restarts": True},
        "node-kill-and-return": lambda: {"step": rng.randrange(5, early), "host": host,
                                         "down": round(rng.uniform(0.0, 2.0), 1)},
        "link-cut": lambda: {"step": step, "host": host, "restarts": True},
        "coordinator-restart": lambda: {"step": step, "outage": round(rng.uniform(0.2, 3.0), 1)},
        "coordinator-restart-in-pause": lambda: {**struck, "step": rng.randrange(5, early), "restarts": True,
                                                 "outage": round(rng.uniform(0.2, 1.0), 1)},
    }[kind]()


def _train(settings: ChaosSettings, directory: Path, extra: list[str], marker: str):
    command = [
        sys.executable, "-m", "shoal.cli.main", "train", "--task", settings.task,
        "--workers", str(settings.workers), "--steps", str(settings.steps),
        "--batch-size", str(settings.batch_size), "--seed", str(settings.seed), "--quiet",
        "--heartbeat-timeout", str(settings.heartbeat_timeout),
        "--output", str(directory / "results.json"), "--sample-log", str(directory / "samples.jsonl"),
        "--save-model", str(directory / "model.pt"), *strategy_flags(settings, directory / "checkpoints"),
        *_emulated_hosts(settings), *extra,
    ]
    env = {**os.environ, "SHOAL_CHAOS_TRIAL": marker}
    return subprocess.run(command, capture_output=True, text=True, env=env,
                          timeout=settings.trial_timeout)


def _reference(settings: ChaosSettings, directory: Path) -> Path:
    """Run the undisturbed run every trial must equal; the directory of its files.

    ``shoal train`` with no fault; under ``--launcher run`` the script in one plain process
    (``python script.py``), which is the promise itself: the job's model equals one
    process's. Where no one process's model is the job's (``checked_by_optimum``), the script
    under ``shoal run --coordinator`` on the namespace hosts with no fault (``UNDISTURBED``)."""
    if settings.launcher == "run" and settings.checked_by_optimum:
        return _undisturbed_script_run(settings, directory)
    if settings.launcher == "run":
        env = {**os.environ, **script_environment(settings, directory / "model.pt"),
               "SHOAL_CHAOS_TRIAL": uuid.uuid4().hex}
        result = subprocess.run([sys.executable, chaos_script.__file__], capture_output=True, text=True,
                                env=env, timeout=settings.trial_timeout, check=False)
    else:
        result = _train(settings, directory, [], uuid.uuid4().hex)
    if result.returncode != 0:
        raise RuntimeError(f"the undisturbed reference run failed: {result.stderr[-500:]}")
    return directory


def _undisturbed_script_run(settings: ChaosSettings, directory: Path) -> Path:
    """The script under ``shoal run --coordinator`` on the namespace hosts, no fault: the
    directory of its files, checked as a trial's are."""
    marker = uuid.uuid4().hex
    run = run_script_trial(UNDISTURBED, {}, settings, directory, {**os.environ, "SHOAL_CHAOS_TRIAL": marker})
    problems = run.problems + _leftovers(marker)
    if problems or run.directory is None:
        saved = _save_stderr(run, f"shoal-chaos-{marker[:8]}-reference.txt")
        raise RuntimeError(f"the undisturbed reference run failed: {'; '.join(problems) or 'no files'} "
                           f"(the processes' stderr is in {saved})")
    return run.directory


def _leftovers(marker: str) -> list[str]:
    """A run's processes still there, killed (they would slow every later trial): its
    problem, if any."""
    left = leftover_processes(marker)
    if not left:
        return []
    kill_processes(left)
    return [f"processes left behind: {left}"]


def _save_stderr(run, name: str) -> Path:
    """A cluster run's stderr (workers' stacks included), kept past the temporary root."""
    saved = Path(tempfile.gettempdir()) / name
    saved.write_text("\n".join(f"==== {process}\n{text}" for process, text in run.stderr.items()))
    return saved


def _emulated_hosts(settings: ChaosSettings) -> list[str]:
    """hierarchical on one launcher: two emulated hosts, so that a fault also meets the
    leaders' group and a host group that is not everyone (cluster trials have two real hosts)."""
    if settings.strategy != "hierarchical" or settings.workers < 4:
        return []
    return ["--workers-per-host", str(settings.workers // 2)]


def _run_trial(plan: TrialPlan, settings: ChaosSettings, reference: Path, root: Path,
               dataset_size: int) -> TrialOutcome:
    """``reference``: the undisturbed run's directory."""
    directory = root / f"trial-{plan.index}"
    directory.mkdir()
    marker = uuid.uuid4().hex
    started = time.monotonic()
    outcome = TrialOutcome(plan, passed=False)
    if settings.launcher == "run" or plan.kind in CLUSTER_KINDS:
        trial = run_script_trial if settings.launcher == "run" else run_cluster_trial
        run = trial(plan.kind, plan.event, settings, directory, {**os.environ, "SHOAL_CHAOS_TRIAL": marker})
        outcome.problems += run.problems
        outcome.fault_skipped = run.fault_skipped
        if run.notes or run.problems:  # keep the stderr (stacks included) past the temporary root
            saved = _save_stderr(run, f"shoal-chaos-{marker[:8]}-trial-{plan.index}.txt")
            outcome.notes += [f"{note} (saved in {saved})" for note in run.notes]
            if run.problems:
                outcome.notes.append(f"the processes' stderr is in {saved}")
        files = run.directory if not run.problems else None
        if files is not None and run.outage is not None:
            outcome.outage_steps = _steps_committed_between(files / "samples.jsonl", *run.outage)
    else:
        files = _run_local_trial(plan, settings, directory, marker, outcome)
    outcome.seconds = time.monotonic() - started
    if files is not None:
        _check_files(files, plan, settings, reference, dataset_size, outcome)
    local = settings.launcher == "train" and plan.kind not in CLUSTER_KINDS
    if outcome.problems and local and any(directory.iterdir()):  # (a run timed out wrote nothing)
        kept = Path(tempfile.gettempdir()) / f"shoal-chaos-{marker[:8]}-trial-{plan.index}"
        shutil.copytree(directory, kept, dirs_exist_ok=True)  # past the temporary root
        outcome.notes.append(f"the run's files and stderr are in {kept}")
    outcome.problems += _leftovers(marker)
    outcome.passed = not outcome.problems
    return outcome


def _run_local_trial(plan: TrialPlan, settings: ChaosSettings, directory: Path, marker: str,
                     outcome: TrialOutcome) -> Path | None:
    """``shoal train`` with the planned faults; the directory of its files if it completed."""
    try:
        result = _train(settings, directory, plan.flags(settings.workers), marker)
    except subprocess.TimeoutExpired:
        outcome.problems.append(f"did not finish in {settings.trial_timeout:g} s")
        return None
    (directory / "stderr.txt").write_text(result.stderr)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
        outcome.problems.append(f"exit code {result.returncode}: {tail[0]}")
        return None
    return directory


def _steps_committed_between(sample_log: Path, start: float, end: float) -> int:
    lines = (json.loads(line) for line in sample_log.read_text().splitlines() if line)
    return sum(start <= line["committed_at"] <= end for line in lines)


def _check_files(files: Path, plan: TrialPlan, settings: ChaosSettings, reference: Path,
                 dataset_size: int, outcome: TrialOutcome) -> None:
    """The promises, from what the run wrote: the model, the sample log, results.json."""
    results = json.loads((files / "results.json").read_text())
    if settings.checked_by_optimum:
        _check_distance_to_optimum(results, reference, outcome)
    else:
        difference = relative_difference(files / "model.pt", reference / "model.pt")
        if not difference <= _TOLERANCE:
            outcome.problems.append(f"model differs from the undisturbed run by {difference:.2e}")
    outcome.problems += exactly_once_violations(files / "samples.jsonl",
                                                dataset_size=dataset_size, steps=settings.steps)
    # A re-form for a slow collective (every member alive, the timeout lengthened) is no
    # fault's doing: it neither shows that the fault struck nor how fast it was found.
    changes = [c for c in results["membership_changes"] if not for_slow_collective(c)]
    outcome.detection_seconds = [c["detection_seconds"] for c in changes
                                 if c["cause"] != "workers joined"]
    outcome.recovery_seconds = [c["recovery_seconds"] for c in changes
                                if c["recovery_seconds"] is not None]
    outcome.rejoins = sum(c["cause"] == "workers joined" or c["cause"].endswith("rejoined")
                          for c in changes)
    # A coordinator restart changes no membership: the workers train on through it.
    if not changes and plan.kind != "coordinator-restart" and not outcome.fault_skipped:
        outcome.problems.append("no membership change recorded")


def _check_distance_to_optimum(results: dict, reference: Path, outcome: TrialOutcome) -> None:
    undisturbed = json.loads((reference / "results.json").read_text())["eval"]["distance_to_optimum"]
    distance = results["eval"]["distance_to_optimum"]
    outcome.optimum_ratio = distance / undisturbed
    if not distance <= _OPTIMUM_FACTOR * undisturbed:
        outcome.problems.append(f"model ended {distance:.3g} from the optimum, the undisturbed run "
                                f"{undisturbed:.3g}")


def run_chaos(settings: ChaosSettings, *, report=print,
              plans: list[TrialPlan] | None = None) -> list[TrialOutcome]:
    """Run the reference, then every planned trial (or just ``plans``); ``report`` gets one
    line per trial."""
    dataset_size = len(TASKS[settings.task](settings.seed).train_dataset())
    with tempfile.TemporaryDirectory(prefix="shoal-chaos-") as temporary:
        root = Path(temporary)
        (root / "reference").mkdir()
        reference = _reference(settings, root / "reference")
        outcomes = []
        for plan in plans if plans is not None else plan_trials(settings):
            outcome = _run_trial(plan, settings, reference, root, dataset_size)
            outcomes.append(outcome)
            verdict = "pass" if outcome.passed else "FAIL: " + "; ".join(outcome.problems)
            verdict += "".join(f"; note: {note}" for note in outcome.notes)
            report(f"trial {plan.index:3d} {plan.kind:26s} {plan.describe(settings.workers):58s} "
                   f"{outcome.seconds:5.1f} s  {verdict}")
        return outcomes


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(outcomes: list[TrialOutcome]) -> dict:
    by_kind: dict[str, dict] = {}
    for kind in dict.fromkeys(o.plan.kind for o in sorted(outcomes, key=lambda o: o.plan.index)):  # as planned
        chosen = [o for o in outcomes if o.plan.kind == kind]
        if not chosen:
            continue
        detection = [s for o in chosen for s in o.detection_seconds]
        recovery = [s for o in chosen for s in o.recovery_seconds]
        by_kind[kind] = {
            "trials": len(chosen), "passed": sum(o.passed for o in chosen),
            "rejoins": sum(o.rejoins for o in chosen),
            "detection_p50": _percentile(detection, 50), "detection_p95": _percentile(detection, 95),
            "recovery_p50": _percentile(recovery, 50), "recovery_p95": _percentile(recovery, 95),
        }
        outages = [o.outage_steps for o in chosen if o.outage_steps is not None]
        if outages:
            by_kind[kind]["outage_steps_min"] = min(outages)
            by_kind[kind]["outage_steps_median"] = statistics.median(outages)
    ratios = [o.optimum_ratio for o in outcomes if o.optimum_ratio is not None]
    return {"trials": len(outcomes), "passed": sum(o.passed for o in outcomes), "by_kind": by_kind,
            "optimum_ratio_median": statistics.median(ratios) if ratios else None,
            "optimum_ratio_max": max(ratios) if ratios else None,
            "failures": [asdict(o) for o in outcomes if not o.passed],
            "notes": [f"trial {o.plan.index} ({o.plan.kind}): {note}" for o in outcomes for note in o.notes]}


_SCRIPT_TRIALS = """Every trial runs a `shoal.train` script (`src/shoal/reliability/chaos_script.py`: the task, its \
optimizer, `strategy=` and `options=StrategyOptions(compress=...)`, the leader saving the model) \
under `shoal run --coordinator` on three network-namespace hosts: `shoal coordinator --state FILE` \
on one, a node's launcher with half the workers on each of the others. The faults come from outside, \
as machines suffer them: a worker SIGKILLed (without and with `--max-restarts 1`) or SIGSTOPped, a \
node's launcher and workers SIGKILLed together and the same command started again after a while, a \
host's link cut until the others re-form and then reconnected (`--max-restarts 1`: its workers \
rejoin), the coordinator SIGKILLed and restarted on its address (also while the job is paused: with \
`--min-workers` all, a worker killed and restarted, and the coordinator restarted before it is \
back). The sample log is built from the coordinator's record, as `shoal train --coordinator` builds \
it. Each step's compute is stretched by {pause:g} ms, and by {waiting:g} ms while workers are on \
their way back (restarted, a node started again, a host reconnected): the trial waits for them all \
to be back in the job, and fails if it ends first.
"""


def render_markdown(summary: dict, settings: ChaosSettings, command: str, when: str) -> str:
    def seconds(value):
        return "-" if value is None else f"{value:.2f}"

    rows = [f"| {kind} | {s['trials']} | {s['passed']} | {s['rejoins']} | "
            f"{seconds(s['detection_p50'])} | "
            f"{seconds(s['detection_p95'])} | {seconds(s['recovery_p50'])} | "
            f"{seconds(s['recovery_p95'])} |" for kind, s in summary["by_kind"].items()]
    restarts = summary["by_kind"].get("coordinator-restart")
    rounds = (" A round's end meets on the coordinator's store, so under local steps no step "
              "commits while it is down: a round that ends then is redone in a new generation "
              "once it is back." if settings.strategy in LOCAL_STATE_STRATEGIES else "")
    outage = ("" if restarts is None or "outage_steps_min" not in restarts else
              f"\nSteps committed while the coordinator was down (0.2-3 s): "
              f"{restarts['outage_steps_median']:g} per outage (median; at least "
              f"{restarts['outage_steps_min']}).{rounds}\n")
    hosts = (f"The other trials run one launcher with `{' '.join(_emulated_hosts(settings))}`: two "
             "emulated hosts.\n" if _emulated_hosts(settings) else "")
    cluster = hosts + ("Link cuts and coordinator restarts run on three network-namespace hosts "
                       "(`shoal coordinator --state FILE` on one, half the workers on each of the "
                       "others); a coordinator restart whose step came after the job's end "
                       "restarts it then.\n"
                       if settings.cluster else
                       "Link cuts and coordinator restarts were not run (they need root for "
                       "network namespaces).\n")
    compression = "" if settings.compress == "none" else f" with --compress {settings.compress}"
    if settings.ballast:
        compression += f", {settings.ballast * 4 / 1e6:g} MB of ballast parameters"
    if settings.link_mbit is not None:
        compression += f", every host's link {settings.link_mbit:g} Mbit/s"
    model_check = "the final model equals the undisturbed run's within 1e-5 relative"
    undisturbed = "the undisturbed run's"
    exits = ""
    if settings.launcher == "run":
        cluster = _SCRIPT_TRIALS.format(pause=STEP_SECONDS * 1000, waiting=WAITING_STEP_SECONDS * 1000)
        exits = ("every node's launcher that was not killed exits 0 (1, saying its workers are gone, if the "
                 "trial killed its only worker); no step the coordinator recorded as committed is trained "
                 "again; ")
        undisturbed = "the script's run undisturbed on the same hosts"
        model_check = (f"the final model equals the script's run in one plain process with strategy "
                       f"{settings.strategy} within 1e-5 relative"
                       + ("" if settings.strategy not in LOCAL_STATE_STRATEGIES else
                          f" (on {default_task(settings.strategy)}, plain SGD whose every sample's gradient "
                          "is linear in the parameters with one slope, the members' averaged update is one "
                          "process's)"))
    if settings.checked_by_optimum:
        ratios = ("" if summary["optimum_ratio_max"] is None else
                  f" (trials: median {summary['optimum_ratio_median']:.2f}x, at most "
                  f"{summary['optimum_ratio_max']:.2f}x)")
        model_check = (f"the final model ends at most {_OPTIMUM_FACTOR:g}x as far from the task's optimum as "
                       f"{undisturbed}{ratios}: {settings.checked_by_optimum}")
    model_check = exits + model_check
    source = "coordinator's record" if settings.launcher == "run" else "run's results.json"
    rejoins = ('"rejoins" counts the generations that workers joined before the run ended: restarted ones, '
               "a node's started again, a cut-off host's." if settings.launcher == "run" else
               '"rejoins"\ncounts restarted workers that were back in a generation before the run ended.')
    failures = "\n".join(f"- trial {f['plan']['index']} ({f['plan']['kind']}): "
                         f"{'; '.join(f['problems'])}" for f in summary["failures"]) or "- none"
    notes = "\n".join(f"- {note}" for note in summary["notes"]) or "- none"
    return f"""## Chaos suite

{summary['passed']} of {summary['trials']} trials passed ({when}; task {settings.task}, \
strategy {settings.strategy}{compression}, {settings.workers} workers, {settings.steps} steps, heartbeat timeout \
{settings.heartbeat_timeout:g} s, seed {settings.seed}). Regenerate with:

    {command}

Each trial asserts: the run completes; {model_check}; every sample counts exactly once per epoch (sample log); no process is left.
Detection is death to the next generation, recovery is death to the next committed step
(seconds, from the {source}); a rejoin's recovery is from its join. {rejoins}
{cluster}
| fault | trials | passed | rejoins | detection p50 | detection p95 | recovery p50 | recovery p95 |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}
{outage}
Failures:
{failures}

Notes (slow exits of passing trials, with their workers' stacks):
{notes}
"""
