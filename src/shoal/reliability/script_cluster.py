"""Chaos trials of a user's script: ``shoal run --coordinator`` on namespace hosts.

Users run a ``shoal.train`` script across machines with no node 0 this way: ``shoal
coordinator --state FILE`` on one machine, ``shoal run --coordinator`` with their workers on
each of the others. Here host 0 runs the coordinator and hosts 1 and 2 half of the workers
each, every host a network namespace of this machine (root only), and the trial does to them
what machines suffer: a worker SIGKILLed (with ``--max-restarts`` or without) or SIGSTOPped,
a node's launcher and workers SIGKILLed at once and the same command started again, a
host's link cut and reconnected, the coordinator SIGKILLed and restarted on its address.

The script (``chaos_script``) saves the model from its leader; the coordinator's record gives
results.json and the sample ledger, as ``shoal train --coordinator`` writes them, so that a
trial is checked like every other: the model, every sample once, no process left.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from shoal.coordinator import for_slow_collective
from shoal.coordinator.record import JobRecord
from shoal.data import GlobalBatchSampler
from shoal.network import Hosts
from shoal.reliability import chaos_script
from shoal.reliability.cluster import (
    TOKEN,
    ClusterRun,
    StatusWatcher,
    judge_models,
    node_shares,
    note_exit,
    restart_coordinator,
    start_coordinator,
    wait_reading_stacks,
)
from shoal.tasks import TASKS
from shoal.tracking import build_results, write_json, write_sample_log

__all__ = ["MIN_STEPS", "REJOIN_KINDS", "SCRIPT_KINDS", "STEP_SECONDS", "UNDISTURBED",
           "WAITING_STEP_SECONDS", "run_script_trial",
           "script_environment"]

SCRIPT_KINDS = ("worker-kill", "worker-restart", "worker-hang", "node-kill-and-return", "link-cut",
                "coordinator-restart", "coordinator-restart-in-pause")
"""What ``shoal chaos --launcher run`` does to the nodes (all on namespace hosts)."""
REJOIN_KINDS = ("worker-restart", "node-kill-and-return", "link-cut", "coordinator-restart-in-pause")
"""Kinds after which workers come back (restarted, a node started again, a host reconnected):
the trial fails unless they rejoin the job before it ends."""
UNDISTURBED = "undisturbed"
"""The trial kind with no fault: the reference where no one process's model is the job's.
allreduce, hierarchical and zero sum the same gradients as one process, and localsgd and
diloco on ``quadratic-sgd`` (plain SGD, every sample's gradient linear in the parameters
with one slope) average to one process's update: their trials equal the script run in one
process. async applies updates in the order they arrive, and compression loses a dead
member's error feedback: their trials are checked by the distance to the task's optimum
against the script run undisturbed on the namespace hosts."""
STEP_SECONDS = 0.01
"""Each step's compute is stretched by this much (it stands for a real model's)."""
WAITING_STEP_SECONDS = 0.1
"""A step's stretch while workers are on their way back: a node started again imports torch
for seconds before it joins, and the run must not end before it does. The pace changes when
steps happen, not what they compute."""
MIN_STEPS = 200
"""Shorter runs would end before a node started again could join."""
_LINGER_SECONDS = 5.0
"""The coordinator's ``--linger``: the nodes' launchers look at the job's status every second."""


def script_environment(settings, model: Path, step_seconds: float = 0.0,
                       slow_while: Path | None = None) -> dict[str, str]:
    """What the chaos script reads: the task, the steps, the batch, the seed, where the model
    goes, each step's stretch (longer while ``slow_while`` exists)."""
    env = {chaos_script.ENV_TASK: settings.task, chaos_script.ENV_STEPS: str(settings.steps),
           chaos_script.ENV_BATCH: str(settings.batch_size), chaos_script.ENV_SEED: str(settings.seed),
           chaos_script.ENV_STRATEGY: settings.strategy, chaos_script.ENV_COMPRESS: settings.compress,
           chaos_script.ENV_MODEL: str(model), chaos_script.ENV_STEP_SECONDS: str(step_seconds),
           chaos_script.ENV_BALLAST: str(settings.ballast)}
    if slow_while is not None:
        env[chaos_script.ENV_SLOW_WHILE] = str(slow_while)
        env[chaos_script.ENV_SLOW_STEP_SECONDS] = str(WAITING_STEP_SECONDS)
    return env


class _Trial:
    """One trial's processes on ``hosts``: the coordinator, and each node's launcher by name."""

    def __init__(self, settings, hosts: Hosts, directory: Path, env: dict, restarts: bool):
        self.settings, self.hosts, self.directory, self.env = settings, hosts, directory, env
        self.restarts = restarts
        self.processes: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()
        """Launchers this trial SIGKILLed: their exit code is the trial's doing."""
        self.bereft: set[str] = set()
        """Launchers whose only worker the trial killed for good: they exit 1, saying so."""
        self.slow = directory / "workers-on-their-way"
        """While it exists, the script's steps are slower (``WAITING_STEP_SECONDS``)."""
        self.state = directory / "coordinator-state.jsonl"
        self.shares = node_shares(settings.workers)
        self.address = ""
        self.coordinator_flags: tuple[str, ...] = ()

    def start_coordinator(self, flags: tuple[str, ...] = ()) -> None:
        self.coordinator_flags = flags
        self.processes["coordinator"], self.address = start_coordinator(
            self.hosts, self.settings, 0, self.state, self.env, _LINGER_SECONDS, flags)

    def restart_coordinator(self, run: ClusterRun, outage: float) -> None:
        restart_coordinator(run, self.processes, self.hosts, self.settings, self.address, self.state,
                            self.env, outage, _LINGER_SECONDS, self.coordinator_flags)

    def start_node(self, host: int, name: str) -> None:
        """``shoal run --coordinator`` on ``host``, its files (model, workers' output) in
        ``directory/name``."""
        files = self.directory / name.replace(" ", "-")
        files.mkdir()
        restarts = ["--max-restarts", "1"] if self.restarts else []
        command = [sys.executable, "-m", "shoal.cli.main", "run", "--coordinator", self.address,
                   "--token", TOKEN, "--nproc-per-node", str(self.shares[host]), *restarts,
                   chaos_script.__file__]
        env = {**self.env, **script_environment(self.settings, files / "model.pt", STEP_SECONDS, self.slow)}
        with open(files / "output.txt", "w") as output:  # the workers' lines, their stacks too
            self.processes[name] = self.hosts.popen(host, command, stdout=output, stderr=subprocess.PIPE,
                                                    text=True, env=env)

    def worker(self, name: str, local_rank: int) -> psutil.Process:
        """A node's script worker (a child of its launcher, which sets its LOCAL_RANK)."""
        for child in psutil.Process(self.processes[name].pid).children():
            try:
                if child.environ().get("LOCAL_RANK") == str(local_rank):
                    return child
            except psutil.NoSuchProcess:
                continue
        raise RuntimeError(f"{name} had no local worker {local_rank} to strike")

    def kill_node(self, name: str) -> None:
        """The machine goes: its launcher and its workers SIGKILLed at once."""
        launcher = psutil.Process(self.processes[name].pid)
        for process in [launcher, *launcher.children()]:
            try:
                process.kill()
            except psutil.NoSuchProcess:  # a worker the kernel took with its launcher
                continue
        self.processes[name].wait()
        self.killed.add(name)

    def close(self, run: ClusterRun) -> None:
        for name, process in self.processes.items():
            if process.poll() is None:
                process.kill()
                process.wait()
            run.codes.setdefault(name, process.returncode)
            run.stderr[name] = process.stderr.read()
            output = self.directory / name.replace(" ", "-") / "output.txt"
            if output.exists():
                run.stderr[f"{name}: its workers' output"] = output.read_text()


def run_script_trial(kind: str, event: dict, settings, directory: Path, env: dict) -> ClusterRun:
    """Run one trial of ``SCRIPT_KINDS`` (or ``UNDISTURBED``); ``event`` says where and when
    (``plan_trials``)."""
    run = ClusterRun()
    hosts = Hosts(3)
    if settings.link_mbit is not None:  # every host's, the coordinator's too: a WAN throughout
        for index in range(3):
            hosts.limit(index, settings.link_mbit)
    trial = _Trial(settings, hosts, directory, env, restarts=event.get("restarts", False))
    watcher = None
    try:
        # Every worker needed: a restarted one pauses the job until it is back.
        trial.start_coordinator(("--min-workers", str(settings.workers)) if kind == "coordinator-restart-in-pause"
                                else ())
        for host in trial.shares:
            trial.start_node(host, f"host {host}")
        watcher = StatusWatcher(hosts, trial.address, env)
        if kind != UNDISTURBED:
            _strike(kind, event, trial, watcher, run)
        watcher.wait(lambda s: s.get("status") in ("completed", "failed") and watcher.record is not None,
                     settings.trial_timeout, "the job's end")
        for name, process in trial.processes.items():  # the launchers; the coordinator lingers
            if name != "coordinator" and name not in trial.killed:
                run.codes[name] = wait_reading_stacks(run, name, process, settings.trial_timeout)
        run.codes["coordinator"] = trial.processes["coordinator"].wait(timeout=settings.trial_timeout)
    except (TimeoutError, subprocess.TimeoutExpired, RuntimeError, psutil.Error) as error:
        run.problems.append(str(error))
    finally:
        if watcher is not None:
            watcher.close()
        trial.close(run)
        hosts.close()
    if not run.problems:
        _judge(run, trial, watcher.record, settings)
    return run


def _strike(kind: str, event: dict, trial: _Trial, watcher: StatusWatcher, run: ClusterRun) -> None:
    """At the event's step, the fault (``_fault``); a job that ended before it was seen gets
    none, but the coordinator restarted after the end (its record must survive that too)."""
    settings = trial.settings
    before = watcher.wait(lambda s: s.get("step", -1) >= event["step"], settings.trial_timeout / 2,
                          f"step {event['step']} (before the fault)")
    if before.get("status") == "running":
        _fault(kind, event, trial, watcher, before, run)
    elif kind == "coordinator-restart":  # after the end too: the record must survive it
        run.notes.append(f"the job had ended before step {event['step']} was seen: "
                         "the coordinator was restarted after the end")
        trial.restart_coordinator(run, event["outage"])
    else:  # a short run can end between two looks
        run.notes.append(f"the job had ended before step {event['step']} was seen: no fault")
        run.fault_skipped = True


def _fault(kind: str, event: dict, trial: _Trial, watcher: StatusWatcher, before: dict, run: ClusterRun) -> None:
    """Do the trial's fault; after one that workers come back from, wait until they did."""
    settings = trial.settings
    name = f"host {event['host']}" if "host" in event else ""
    if kind in REJOIN_KINDS:
        trial.slow.touch()
    if kind in ("worker-kill", "worker-restart", "coordinator-restart-in-pause"):
        trial.worker(name, event["local_rank"]).kill()
        if kind == "worker-kill" and trial.shares[event["host"]] == 1:
            trial.bereft.add(name)
    elif kind == "worker-hang":
        trial.worker(name, event["local_rank"]).suspend()
    elif kind == "node-kill-and-return":
        trial.kill_node(name)
        time.sleep(event["down"])  # how long the machine is away
        trial.start_node(event["host"], f"{name} again")
    elif kind == "link-cut":
        trial.hosts.cut(event["host"])
        survivors = settings.workers - trial.shares[event["host"]]
        watcher.wait(lambda s: s.get("generation", 0) > before["generation"]
                     and len(s.get("members", [])) == survivors, settings.trial_timeout / 2,
                     "a generation without the cut-off host")
        trial.hosts.reconnect(event["host"])
    elif kind == "coordinator-restart":
        trial.restart_coordinator(run, event["outage"])
    else:
        raise ValueError(f"unknown script trial kind {kind!r}")
    if kind == "coordinator-restart-in-pause":  # while the job waits for the restarted worker
        watcher.wait(lambda s: any(not w["alive"] for w in s.get("workers", {}).values()),
                     settings.trial_timeout / 2, "the killed worker's death (the pause)")
        trial.restart_coordinator(run, event["outage"])
    if kind in REJOIN_KINDS:
        back = watcher.wait(lambda s: s.get("status") in ("completed", "failed") or (
            s.get("generation", 0) > before["generation"] and len(s.get("members", [])) == settings.workers),
            settings.trial_timeout / 2, f"all {settings.workers} workers back in the job")
        trial.slow.unlink()
        if back.get("status") in ("completed", "failed"):
            run.problems.append(f"the job ended ({back.get('status')}) before its {settings.workers} "
                                "workers were back in it")


def _judge(run: ClusterRun, trial: _Trial, record: dict, settings) -> None:
    """Every launcher the trial did not kill exits 0 (the job completed, whatever it
    survived), or 1 if it lost its only worker for good; one of them saved the model;
    results.json and the sample log from the record."""
    for name, code in run.codes.items():
        if name in trial.bereft:
            if code != 1 or "workers are gone" not in run.stderr[name]:
                run.problems.append(f"{name}, whose only worker was killed, exited {code}, not 1 "
                                    "(its workers are gone)")
        elif name not in trial.killed and code != 0:
            note_exit(run, name, code)
    launchers = [name for name in trial.processes if name != "coordinator"]
    directories = [trial.directory / name.replace(" ", "-") for name in launchers]
    judge_models(run, directories, [d for name, d in zip(launchers, directories)
                                    if name not in trial.killed | trial.bereft])
    job = JobRecord.from_json(record)
    if job.steps_redone:
        run.problems.append(f"{job.steps_redone} committed steps were trained again")
    slow = [c["cause"] for c in job.membership_changes if for_slow_collective(c)]
    if slow:  # no fault: a slow link, say (--link-mbit); the job waited longer, and went on
        run.notes.append(f"a collective outlasted its timeout with every member alive {len(slow)} time(s), "
                         f"last: {slow[-1]}")
    if run.directory is None or not (run.directory / "model.pt").exists():
        return
    sampler = GlobalBatchSampler(TASKS[settings.task].train_samples(settings.seed), settings.batch_size,
                                 settings.seed)
    config = {"task": settings.task, "script": os.path.basename(chaos_script.__file__),
              "strategy": settings.strategy, "compress": settings.compress}
    results = build_results(record=job, config=config, sampler=sampler, wall_seconds=0.0, units=("samples", 1))
    results["eval"] = _evaluate(run.directory / "model.pt", settings)  # a script reports none
    write_json(str(run.directory / "results.json"), results)
    write_sample_log(str(run.directory / "samples.jsonl"), job, sampler)


def _evaluate(model: Path, settings) -> dict:
    """The task's evaluation of the saved model (its distance to the optimum, where known)."""
    task = TASKS[settings.task](settings.seed)
    built = task.build_model()
    built.load_state_dict(chaos_script.Ballasted.task_state(torch.load(model)))
    return task.evaluate(built)
