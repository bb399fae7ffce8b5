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

from shoal.coordinator.record import JobRecord
from shoal.data import GlobalBatchSampler
from shoal.network import Hosts
from shoal.reliability import chaos_script
from shoal.reliability.cluster import (
    TOKEN,
    ClusterRun,
    StatusWatcher,
    judge_models,
    start_coordinator,
    wait_reading_stacks,
)
from shoal.tasks import TASKS
from shoal.tracking import build_results, write_json, write_sample_log

__all__ = ["SCRIPT_KINDS", "node_shares", "run_script_trial", "script_environment"]

SCRIPT_KINDS = ("worker-kill", "worker-restart", "worker-hang", "node-kill-and-return", "link-cut",
                "coordinator-restart")
"""What ``shoal chaos --launcher run`` does to the nodes (all on namespace hosts)."""
_LINGER_SECONDS = 5.0
"""The coordinator's ``--linger``: the nodes' launchers look at the job's status every second."""
STEP_SECONDS = 0.01
"""Each step's compute is stretched by this much, so that a node started again after it was
killed (a second or more to import torch and join) finds steps left to take part in."""


def node_shares(workers: int) -> dict[int, int]:
    """Workers of the nodes on hosts 1 and 2 (host 0 runs the coordinator)."""
    return {1: (workers + 1) // 2, 2: workers // 2}


def script_environment(settings, model: Path, step_seconds: float = 0.0) -> dict[str, str]:
    """What the chaos script reads: the task, the steps, the batch, the seed, where the model goes."""
    return {chaos_script.ENV_TASK: settings.task, chaos_script.ENV_STEPS: str(settings.steps),
            chaos_script.ENV_BATCH: str(settings.batch_size), chaos_script.ENV_SEED: str(settings.seed),
            chaos_script.ENV_MODEL: str(model), chaos_script.ENV_STEP_SECONDS: str(step_seconds)}


class _Trial:
    """One trial's hosts and processes: the coordinator, and each node's launcher by name."""

    def __init__(self, settings, directory: Path, env: dict, restarts: bool):
        self.settings, self.directory, self.env, self.restarts = settings, directory, env, restarts
        self.hosts = Hosts(3)
        self.processes: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()
        """Launchers this trial SIGKILLed: their exit code is the trial's doing."""
        self.state = directory / "coordinator-state.jsonl"
        self.shares = node_shares(settings.workers)
        self.processes["coordinator"], self.address = start_coordinator(self.hosts, settings, 0, self.state, env,
                                                                        _LINGER_SECONDS)

    def start_node(self, host: int, name: str) -> None:
        """``shoal run --coordinator`` on ``host``, its files (the model) in ``directory/name``."""
        files = self.directory / name.replace(" ", "-")
        files.mkdir()
        restarts = ["--max-restarts", "1"] if self.restarts else []
        command = [sys.executable, "-m", "shoal.cli.main", "run", "--coordinator", self.address,
                   "--token", TOKEN, "--nproc-per-node", str(self.shares[host]), *restarts,
                   chaos_script.__file__]
        env = {**self.env, **script_environment(self.settings, files / "model.pt", STEP_SECONDS)}
        self.processes[name] = self.hosts.popen(host, command, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE, text=True, env=env)

    def workers(self, name: str) -> list[psutil.Process]:
        """The script workers of a node's launcher, by local rank (their start order)."""
        children = psutil.Process(self.processes[name].pid).children()
        return sorted(children, key=lambda child: child.create_time())

    def kill_node(self, name: str) -> None:
        """The machine goes: its launcher and its workers SIGKILLed at once."""
        for process in [psutil.Process(self.processes[name].pid), *self.workers(name)]:
            process.kill()
        self.processes[name].wait()
        self.killed.add(name)

    def restart_coordinator(self, outage: float) -> tuple[float, float]:
        self.processes["coordinator"].kill()
        self.processes["coordinator"].wait()
        killed = time.time()
        time.sleep(outage)  # the fault itself: how long the coordinator stays down
        port = int(self.address.rsplit(":", 1)[1])
        self.processes["coordinator"], _ = start_coordinator(self.hosts, self.settings, port, self.state,
                                                             self.env, _LINGER_SECONDS)
        return killed, time.time()

    def close(self, run: ClusterRun) -> None:
        for name, process in self.processes.items():
            if process.poll() is None:
                process.kill()
                process.wait()
            run.codes.setdefault(name, process.returncode)
            run.stderr[name] = process.stderr.read()
        self.hosts.close()


def run_script_trial(kind: str, event: dict, settings, directory: Path, env: dict) -> ClusterRun:
    """Run one trial of ``SCRIPT_KINDS``; ``event`` says where and when (``plan_trials``)."""
    run = ClusterRun()
    trial = watcher = None
    try:
        trial = _Trial(settings, directory, env, restarts=event.get("restarts", False))
        for host in trial.shares:
            trial.start_node(host, f"host {host}")
        watcher = StatusWatcher(trial.hosts, trial.address, env)
        before = watcher.wait(lambda s: s.get("step", -1) >= event["step"], settings.trial_timeout / 2,
                              f"step {event['step']} (before the fault)")
        if before.get("status") != "running":  # a short run can end between two looks
            run.notes.append(f"the job had ended before step {event['step']} was seen: no fault")
            run.fault_skipped = True
        else:
            run.outage = _fault(kind, event, trial, watcher, before, settings)
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
        if trial is not None:
            trial.close(run)
    if trial is not None and not run.problems:
        _judge(run, trial, watcher.record, settings)
    return run


def _fault(kind: str, event: dict, trial: _Trial, watcher: StatusWatcher, before: dict,
           settings) -> tuple[float, float] | None:
    """Do the trial's fault; for a coordinator restart, (killed, answering again) in unix time."""
    name = f"host {event['host']}" if "host" in event else None
    if kind in ("worker-kill", "worker-restart"):
        trial.workers(name)[event["local_rank"]].kill()
    elif kind == "worker-hang":
        trial.workers(name)[event["local_rank"]].suspend()
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
        return trial.restart_coordinator(event["outage"])
    else:
        raise ValueError(f"unknown script trial kind {kind!r}")
    return None


def _judge(run: ClusterRun, trial: _Trial, record: dict, settings) -> None:
    """Every launcher the trial did not kill exits 0 (the job completed, whatever it
    survived); one of them saved the model; results.json and the sample log from the record."""
    for name, code in run.codes.items():
        if name not in trial.killed and code != 0:
            tail = run.stderr[name].strip().splitlines()[-1:] or ["(no output)"]
            run.problems.append(f"{name} exited {code}: {tail[0]}")
    launchers = [name for name in trial.processes if name != "coordinator"]
    directories = [trial.directory / name.replace(" ", "-") for name in launchers]
    judge_models(run, directories, [d for name, d in zip(launchers, directories) if name not in trial.killed])
    if run.directory is None:
        return
    job = JobRecord.from_json(record)
    task = TASKS[settings.task]
    sampler = GlobalBatchSampler(task.train_samples(settings.seed), settings.batch_size, settings.seed)
    config = {"task": settings.task, "script": os.path.basename(chaos_script.__file__)}
    write_json(str(run.directory / "results.json"),
               build_results(record=job, config=config, sampler=sampler, wall_seconds=0.0, units=("samples", 1)))
    write_sample_log(str(run.directory / "samples.jsonl"), job, sampler)
