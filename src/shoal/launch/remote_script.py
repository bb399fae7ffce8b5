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
from shoal.launch.joining import admission_refusal, final_status, launcher_id
from shoal.launch.script_job import (
    EVICTED_THEN_STOPPED,
    NOT_JOINED_WHEN_IT_ENDED,
    script_workers,
    stop_unfinished,
    torchrun_env,
)
from shoal.launch.workers import (
    SIGTERM_STOP,
    TERMINATE_GRACE_SECONDS,
    StopRequest,
    WorkerProcess,
    describe_exit,
    fence_silenced,
)
from shoal.runtime.context import ENV_COORDINATOR, ENV_LAUNCHER_ID, ENV_TOKEN, ENV_WORKER_ID
from shoal.runtime.worker import EXIT_PREEMPTED

__all__ = ["run_joining_script"]

_STATUS_SECONDS = float(os.environ.get("SHOAL_RUN_STATUS_SECONDS", "1.0"))
"""How often the launcher asks the coordinator how the job goes. (The environment variable
is for a test that needs a worker to join and finish between two looks.)"""
_POLL_SECONDS = 0.1
"""How often it looks for a signal, and for its workers' exits."""
_FAILED_JOB_GRACE_SECONDS = 10.0
"""After the job failed, its workers hear of it with their next heartbeat and leave: one still
there after this long never will."""


_NOT_INHERITED = frozenset(torchrun_env(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                                        nnodes=1, master_addr="", master_port=0, run_id="")) | {ENV_WORKER_ID}
"""Set by an outer launcher (a PyTorchJob, a SLURM wrapper, torchrun): a plain script would
meet there and hang instead of failing at once; a worker id would be taken as this one's."""


def run_joining_script(config: RunConfig) -> int:
    url, launcher = coordinator_url(config.coordinator), launcher_id()
    # Launchers of one job run one script; where it lies may differ from machine to machine.
    try:
        refusal = admission_refusal(url, config.token, config.coordinator,
                                    {"shoal run SCRIPT": _script_key(config)}, launcher)
    except KeyboardInterrupt:  # no worker started yet: nothing to stop
        print("shoal run: interrupted (Ctrl-C) while asking the coordinator to admit this node",
              file=sys.stderr)
        return 1
    if refusal is not None:
        print(f"shoal run: error: {refusal}", file=sys.stderr)
        return 2
    return _Node(config, url, launcher).run()


def _script_key(config: RunConfig) -> str:
    """What the nodes of one job must all run: the script's file name (where it lies may
    differ from machine to machine), or the module, or the program."""
    if config.module:
        return f"-m {config.script}"
    name = os.path.basename(config.script)
    return f"--no-python {name}" if config.no_python else name


class _Node:
    """This node's workers, as members of the coordinator's job."""

    def __init__(self, config: RunConfig, url: str, launcher: str):
        self.config, self.url = config, url
        self.host, self.launcher = socket.gethostname(), launcher
        self.losses: list[str] = []
        """Local workers that failed while the job went on: what the job survived."""
        self.late: list[str] = []
        """Local workers stopped because the job ended before they joined (a node started late)."""
        self.ids: dict[int, int] = {}
        """Local worker -> its id in the job (known once it joined)."""
        self.status: dict = {}
        """The coordinator's last ``GET /status``."""
        self.stopped_here: dict[int, str] = {}
        """Local workers this launcher stopped after the job ended, and why."""
        self.restarts = collections.Counter()
        self.done_before: set[int] = set()
        """Local workers that died after they finished their part: not restarted, and their
        exit is not a failure of this node (the job ends without them)."""
        self.joined = False
        """Has any local worker ever joined the job?"""
        self.wake = threading.Event()
        # on_exit's thread, which holds the group's lock: short tries
        self.reporter = CoordinatorClient(url, config.token, retry_seconds=2.0, timeout=5.0)
        inherited = {name: value for name, value in os.environ.items() if name not in _NOT_INHERITED}
        self.group = script_workers(config, {**inherited, ENV_COORDINATOR: url, ENV_TOKEN: config.token,
                                             ENV_LAUNCHER_ID: self.launcher,
                                             "LOCAL_WORLD_SIZE": str(config.nproc_per_node)}, self._on_exit)
        self.stop: StopRequest | None = None

    def run(self) -> int:
        watcher = CoordinatorClient(self.url, self.config.token, retry_seconds=0.0)
        try:
            with StopRequest(self.group) as self.stop:
                for local_rank in range(self.config.nproc_per_node):
                    self._spawn(local_rank)
                self._watch(watcher)
                stopped = self.stop.how  # one that comes later changes nothing: the workers are done
                if stopped:
                    self._leave()
                self.group.stop_all()
                if not stopped:
                    # Exit codes tell an end the coordinator lost only of workers that were in it.
                    codes = [0 if local in self.done_before else worker.returncode
                             for local, worker in self.group.workers.items()] if self.joined else []
                    status = final_status(self.url, self.config.token, codes)
        finally:
            watcher.close()
            self.reporter.close()
        if stopped:
            print(f"shoal run: {stopped}; the job goes on without this node's workers", file=sys.stderr)
            return EXIT_PREEMPTED if stopped == SIGTERM_STOP else 1
        return self._verdict(status)

    def _spawn(self, local_rank: int) -> None:
        """A restarted worker joins under its old id: the coordinator waits for that one."""
        rejoining = {ENV_WORKER_ID: str(self.ids[local_rank])} if local_rank in self.ids else {}
        self.group.spawn(local_rank, {"LOCAL_RANK": str(local_rank), **rejoining})

    def _watch(self, watcher: CoordinatorClient) -> None:
        """Until this node's workers are done (or it is told to stop): follow the job, and once
        it ended stop a local worker that will never hear so."""
        ended_at, next_status = None, 0.0
        while (self.group.running() or self._fenced_while_running()) and not self.stop.how:
            self.wake.wait(_POLL_SECONDS)  # short: a signal is only noted, and read here
            self.wake.clear()
            if time.monotonic() < next_status:
                continue
            next_status = time.monotonic() + _STATUS_SECONDS
            try:
                self.status = watcher.get("/status")
            except (CoordinatorUnreachable, PermissionError, httpx.HTTPError):
                pass  # restarting: the workers carry on meanwhile, and so do we
            for worker in self.group.running():
                self._id_of(worker)  # known before it exits, should the coordinator be away then
            if self.status.get("status") not in ("completed", "failed"):
                # hung: killed, and treated as an evicted worker that woke (restarts included)
                fence_silenced(self.group, self.status.get("workers", {}), self.launcher, lambda *_: None)
                continue
            ended_at = ended_at or time.monotonic()
            # After a failure the workers hear of it and leave: a grace first.
            if self.status["status"] == "completed":
                stop_unfinished(self.group, self.status.get("workers", {}), self._id_of, self.stopped_here)
            elif time.monotonic() - ended_at > _FAILED_JOB_GRACE_SECONDS:
                self._stop_all_left(f"still running {_FAILED_JOB_GRACE_SECONDS:g} s after the job failed; stopped here")

    def _fenced_while_running(self) -> bool:
        """A local worker was killed as hung, not started again, and the job goes on: stay for
        its end, as when the frozen worker stayed, to report it survived (exit 0)."""
        return (any(worker.fenced for worker in self.group.workers.values())
                and self.status.get("status") not in ("completed", "failed"))

    def _stop_all_left(self, why: str) -> None:
        """The job failed: a worker still here (stuck, or deaf to the coordinator) never leaves."""
        for worker in self.group.running():
            self.stopped_here[worker.worker_id] = why
            self.group.kill(worker.worker_id)

    def _id_of(self, worker: WorkerProcess) -> int | None:
        """The job's id for a local worker, from the coordinator's view of this launcher's
        workers (their launcher id and pid)."""
        for worker_id, known in self.status.get("workers", {}).items():
            if known.get("launcher") == self.launcher and known["pid"] == worker.process.pid and known["alive"]:
                self.ids[worker.worker_id] = int(worker_id)
                self.joined = True
        return self.ids.get(worker.worker_id)

    def _leave(self) -> None:
        """Told to stop: SIGTERM to the workers (a ``shoal.train`` script with checkpoints
        leaves at a step boundary, one without at once), SIGKILL after torchrun's grace;
        each exit reported as it comes, so that the others go on at once."""
        self.group.signal_all(signal.SIGTERM)
        self.group.signal_all(signal.SIGCONT)  # a stopped (hung) worker must see it too
        if not self.group.wait_handled(TERMINATE_GRACE_SECONDS):
            self.group.signal_all(signal.SIGKILL)
            self.group.wait_handled(TERMINATE_GRACE_SECONDS)

    def _on_exit(self, local_rank: int, returncode: int, when: float) -> None:
        """Runs as each worker ends (one at a time, under the group's lock): tell the
        coordinator, and start the worker again if it failed and restarts are left."""
        if self.group.stopping:
            return
        worker = self.group.workers[local_rank]
        process = worker.process
        cause = self.stopped_here.get(local_rank) or (EVICTED_THEN_STOPPED if worker.fenced else
                                                      describe_exit(returncode) if returncode else "exited")
        restart = False
        if returncode != 0:
            goes_on = self._job_goes_on()  # one fresh look: has the job ended, had the worker finished?
            # Its id from that look, if no earlier one had it (a worker can join and finish its
            # part between two of them); its record stays alive until its exit is reported.
            self._id_of(worker)
            if self._finished(local_rank):  # a restart would have nothing to do
                self.done_before.add(local_rank)
                cause += " after it finished its part"
            else:
                restart = goes_on and self._may_restart(local_rank)
        joined, reported = self._report_exit(local_rank, process.pid, cause, returncode, restart)
        if returncode != 0:
            self._note_loss(local_rank, cause, joined)
        if restart:
            if not reported:  # the coordinator may still hold it for alive: a newcomer, not it
                self.ids.pop(local_rank, None)
            self.restarts[local_rank] += 1
            print(f"shoal run: starting local worker {local_rank} again (restart {self.restarts[local_rank]} "
                  f"of {self.config.max_restarts}): it rejoins the job", file=sys.stderr, flush=True)
            self._spawn(local_rank)
        self.wake.set()

    def _may_restart(self, local_rank: int) -> bool:
        return (not self.stop.how and local_rank not in self.stopped_here
                and self.restarts[local_rank] < self.config.max_restarts)

    def _finished(self, local_rank: int) -> bool:
        """Had the worker finished its part (killed while the others finished theirs), as
        the last status seen says? Then the job ends without it."""
        known = self.status.get("workers", {}).get(str(self.ids.get(local_rank)))
        return bool(known and known.get("finished"))

    def _report_exit(self, local_rank: int, pid: int, cause: str, returncode: int,
                     restart: bool) -> tuple[bool, bool]:
        """Tell the coordinator (a restart: it waits for the worker rather than fail the job
        below its --min-workers). Returns whether the process had joined the job, and whether
        the coordinator heard of its exit."""
        if returncode == 0 and not self._job_goes_on():
            return True, True  # it finished the job: nothing to tell (a coordinator past --linger is gone)
        try:
            reply = self.reporter.post("/report", {"kind": "exit", "host": self.host, "launcher": self.launcher,
                                                   "pid": pid, "detail": cause, "restarting": restart})
            if reply.get("worker_id") is not None:
                self.ids[local_rank] = reply["worker_id"]
                self.joined = True
                return True, True
            if local_rank in self.ids and not restart:
                # A restart that died before joining, with none left: no longer waited for.
                self.reporter.post("/report", {"kind": "exit", "worker_id": self.ids[local_rank],
                                               "detail": cause, "joined": True})
        except (CoordinatorUnreachable, PermissionError, httpx.HTTPError) as error:
            if returncode != 0:  # the coordinator also notices the missing heartbeats
                print(f"shoal run: could not report the exit of local worker {local_rank}: {error}",
                      file=sys.stderr, flush=True)
            return False, False
        return False, True

    def _note_loss(self, local_rank: int, cause: str, joined: bool) -> None:
        worker_id = self.ids.get(local_rank)
        if worker_id is not None and joined:
            self.losses.append(f"worker {worker_id} (local rank {local_rank}) {cause}")
        elif self.stopped_here.get(local_rank) == NOT_JOINED_WHEN_IT_ENDED:  # nothing the job had to survive
            self.late.append(f"local worker {local_rank} {cause}")
        else:
            joining = "" if local_rank in self.stopped_here else " before it joined the job"
            self.losses.append(f"local worker {local_rank} {cause}{joining}")

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
            for late in self.late:
                print(f"shoal run: {late}", file=sys.stderr)
            return 0
        if status["status"] == "failed":
            failure = f"the job failed: {status['reason']}".rstrip(": ")
        else:
            lost = "; ".join(self.losses + self.late) or "they exited"
            failure = f"this node's workers are gone ({lost}); the job goes on without them"
        hint = "" if self.joined else ("; none of them joined it: a script run with --coordinator "
                                       "meets the others through shoal.train, not torchrun's RANK/MASTER_ADDR")
        print(f"shoal run: failed: {failure}{hint}", file=sys.stderr)
        return 1
