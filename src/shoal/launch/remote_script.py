"""``shoal run --coordinator HOST:PORT``: this node's script workers join a standalone coordinator.

There is no node 0: the coordinator (``shoal coordinator`` on any machine, restartable from
its ``--state`` file) owns the job, so a ``shoal.train`` script survives the loss of any
node, and a node started later with the same command joins the running job. This launcher
only starts and supervises the local workers: it tells the coordinator at once when one
exits (it knows the pid; the coordinator maps it to the worker and says which), starts a
failed one again with ``--max-restarts``, stops one the coordinator gave up on once the job
has ended, and says at the end how the job went.

A worker has no fixed rank here (the coordinator numbers the workers as they join, and the
ranks change with the membership), so the environment has LOCAL_RANK and LOCAL_WORLD_SIZE but
not torchrun's RANK, WORLD_SIZE or MASTER_ADDR: a plain DDP script cannot meet anyone here.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import sys
import threading
import time

import httpx

from shoal.config import RunConfig, coordinator_url
from shoal.coordinator.client import CoordinatorClient, CoordinatorUnreachable
from shoal.launch.joining import admission_refusal, final_status
from shoal.launch.script_runner import ENV_LAUNCHER_PID
from shoal.launch.workers import (
    SIGTERM_STOP,
    StopRequest,
    WorkerGroup,
    WorkerProcess,
    describe_exit,
)
from shoal.runtime.context import ENV_COORDINATOR, ENV_TOKEN
from shoal.runtime.trainer import ENV_LAUNCHER_ID
from shoal.runtime.worker import EXIT_PREEMPTED

__all__ = ["run_joining_script"]

_STATUS_SECONDS = 1.0
"""How often the launcher asks the coordinator how the job goes."""
_FAILED_JOB_GRACE_SECONDS = 10.0
"""After the job failed, its workers hear of it with their next heartbeat and leave: one still
there after this long never will."""
_TERMINATE_GRACE_SECONDS = 30.0
"""After SIGTERM, how long the workers may take to leave before SIGKILL (torchrun's)."""


def run_joining_script(config: RunConfig) -> int:
    url = coordinator_url(config.coordinator)
    # Launchers of one job run one script; where it lies may differ from machine to machine.
    try:
        refusal = admission_refusal(url, config.token, config.coordinator,
                                    {"shoal run SCRIPT": os.path.basename(config.script)})
    except KeyboardInterrupt:  # no worker started yet: nothing to stop
        print("shoal run: interrupted (Ctrl-C) while asking the coordinator to admit this node",
              file=sys.stderr)
        return 1
    if refusal is not None:
        print(f"shoal run: error: {refusal}", file=sys.stderr)
        return 2
    return _Node(config, url).run()


class _Node:
    """This node's workers, as members of the coordinator's job."""

    def __init__(self, config: RunConfig, url: str):
        self.config, self.url = config, url
        self.host = socket.gethostname()
        self.losses: list[str] = []
        """Local workers that failed while the job went on: what the job survived."""
        self.ids: dict[int, int] = {}
        """Local worker -> its id in the job (known once it joined)."""
        self.status: dict = {}
        """The coordinator's last ``GET /status``."""
        self.stopped_here: dict[int, str] = {}
        """Local workers this launcher stopped after the job ended, and why."""
        self.restarts = collections.Counter()
        self.joined = False
        """Has any local worker ever joined the job?"""
        self.wake = threading.Event()
        self.reporter = CoordinatorClient(url, config.token, retry_seconds=2.0)  # on_exit's thread
        env = {**os.environ, ENV_COORDINATOR: url, ENV_TOKEN: config.token,
               ENV_LAUNCHER_ID: f"{self.host}/{os.getpid()}", ENV_LAUNCHER_PID: str(os.getpid()),
               "LOCAL_WORLD_SIZE": str(config.nproc_per_node)}
        if config.nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = "1"  # as torchrun: N processes must not each take every core
        self.group = WorkerGroup([sys.executable, "-u", "-m", "shoal.launch.script_runner",
                                  config.script, *config.script_args],
                                 env=env, on_exit=self._on_exit, echo=lambda line: print(line, flush=True))
        self.stop: StopRequest | None = None

    def run(self) -> int:
        watcher = CoordinatorClient(self.url, self.config.token, retry_seconds=0.0)
        try:
            with StopRequest(self.group) as self.stop:
                for local_rank in range(self.config.nproc_per_node):
                    self._spawn(local_rank)
                self._watch(watcher)
                if self.stop.how:
                    self._leave()
                self.group.stop_all()
                if not self.stop.how:  # a signal from here on changes nothing: the workers are done
                    codes = [worker.returncode for worker in self.group.workers.values()]
                    status = final_status(self.url, self.config.token, codes)
        finally:
            watcher.close()
            self.reporter.close()
        if self.stop.how:
            print(f"shoal run: {self.stop.how}; the job goes on without this node's workers",
                  file=sys.stderr)
            return EXIT_PREEMPTED if self.stop.how == SIGTERM_STOP else 1
        return self._verdict(status)

    def _spawn(self, local_rank: int) -> None:
        self.group.spawn(local_rank, {"LOCAL_RANK": str(local_rank)})

    def _watch(self, watcher: CoordinatorClient) -> None:
        """Until this node's workers are done (or it is told to stop): follow the job, and once
        it ended stop a local worker that will never hear so."""
        ended_at = None
        while self.group.running() and not self.stop.how:
            try:
                self.status = watcher.get("/status")
            except (CoordinatorUnreachable, PermissionError, httpx.HTTPError):
                pass  # restarting: the workers carry on meanwhile, and so do we
            if self.status.get("status") in ("completed", "failed"):
                ended_at = ended_at or time.monotonic()
                # After a failure the workers hear of it and leave: a heartbeat timeout first.
                if self.status["status"] == "completed" or time.monotonic() - ended_at > _FAILED_JOB_GRACE_SECONDS:
                    self._stop_unfinished()
            self.wake.wait(_STATUS_SECONDS)
            self.wake.clear()

    def _stop_unfinished(self) -> None:
        """The job ended: a local worker the coordinator declared dead (evicted: hung, or cut
        off) or never heard from will never hear so. One that finished, or is still a live
        member, is left to end by itself (it may be at the script's own work after
        ``shoal.train`` returned)."""
        workers = self.status.get("workers", {})
        for worker in self.group.running():
            known = workers.get(str(self._id_of(worker)))
            if known is not None and (known["alive"] or known["finished"]):
                continue
            self.stopped_here[worker.worker_id] = (
                "had not joined when the job ended; stopped here" if known is None else
                "evicted by the coordinator (hung or cut off), then stopped here")
            self.group.kill(worker.worker_id)

    def _id_of(self, worker: WorkerProcess) -> int | None:
        """The job's id for a local worker, from the coordinator's view of this host's pids."""
        if worker.worker_id not in self.ids:
            for worker_id, known in self.status.get("workers", {}).items():
                if known["host"] == self.host and known["pid"] == worker.process.pid:
                    self.ids[worker.worker_id] = int(worker_id)
                    self.joined = True
        return self.ids.get(worker.worker_id)

    def _leave(self) -> None:
        """Told to stop: SIGTERM to the workers (a ``shoal.train`` script with checkpoints
        leaves at a step boundary, one without at once), each exit reported as it comes so
        that the others go on at once; SIGKILL after torchrun's grace."""
        self.group.signal_all(signal.SIGTERM)
        self.group.signal_all(signal.SIGCONT)  # a stopped (hung) worker must see it too
        self.group.wait_all(_TERMINATE_GRACE_SECONDS)

    def _on_exit(self, local_rank: int, returncode: int, when: float) -> None:
        """Runs as each worker ends (one at a time: under the group's lock)."""
        if self.group.stopping:
            return
        process = self.group.workers[local_rank].process
        cause = self.stopped_here.get(local_rank) or (describe_exit(returncode) if returncode else "exited")
        try:
            reply = self.reporter.post("/report", {"kind": "exit", "host": self.host, "pid": process.pid,
                                                   "detail": cause})
            if reply.get("worker_id") is not None:
                self.ids[local_rank] = reply["worker_id"]
                self.joined = True
        except (CoordinatorUnreachable, PermissionError, httpx.HTTPError) as error:
            # the coordinator also notices the missing heartbeats
            print(f"shoal run: could not report the exit of local worker {local_rank}: {error}",
                  file=sys.stderr, flush=True)
        if returncode != 0:
            self._lost(local_rank, cause)
        self.wake.set()

    def _lost(self, local_rank: int, cause: str) -> None:
        worker_id = self.ids.get(local_rank)
        if worker_id is not None:
            self.losses.append(f"worker {worker_id} (local rank {local_rank}) {cause}")
        else:
            joining = "" if local_rank in self.stopped_here else " before it joined the job"
            self.losses.append(f"local worker {local_rank} {cause}{joining}")
        if (self.stop.how or local_rank in self.stopped_here
                or self.restarts[local_rank] >= self.config.max_restarts or not self._job_goes_on()):
            return
        self.restarts[local_rank] += 1
        print(f"shoal run: starting local worker {local_rank} again (restart {self.restarts[local_rank]} "
              f"of {self.config.max_restarts}): it rejoins the job", file=sys.stderr, flush=True)
        self.ids.pop(local_rank, None)
        self._spawn(local_rank)

    def _job_goes_on(self) -> bool:
        """Asked afresh: a worker that left because the job ended must not be started again."""
        try:
            self.status = self.reporter.get("/status")
        except (CoordinatorUnreachable, PermissionError, httpx.HTTPError):
            pass  # restarting: the last status seen stands
        return self.status.get("status") not in ("completed", "failed")

    def _verdict(self, status: dict) -> int:
        if status.get("rejected"):  # shoal.train refused its arguments in every worker
            print(f"shoal run: error: {status['reason']}", file=sys.stderr)
            return 2
        if status["status"] == "completed":
            for loss in self.losses:
                print(f"shoal run: survived: {loss}", file=sys.stderr)
            return 0
        if status["status"] == "failed":
            print(f"shoal run: failed: the job failed: {status['reason']}".rstrip(": "), file=sys.stderr)
            return 1
        lost = "; ".join(self.losses) or "they exited"
        hint = "" if self.joined else (": none joined it; a script run with --coordinator meets the "
                                       "others through shoal.train, never torchrun's RANK/MASTER_ADDR")
        print(f"shoal run: failed: this node's workers are gone ({lost}); the job goes on without "
              f"them{hint}", file=sys.stderr)
        return 1
