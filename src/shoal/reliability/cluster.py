"""Chaos trials that need several hosts: a cut network link and a coordinator restart.

The job runs the way users run it across machines: ``shoal coordinator`` on host 0 and
``shoal train --coordinator`` on hosts 1 and 2, each with half of the workers, every host a
network namespace on this machine (root only). Each launcher is asked for results.json, the
sample log and the model; the launcher that saw the job complete writes them.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from shoal.launch.zygote import WORKER_NAME
from shoal.network import Hosts

__all__ = ["TOKEN", "ClusterRun", "StatusWatcher", "judge_models", "node_shares", "note_exit", "restart_coordinator",
           "run_cluster_trial", "start_coordinator", "strategy_flags", "wait_reading_stacks"]

TOKEN = "shoal-chaos"
_EVICTED = 3  # a remote launcher's exit code when the coordinator evicted its host
_WORKER_MODULES = ("shoal.runtime.worker", "shoal.launch.script_runner")
"""What a worker runs (``python -m MODULE``): ``shoal train``'s, and ``shoal run``'s (chaos's
script prints its stacks on SIGUSR1 too)."""
_SLOW_EXIT_SECONDS = 15.0
"""How long after the job ended a launcher may take to exit before its stacks are read."""
# Polls the coordinator from inside host 0's namespace (the harness cannot reach it); once
# the job has ended, also its record (again after a restart: the new one may know more).
_WATCH = """
import json, sys, time, httpx
url, token = sys.argv[1:]
ended = False
with httpx.Client(headers={"Authorization": "Bearer " + token}, timeout=2) as client:
    while True:
        try:
            status = client.get(url + "/status").json()
            if status.get("status") in ("completed", "failed") and not ended:
                print(json.dumps({"record": client.get(url + "/record").json()}), flush=True)
            ended = status.get("status") in ("completed", "failed")
            print(json.dumps(status), flush=True)
        except httpx.HTTPError:
            ended = False
            print("{}", flush=True)
        time.sleep(0.05)
"""


@dataclass(slots=True)
class ClusterRun:
    """What a cluster trial left: exit codes, the files of the launcher that completed."""

    codes: dict[str, int | None] = field(default_factory=dict)
    stderr: dict[str, str] = field(default_factory=dict)
    directory: Path | None = None
    """Where the completing launcher wrote results.json, samples.jsonl and model.pt."""
    problems: list[str] = field(default_factory=list)
    outage: tuple[float, float] | None = None
    """(killed, answering again), unix times, for a coordinator restart."""
    notes: list[str] = field(default_factory=list)
    """Oddities that are not failures (a slow exit), for the report."""
    fault_skipped: bool = False
    """The job had ended before a link cut's step was seen: nothing was cut."""


class StatusWatcher:
    """The coordinator's latest ``/status``, kept fresh by a poller inside host 0."""

    def __init__(self, hosts: Hosts, address: str, env: dict):
        self._process = hosts.popen(0, [sys.executable, "-c", _WATCH, f"http://{address}", TOKEN],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.latest: dict = {}
        self.record: dict | None = None
        """The coordinator's ``GET /record`` as the job ended (None before)."""
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._process.stdout:
            seen = json.loads(line)
            with self._changed:
                if "record" in seen:
                    self.record = seen["record"]
                else:
                    self.latest = seen
                self._changed.notify_all()

    def wait(self, condition, timeout: float, goal: str) -> dict:
        with self._changed:
            if not self._changed.wait_for(lambda: condition(self.latest), timeout=timeout):
                raise TimeoutError(f"{goal} did not happen in {timeout:g} s (the coordinator's "
                                   f"last status: {self.latest})")
            return self.latest

    def close(self) -> None:
        self._process.kill()
        self._process.wait()


def node_shares(workers: int) -> dict[int, int]:
    """Workers of the launchers on hosts 1 and 2 (host 0 runs the coordinator)."""
    return {1: (workers + 1) // 2, 2: workers // 2}


def start_coordinator(hosts: Hosts, settings, port: int, state: Path, env: dict,
                      linger: float = 10.0, flags: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """``shoal coordinator`` on host 0, keeping the job's record in ``state`` as users are told
    to: a restart, even after the job's end, then loses nothing. It answers ``linger``
    seconds after the job's end: the launchers ask it how the job went. ``flags``: more of its own."""
    process = hosts.popen(0, [sys.executable, "-m", "shoal.cli.main", "coordinator", "--host",
                              hosts.addresses[0], "--port", str(port), "--token", TOKEN,
                              "--workers", str(settings.workers), "--state", str(state),
                              "--heartbeat-timeout", str(settings.heartbeat_timeout), "--linger", f"{linger:g}", *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    found = re.search(r"listening on http://(\S+)", process.stdout.readline())
    if found is None:
        process.kill()
        raise RuntimeError(f"the coordinator did not start: {process.stderr.read()[-500:]}")
    return process, found.group(1)


def restart_coordinator(run: ClusterRun, processes: dict, hosts: Hosts, settings, address: str, state: Path,
                        env: dict, outage: float, linger: float = 10.0, flags: tuple[str, ...] = ()) -> None:
    """SIGKILL ``processes["coordinator"]`` and start it again on its address from its state
    file ``outage`` seconds later; ``run.outage`` says when it was away."""
    processes["coordinator"].send_signal(signal.SIGKILL)
    processes["coordinator"].wait()
    run.stderr["coordinator (killed)"] = processes["coordinator"].stderr.read()
    processes["coordinator"].stderr.close()
    killed = time.time()
    time.sleep(outage)  # the fault itself: how long the coordinator stays down
    port = int(address.rsplit(":", 1)[1])
    processes["coordinator"], _ = start_coordinator(hosts, settings, port, state, env, linger, flags)
    run.outage = (killed, time.time())


def note_exit(run: ClusterRun, name: str, code: int | None) -> None:
    """A process exited ``code`` where 0 was expected: a problem, with its last line of stderr."""
    tail = run.stderr[name].strip().splitlines()[-1:] or ["(no output)"]
    run.problems.append(f"{name} exited {code}: {tail[0]}")


def strategy_flags(settings, checkpoints: Path | None) -> list[str]:
    """``--strategy``, ``--compress``, and for zero a ``checkpoints`` directory (if given): its
    last resort when both holders of a shard die in one trial (two deaths in a step, one
    during the rebuild). A cut host's workers hold one replica group, so its cut needs none."""
    flags = ["--strategy", settings.strategy]
    if settings.compress != "none":
        flags += ["--compress", settings.compress]
    if settings.strategy == "zero" and checkpoints is not None:
        flags += ["--checkpoint-dir", str(checkpoints), "--checkpoint-every", "50"]
    return flags


def _start_launcher(hosts: Hosts, index: int, workers: int, settings, address: str,
                    directory: Path, env: dict) -> subprocess.Popen:
    directory.mkdir()
    command = [sys.executable, "-m", "shoal.cli.main", "train", "--task", settings.task,
               "--steps", str(settings.steps), "--batch-size", str(settings.batch_size),
               "--seed", str(settings.seed), "--workers", str(workers), "--quiet",
               "--coordinator", address, "--token", TOKEN,
               "--output", str(directory / "results.json"),
               "--sample-log", str(directory / "samples.jsonl"),
               "--save-model", str(directory / "model.pt"), *strategy_flags(settings, None)]
    return hosts.popen(index, command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       env=env)


def run_cluster_trial(kind: str, event: dict, settings, directory: Path, env: dict) -> ClusterRun:
    """Run one ``link-cut`` or ``coordinator-restart`` trial; ``event`` says where and when."""
    run = ClusterRun()
    hosts = Hosts(3)
    watcher = None
    processes: dict[str, subprocess.Popen] = {}
    try:
        state = directory / "coordinator-state.jsonl"
        processes["coordinator"], address = start_coordinator(hosts, settings, 0, state, env)
        shares = node_shares(settings.workers)
        for index, workers in shares.items():
            processes[f"host {index}"] = _start_launcher(hosts, index, workers, settings, address,
                                                         directory / f"host-{index}", env)
        watcher = StatusWatcher(hosts, address, env)
        deadline = settings.trial_timeout / 2
        before = watcher.wait(lambda s: s.get("step", -1) >= event["step"], deadline,
                              f"step {event['step']} (before the fault)")
        ended = before.get("status") != "running"  # a short run can end between two looks
        if ended and kind == "link-cut":  # no generation without the host would ever come
            run.notes.append(f"the job had ended before step {event['step']} was seen: no fault")
            run.fault_skipped = True
        elif kind == "link-cut":
            hosts.cut(event["host"])
            survivors = settings.workers - shares[event["host"]]
            watcher.wait(lambda s: s.get("generation", 0) > before["generation"]
                         and len(s.get("members", [])) == survivors, deadline,
                         "a generation without the cut-off host")
            hosts.reconnect(event["host"])
        else:  # after the end too: the launchers must still get the record from the new one
            if ended:
                run.notes.append(f"the job had ended before step {event['step']} was seen: "
                                 "the coordinator was restarted after the end")
            restart_coordinator(run, processes, hosts, settings, address, state, env, event["outage"])
        watcher.wait(lambda s: s.get("status") in ("completed", "failed"), settings.trial_timeout,
                     "the job's end")
        for name, process in processes.items():  # the launchers; the coordinator lingers
            if name != "coordinator":
                run.codes[name] = wait_reading_stacks(run, name, process, settings.trial_timeout)
        run.codes["coordinator"] = processes["coordinator"].wait(timeout=settings.trial_timeout)
    except (TimeoutError, subprocess.TimeoutExpired, RuntimeError) as error:
        run.problems.append(str(error))
    finally:
        if watcher is not None:
            watcher.close()
        for name, process in processes.items():
            if process.poll() is None:
                process.kill()
                process.wait()
            run.codes.setdefault(name, process.returncode)
            run.stderr[name] = process.stderr.read()
        hosts.close()
    _judge_exits(run, kind, event, directory)
    return run


def wait_reading_stacks(run: ClusterRun, name: str, process: subprocess.Popen, timeout: float) -> int:
    """Wait for a process that should exit now that the job has ended. One still running
    after a while has its workers print their stacks (SIGUSR1) into its stderr, and the
    run notes it: a slow exit is a bug to read, even when the trial passes."""
    try:
        return process.wait(timeout=_SLOW_EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    signalled = []
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:  # it exited just now
        children = []
    for child in children:
        try:  # any of them may be exiting as we look
            if child.name() == WORKER_NAME or any(module in child.cmdline() for module in _WORKER_MODULES):
                child.send_signal(signal.SIGUSR1)
                signalled.append(child.pid)
        except psutil.Error:
            continue
    run.notes.append(f"{name} was still running {_SLOW_EXIT_SECONDS:g} s after the job ended; "
                     f"its workers' stacks (pids {signalled}) are in its stderr")
    return process.wait(timeout=timeout)


def _judge_exits(run: ClusterRun, kind: str, event: dict, directory: Path) -> None:
    cut = f"host {event['host']}" if kind == "link-cut" else None
    for name, code in run.codes.items():
        if name == cut:
            if code not in (0, _EVICTED) or (code == _EVICTED and "evicted" not in run.stderr[name]):
                run.problems.append(f"the cut-off {name} exited {code}, not 3 (evicted) or 0")
        elif code != 0:
            note_exit(run, name, code)
    judge_models(run, [directory / f"host-{i}" for i in (1, 2)],
                 [directory / f"host-{i}" for i in (1, 2) if run.codes.get(f"host {i}") == 0])


def judge_models(run: ClusterRun, directories: list[Path], completed: list[Path]) -> None:
    """Exactly one of the launchers' ``directories`` holds the model (its workers' leader
    saved it); ``run.directory`` becomes the first of ``completed`` (launchers that saw the job
    complete), with the model linked in."""
    models = [d for d in directories if (d / "model.pt").exists()]
    if len(models) != 1:
        run.problems.append(f"{len(models)} launchers' workers saved the model, not 1")
    if completed:
        run.directory = completed[0]
        if models and models[0] != run.directory:
            (run.directory / "model.pt").symlink_to(models[0] / "model.pt")
