"""``shoal run``: a user script on N processes per node with torchrun's environment.

A plain torchrun/DDP script sees RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ... as under
torchrun; its ``init_process_group("env://")`` rendezvous on the TCPStore the coordinator
hosts (``TORCHELASTIC_USE_AGENT_STORE``, as torchrun's agent does). Such a script is
all-or-nothing: when one process fails, the others are stopped, on every node, and the
command fails, naming the worker; with ``--max-restarts N`` every node's workers are started
again instead, up to N times, as torchrun does (the script resumes from its own checkpoint,
and meets under a new ``TORCHELASTIC_RESTART_COUNT``). A script that uses ``shoal.train``
joins the coordinator instead and survives failures down to ``--min-workers``; with
``--max-restarts`` its failed worker alone starts again and rejoins. With ``--nnodes``, node 0's
launcher hosts the coordinator and the store, and the nodes meet as in
``shoal.launch.rendezvous``; with ``--coordinator`` the nodes join a standalone one
(``shoal.launch.remote_script``).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable

import httpx
import torch.distributed as dist

from shoal.config import ENV_WORKER_PID, ConfigError, RunConfig, check_bindable
from shoal.coordinator import (
    Coordinator,
    Membership,
    describe_change,
    describe_timeout_change,
    for_slow_collective,
)
from shoal.coordinator.client import (
    UNANSWERED_TRY_SECONDS,
    CoordinatorClient,
    CoordinatorUnreachable,
)
from shoal.launch.joining import launcher_id
from shoal.launch.quorum import NodeQuorum
from shoal.launch.rendezvous import NodeGone, NodeRendezvous, first_line
from shoal.launch.script_runner import ENV_LAUNCHER_PID, MODULE, PROGRAM
from shoal.launch.workers import (
    SIGTERM_STOP,
    TERMINATE_GRACE_SECONDS,
    StopRequest,
    WorkerGroup,
    WorkerProcess,
    describe_exit,
    fence_silenced,
)
from shoal.runtime.context import (
    ENV_COORDINATOR,
    ENV_LAUNCHER_ID,
    ENV_SUCCESSOR,
    ENV_TOKEN,
    ENV_WORKER_ID,
    SILENT_NODE_HEARTBEATS,
)
from shoal.runtime.worker import EXIT_PREEMPTED

__all__ = ["EVICTED_THEN_STOPPED", "NOT_JOINED_WHEN_IT_ENDED", "run_script", "script_workers", "stop_unfinished", "torchrun_env"]

_POLL_SECONDS = 0.25
"""How often a node looks for another node's failure, and node 0 for the others' ends."""
_STATUS_SECONDS = 1.0
"""How often a node asks the coordinator how the job goes, while its workers run."""
_EXIT_BARRIER_SECONDS = 300.0
"""How long node 0 keeps the store up for nodes that have not read the job's outcome
(torchrun's exit barrier)."""
_STOPPED_BARRIER_SECONDS = 5.0
"""Node 0 told to stop waits this long for the others to read why."""
_DEAD_NODE_SECONDS = 5.0
"""... and for a node whose workers all died: its launcher, if it lives, is polling for the end."""
_SUCCESSOR_GRACE_SECONDS = 3 * _STATUS_SECONDS
"""How long node 1, having taken the job over, keeps its coordinator up after the job ended:
the other nodes' launchers ask how it went every second."""
_RESTART_GRACE_SECONDS = 5.0
"""Before a restart, how long a node's workers of the failed attempt get to leave after
SIGTERM (then SIGKILL): those still there are stuck in a collective with the failed one."""


def torchrun_env(*, rank: int, local_rank: int, world_size: int, local_world_size: int,
                 node_rank: int, nnodes: int, master_addr: str, master_port: int,
                 run_id: str, restart_count: int = 0, max_restarts: int = 0) -> dict[str, str]:
    """The variables torchrun sets for one worker."""
    values = {
        "RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": world_size,
        "LOCAL_WORLD_SIZE": local_world_size, "GROUP_RANK": node_rank, "GROUP_WORLD_SIZE": nnodes,
        "ROLE_RANK": rank, "ROLE_WORLD_SIZE": world_size, "ROLE_NAME": "default",
        "MASTER_ADDR": master_addr, "MASTER_PORT": master_port,
        "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_RESTART_COUNT": restart_count,
        "TORCHELASTIC_MAX_RESTARTS": max_restarts, "TORCHELASTIC_USE_AGENT_STORE": True,
    }
    return {key: str(value) for key, value in values.items()}


class _LocalJob:
    """The job as node 0 sees it: its membership is in this process."""

    lost = None  # node 0 is never lost to itself
    successor_has_the_job = False

    def __init__(self, membership: Membership):
        self._membership = membership
        self.fenced: str | None = None
        """Why this side of a partition failed the job (``launch/quorum.py``)."""

    def quorum_patience(self, config: RunConfig) -> float:
        """How long node 0 holds a job for a quorum: as long as it takes the nodes it lost
        for gone (``_mind_silent_nodes``)."""
        return _silence(config)

    def fence(self, reason: str) -> None:
        self.fenced = reason
        self._membership.fail(reason)

    def status(self) -> dict:
        return self._membership.snapshot()

    def report_exit(self, worker_id: int, cause: str, when: float, restarting: bool = False) -> None:
        self._membership.report_exit_by_id(worker_id, cause, when, restarting=restarting)

    def changes(self) -> list[dict]:
        return self._membership.membership_changes()

    def timeout_changes(self) -> list[dict]:
        return self._membership.timeout_changes()


class _RemoteJob:
    """The job as the other nodes see it: node 0's coordinator, over HTTP; once node 0 is
    lost, its successor's, which node 1 hosts (``launch/succession.py``)."""

    def __init__(self, url: str, token: str, patience: float):
        self._url, self._token = url, token
        self._answer_seconds = patience
        """How long one request waits (node 0 cut off leaves it unanswered, not refused)."""
        self._hosted: Membership | None = None
        self.lost: str | None = None
        """Why node 0 is lost, once this node turned to its successor."""
        self._awaited_until: float | None = None
        """Until when a worker may take to reach the successor (None: one did)."""
        self._answered_at = 0.0
        self._patience = 0.0
        self.fenced: str | None = None
        """Why node 1's side of a partition failed the job (``launch/quorum.py``)."""
        self._counted_out: set[int] = set()
        """Node 0's workers this node 1 told its coordinator were lost with node 0."""

    def follow(self, url: str, lost: str, hosted: Membership | None, *, patience: float) -> None:
        """Ask the successor from now on (``hosted``: its membership, on node 1); a worker must
        reach it within ``patience`` seconds, or the job was a plain script's, lost with node 0
        (and it must not go silent that long while the job runs)."""
        self._url, self.lost, self._hosted = url, lost, hosted
        now = time.monotonic()
        self._patience, self._answered_at, self._awaited_until = patience, now, now + patience

    @property
    def successor_has_the_job(self) -> bool:
        """Node 0 is lost, and a worker came to its successor: the job goes on there."""
        return self.lost is not None and self._awaited_until is None

    def check_successor(self, status: dict, config: RunConfig) -> None:
        """Once the successor has the job: say so, and on node 1 count node 0's workers out
        (gone with their launcher, or cut off with it) without waiting out their heartbeat
        timeout. Raises :class:`NodeGone` if no worker came, or if the successor stopped
        answering while the job runs (node 1 lost too: nothing would tell this node the end)."""
        workers = status.get("workers", {})
        if self._awaited_until is not None:
            if not workers:
                if time.monotonic() > self._awaited_until:
                    raise NodeGone(self.lost)
                return
            self._awaited_until = None
            print(f"shoal run: {self.lost}; " + (f"node 1 took over the job's coordinator at {self._url}"
                  if self._hosted else f"following node 1's coordinator at {self._url}"),
                  file=sys.stderr, flush=True)
        elif (time.monotonic() - self._answered_at > max(self._patience, 2 * self._answer_seconds)
              and status.get("status") not in ("completed", "failed")):  # (not one slow answer)
            self.lost += "; then node 1's coordinator stopped answering too"
            raise NodeGone(self.lost)
        if self._hosted is not None:
            for rank in _node_ranks(0, config.nproc_per_node):
                known = workers.get(str(rank))
                if (known or {}).get("alive") or (known is None and rank not in self._counted_out):
                    # (one never heard of here: no first generation waits for it, once)
                    self._counted_out.add(rank)
                    self._hosted.report_exit_by_id(rank, "lost with node 0")

    def quorum_patience(self, config: RunConfig) -> float | None:
        """How long node 1, having taken the job over, holds it for a quorum: as long as the
        other nodes' workers could take to come (None: this node hosts no coordinator)."""
        return self._patience if self._hosted is not None else None

    def fence(self, reason: str) -> None:
        self.fenced = reason
        self._hosted.fail(reason)

    def status(self) -> dict:
        """``GET /status``, or ``{}`` when node 0 is gone (the exits then tell the outcome)."""
        status = self._ask(lambda client: client.get("/status")) or {}
        if status:
            self._answered_at = time.monotonic()
        return status

    def changes(self) -> list[dict]:
        # node 0, which holds the membership, tells them; after it, node 1
        return self._hosted.membership_changes() if self._hosted else []

    def timeout_changes(self) -> list[dict]:
        return self._hosted.timeout_changes() if self._hosted else []

    def report_exit(self, worker_id: int, cause: str, when: float, restarting: bool = False) -> None:
        # Workers' ids are their ranks, known here: a death before joining counts too.
        self._ask(lambda client: client.post("/report", {"kind": "exit", "worker_id": worker_id,
                                                         "detail": cause, "restarting": restarting}))

    def _ask(self, request) -> dict | None:
        client = CoordinatorClient(self._url, self._token, retry_seconds=2.0,  # one per thread
                                   timeout=self._answer_seconds)
        try:
            return request(client)
        except (CoordinatorUnreachable, PermissionError, httpx.HTTPError):
            return None  # node 0 gone, or restarting: its store tells the main loop
        finally:
            client.close()


def run_script(config: RunConfig) -> int:
    if config.coordinator is not None:
        from shoal.launch.remote_script import run_joining_script

        return run_joining_script(config)
    hosted = _host(config) if config.node_rank in (0, None) else None
    if hosted is None:  # another node hosts the job
        try:
            rendezvous = NodeRendezvous.join(config.master_addr, config.master_port, config.node_rank,
                                             config.nnodes, _shape(config), config.run_id,
                                             config.join_timeout, patience=_silence(config))
        except KeyboardInterrupt:  # no worker started yet: nothing to stop
            print("shoal run: interrupted (Ctrl-C) while joining node 0's job", file=sys.stderr)
            return 1
        config = dataclasses.replace(config, node_rank=rendezvous.node_rank)
        try:
            return _run_node(config, rendezvous, _RemoteJob(rendezvous.url, rendezvous.token, _silence(config)))
        finally:
            if rendezvous.standby is not None:
                rendezvous.standby.close()
    coordinator, membership = hosted
    try:
        rendezvous = NodeRendezvous.host(coordinator.store, config.nnodes, _shape(config),
                                         url=coordinator.url, token=coordinator.token,
                                         run_id=config.run_id or uuid.uuid4().hex[:12])
        if config.quorum == "majority" and config.nnodes > 1:
            membership.quorum = NodeQuorum(config.nnodes, config.nproc_per_node, host_node=0)
        return _run_node(dataclasses.replace(config, node_rank=0), rendezvous, _LocalJob(membership))
    finally:
        coordinator.stop()


def _shape(config: RunConfig) -> dict:
    """The flags every node must give as node 0 did: the job's size, and the membership
    rules node 0's coordinator applies (another node's would be ignored)."""
    return {"--nnodes": config.nnodes, "--nproc-per-node": config.nproc_per_node,
            "--min-workers": config.min_workers, "--heartbeat-timeout": config.heartbeat_timeout,
            "--max-restarts": config.max_restarts, "--quorum": config.quorum}


def _host(config: RunConfig) -> tuple[Coordinator, Membership] | None:
    """Start the job's coordinator and store at ``--master-addr:--master-port``, as node 0.

    Without ``--node-rank`` (torchrun's c10d way) the node that can listen there is node 0,
    and None here means this is another node: the address is not this machine's, or the
    port is taken (by node 0's launcher on this machine, or it will say why it is not)."""
    if config.node_rank is None:
        try:
            check_bindable("--master-addr", config.master_addr)
        except ConfigError:
            return None
    membership = _membership(config)
    # With several nodes the coordinator listens on every interface, as the store does: the
    # name the nodes were given may resolve here to another address than there (127.0.1.1).
    coordinator = Coordinator(membership, host=config.master_addr, store_port=config.master_port,
                              bind_all=config.nnodes > 1)
    try:
        coordinator.start()
    except dist.DistNetworkError as error:
        coordinator.stop()
        if config.node_rank is None:
            return None
        raise ConfigError("--master-port", f"cannot listen on {config.master_addr}:"
                          f"{config.master_port}: {first_line(error)}") from None
    return coordinator, membership


def _membership(config: RunConfig) -> Membership:
    """The rules node 0's coordinator applies (and node 1's, if it takes over)."""
    return Membership(expected_workers=config.world_size, min_workers=config.min_workers,
                      heartbeat_timeout=config.heartbeat_timeout, restarts=config.max_restarts > 0)


def _run_node(config: RunConfig, rendezvous: NodeRendezvous, job: _LocalJob | _RemoteJob) -> int:
    """Start this node's workers, wait for the job's end here or elsewhere, say how it went."""
    where = f", node {config.node_rank}" if config.nnodes > 1 else ""
    survived: list[str] = []  # an elastic job's losses on this node
    wake = threading.Event()
    stopped_here: dict[int, str] = {}  # workers this launcher stopped (hung, or left when the job ended): why
    restarts = collections.Counter()  # an elastic script's, by worker

    def on_exit(worker_id: int, returncode: int, when: float) -> None:
        if group.stopping:  # exits we cause while shutting down are not failures
            return
        cause = stopped_here.get(worker_id) or (describe_exit(returncode) if returncode else "exited")
        restart = False
        try:
            if returncode != 0:
                failure = f"worker {worker_id} (rank {worker_id}{where}) {cause}"
                status = job.status()
                known = status.get("workers", {}).get(str(worker_id))
                if worker_id in stopped_here or known is not None or status.get("workers"):
                    # An elastic script's worker: started again alone, it rejoins as itself.
                    restart = (restarts[worker_id] < config.max_restarts and not (known or {}).get("finished")
                               and status.get("status") not in ("completed", "failed"))
                    survived.append(failure)
                elif rendezvous.report_failure(when, failure, restartable=True):
                    # A plain torchrun script cannot survive a lost rank, on any node: every
                    # worker starts again. (Not told to the coordinator: an elastic script whose
                    # workers had not joined yet would have it wait for one worker fewer.)
                    return
            job.report_exit(worker_id, cause, when, restarting=restart)
            if restart:
                restarts[worker_id] += 1
                stopped_here.pop(worker_id, None)
                print(f"shoal run: starting worker {worker_id} (rank {worker_id}{where}) again (restart "
                      f"{restarts[worker_id]} of {config.max_restarts}): it rejoins the job",
                      file=sys.stderr, flush=True)
                _spawn_worker(config, rendezvous, group, worker_id - config.node_rank * config.nproc_per_node)
        except NodeGone:
            pass  # the main loop finds it out too, and says so
        finally:
            wake.set()

    launcher = launcher_id()
    group = script_workers(config, {**os.environ, ENV_COORDINATOR: rendezvous.url, ENV_TOKEN: rendezvous.token,
                                    ENV_LAUNCHER_ID: launcher}, on_exit)
    others: list[str] = []  # why this node stopped, besides its workers' exits
    status: dict = {}
    rendezvous.max_restarts = config.max_restarts
    with StopRequest(group) as stop:
        try:
            if _all_nodes_in(config, rendezvous, stop) and not stop.how:
                status = _run_attempts(config, rendezvous, job, group, launcher, wake, stop, stopped_here)
        except NodeGone as error:
            others.append(str(error))
        finally:
            _tell_stop(config, rendezvous, job, stop, status, others)  # before the workers' grace
            group.stop_all(grace=TERMINATE_GRACE_SECONDS if stop.how else 5.0)
            _tell_stop(config, rendezvous, job, stop, status, others)  # one that came during it
        status = job.status() or status  # node 0 may be gone: the last status seen then
        if config.node_rank == 0 and config.nnodes > 1:
            rendezvous.announce_done()
            # Told to stop: a few seconds for the others to read why, not the whole wait.
            others += _wait_for_other_nodes(rendezvous, job, config,
                                            _STOPPED_BARRIER_SECONDS if stop.how else _EXIT_BARRIER_SECONDS)
        elif job.successor_has_the_job and rendezvous.standby is not None:
            _keep_up_for_the_others(rendezvous.standby.coordinator.membership, stop)
        elif config.node_rank > 0 and not stop.how:
            _await_node_0(rendezvous, stop)
        _tell_stop(config, rendezvous, job, stop, status, others)  # one that came while it waited
        if job.lost and job.lost not in others:
            others.append(job.lost)  # a loss the job went on through
        if job.fenced:
            others.insert(0, job.fenced)
        elif job.lost and status.get("status") == "failed" and status.get("reason"):
            others.insert(0, status["reason"])  # why node 1's side failed (its quorum, say)
        failures = _failures(rendezvous, others) + [f for f in survived if f not in others]
        if config.node_rank > 0:
            try:
                rendezvous.finish()
            except NodeGone:
                pass  # node 0 stopped first: nothing waits for us
    if stop.how == SIGTERM_STOP:
        print(f"shoal run: {others[0] if stop.told else stop.how}", file=sys.stderr)
        return EXIT_PREEMPTED
    return _verdict(status, failures, rendezvous.attempt)


def script_workers(config: RunConfig, env: dict[str, str],
                   on_exit: Callable[[int, int, float], None]) -> WorkerGroup:
    """The worker group of a ``shoal run`` node: each worker runs the script as `python -u
    SCRIPT` would, through a runner that survives torch's teardown, with ``env`` and what
    every script worker gets (its launcher's pid, to die with it; one thread each when
    several share the node)."""
    # SHOAL_WORKER_PID is the runner's to set (--no-python): one inherited from outside would misname them
    env = {**{name: value for name, value in env.items() if name != ENV_WORKER_PID},
           ENV_LAUNCHER_PID: str(os.getpid())}
    if config.nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"  # as torchrun: N processes must not each take every core
    how = [MODULE] if config.module else [PROGRAM] if config.no_python else []
    return WorkerGroup([sys.executable, "-u", "-m", "shoal.launch.script_runner", *how, config.script,
                        *config.script_args], env=env, on_exit=on_exit,
                       echo=lambda line: print(line, flush=True))


def _all_nodes_in(config: RunConfig, rendezvous: NodeRendezvous, stop: StopRequest) -> bool:
    """No worker starts before every node claimed its rank: node 0 waits for them (and fails
    the job if they do not come), the others for node 0's word."""
    if config.nnodes == 1:
        return True
    if config.node_rank > 0:
        return rendezvous.wait_started(stop.requested)
    not_started = rendezvous.wait_for_nodes(config.join_timeout, _silence(config), stop.requested)
    if not_started is not None:
        rendezvous.report_failure(time.time(), not_started)
    return not_started is None


def _silence(config: RunConfig) -> float:
    """How long a node's launcher may be silent before node 0 takes it for gone, and node 0's
    store before the others do."""
    return SILENT_NODE_HEARTBEATS * config.heartbeat_timeout  # (generous: a plain job fails for it)


def _run_attempts(config: RunConfig, rendezvous: NodeRendezvous, job: _LocalJob | _RemoteJob,
                  group: WorkerGroup, launcher: str, wake: threading.Event, stop: StopRequest,
                  stopped_here: dict[int, str]) -> dict:
    """Run this node's workers until the job ends here; returns its last status. Under
    ``--max-restarts`` a plain script's failure on any node starts every node's workers again
    (torchrun's restart), once every node has stopped its own; and a node whose workers all
    succeeded waits for the others', since a failure there still restarts its workers too.
    (An elastic script's job goes on through a failure: ``on_exit`` starts that worker alone
    again.)"""
    def waiting() -> bool:
        if config.node_rank == 0 and config.nnodes > 1:
            _mind_silent_nodes(rendezvous, job, {}, config)  # a lost node fails the job
        return not stop.how

    while True:
        _spawn_workers(config, rendezvous, group)
        status = _watch(config, rendezvous, job, group, launcher, wake, stop, stopped_here)
        if rendezvous.host_gone:  # node 0 is lost, and node 1 took the job over
            return status
        if stop.how or rendezvous.failed() or rendezvous.attempt >= config.max_restarts:
            return status  # told to stop, failed, or no restart left
        if status.get("workers") and not rendezvous.restart_requested():
            return status  # an elastic job (a restart asked for before anyone joined binds every node)
        if not rendezvous.restart_requested() and rendezvous.succeeded(waiting):
            return status
        if rendezvous.failed() or not rendezvous.restart_requested():
            return status  # the job failed, or this node was told to stop, while it waited
        attempt = rendezvous.attempt + 1
        first = (rendezvous.failures(rendezvous.attempt) or ["a worker failed"])[0]
        print(f"shoal run: {first}; starting every worker again (restart {attempt} of "
              f"{config.max_restarts})", file=sys.stderr, flush=True)
        group.stop_all(grace=_RESTART_GRACE_SECONDS)
        if group.running():  # a process SIGKILL did not end (stuck in the kernel)
            rendezvous.report_failure(time.time(), f"node {config.node_rank}'s workers did not stop "
                                      "for the restart")
            return status
        group.stopping = False  # the next attempt's exits count again
        if not rendezvous.stopped_for_restart(waiting):
            return status


def _spawn_workers(config: RunConfig, rendezvous: NodeRendezvous, group: WorkerGroup) -> None:
    for local_rank in range(config.nproc_per_node):
        _spawn_worker(config, rendezvous, group, local_rank)


def _spawn_worker(config: RunConfig, rendezvous: NodeRendezvous, group: WorkerGroup, local_rank: int) -> None:
    """Its rank is its id in the job: an elastic script's worker started again rejoins as itself."""
    rank = config.node_rank * config.nproc_per_node + local_rank
    env = torchrun_env(rank=rank, local_rank=local_rank, world_size=config.world_size,
                       local_world_size=config.nproc_per_node, node_rank=config.node_rank,
                       nnodes=config.nnodes, master_addr=config.master_addr,
                       master_port=rendezvous.store_port, run_id=rendezvous.run_id,
                       restart_count=rendezvous.attempt, max_restarts=config.max_restarts)
    group.spawn(rank, {**env, ENV_WORKER_ID: str(rank), ENV_COORDINATOR: rendezvous.url,
                       ENV_SUCCESSOR: rendezvous.successor_url or ""})


def _watch(config: RunConfig, rendezvous: NodeRendezvous, job: _LocalJob | _RemoteJob,
           group: WorkerGroup, launcher: str, wake: threading.Event, stop: StopRequest,
           stopped_here: dict[int, str]) -> dict:
    """Until this node's workers are done: a plain script's failure anywhere ends it; an
    elastic job ends when the coordinator says so (this node stays while it goes on
    elsewhere, and then stops a local worker that never will: evicted, or never joined).
    Meanwhile a local worker declared dead for silence that still runs (hung) is stopped.
    Returns the job's last status."""
    status: dict = {}
    watch_store, node0_done = True, False
    next_status, ended_at = 0.0, None
    told, held_told = (0, 0), False
    while not stop.how:
        if watch_store:
            try:
                if rendezvous.failed() or rendezvous.restart_requested():
                    break
                node0_done = node0_done or (config.node_rank > 0 and rendezvous.node0_done())
            except NodeGone as error:
                if (rendezvous.successor_url and status.get("status") not in ("completed", "failed")
                        and not (node0_done and not status.get("workers"))):  # (a plain job's end)
                    _fail_over(config, rendezvous, job, str(error))  # an elastic job goes on
                    status = {}  # node 0's last word: from now on, only the successor's counts
                elif not node0_done:
                    raise
                watch_store = False  # node 0 finished and closed its store: nothing more to hear
        done_here = not group.running()
        if done_here or time.monotonic() >= next_status:
            status = job.status() or status
            next_status = time.monotonic() + _STATUS_SECONDS
            if job.lost:
                job.check_successor(status, config)
            told = _tell_slow_collectives(job, told)
            held_told = _mind_the_quorum(job, status, config, held_told)
            if status.get("status") in ("completed", "failed") and status.get("workers"):
                ended_at = ended_at or time.monotonic()
                # After a failure the workers hear of it and leave: a heartbeat timeout first.
                if status["status"] == "completed" or time.monotonic() - ended_at > config.heartbeat_timeout:
                    stop_unfinished(group, status["workers"], lambda worker: worker.worker_id, stopped_here)
            else:
                fence_silenced(group, status.get("workers", {}), launcher,
                               lambda _, worker: stopped_here.update({worker.worker_id: EVICTED_THEN_STOPPED}))
                if config.node_rank == 0 and config.nnodes > 1:
                    _mind_silent_nodes(rendezvous, job, status, config)
            if done_here and not _running(status):
                break
        wake.wait(_POLL_SECONDS)
        wake.clear()
    return status


def _fail_over(config: RunConfig, rendezvous: NodeRendezvous, job: _RemoteJob, why: str) -> None:
    """Node 0 is lost while the job may go on (an elastic one does): node 1 starts the job's
    coordinator on the ports it reserved, the other nodes follow it. The workers know it
    already (``SHOAL_COORDINATOR_SUCCESSOR``), and it takes their generation over from their
    heartbeats. Whether the job is elastic is known only once a worker comes to it (this
    node's last word from node 0 may be from before they joined)."""
    hosted = None
    if rendezvous.standby is not None:
        hosted = _membership(config)  # (node 0's workers are counted out as the first worker comes)
        if config.quorum == "majority" and (config.nnodes > 2 or rendezvous.host_unanswering):
            # Of two nodes, node 1 alone goes on after a node 0 that refused: it is gone for sure
            # (its machine answered for a dead launcher). With more, a majority is there anyway,
            # and a reset may come from a firewall on the way.
            hosted.quorum = NodeQuorum(config.nnodes, config.nproc_per_node, host_node=1)
        if rendezvous.host_unanswering:  # the workers' tries at node 0 take that long to give up
            hosted.presumed_grace = UNANSWERED_TRY_SECONDS
        try:
            rendezvous.standby.take_over(rendezvous.token, hosted)
        except (OSError, RuntimeError) as error:  # a reserved port taken after all
            raise NodeGone(f"{why}; node 1 could not take over its coordinator: {first_line(error)}") from None
    # The workers turn to it at their next try: at once when node 0's machine refuses, after
    # the try times out when node 0 went silent.
    patience = 2 * config.heartbeat_timeout + (UNANSWERED_TRY_SECONDS if rendezvous.host_unanswering else 0.0)
    job.follow(rendezvous.successor_url, why, hosted, patience=patience)
    rendezvous.url, rendezvous.successor_url = rendezvous.successor_url, None  # a restart asks it first


def _mind_the_quorum(job: _LocalJob | _RemoteJob, status: dict, config: RunConfig, told: bool) -> bool:
    """The coordinator this node hosts holds the job for a quorum (``launch/quorum.py``): say
    so, once; once the nodes it lacks have had as long as they could take to come, they are on
    the other side of a partition, and this side fails the job. Returns whether it holds
    (and said so)."""
    held, patience = status.get("held"), job.quorum_patience(config)
    if not held or patience is None or status.get("status") in ("completed", "failed"):
        return False
    if held["seconds"] > patience:
        job.fence(f"{held['reason']} (held {held['seconds']:.0f} s)")
    elif not told:
        print(f"shoal run: holding the job: {held['reason']}; it fails unless workers on more nodes "
              f"come within {patience - held['seconds']:.0f} s", file=sys.stderr, flush=True)
    return True


def _keep_up_for_the_others(membership: Membership, stop: StopRequest) -> None:
    """Node 1, which took the job over: keep its coordinator up until the job ended, then a
    few polls more, for the other nodes' launchers to read how it ended (node 0's store,
    where they said they had, is gone)."""
    deadline = time.monotonic() + _EXIT_BARRIER_SECONDS
    while membership.status not in ("completed", "failed") and not stop.how and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
    time.sleep(_SUCCESSOR_GRACE_SECONDS)


def _tell_slow_collectives(job: _LocalJob | _RemoteJob, told: tuple[int, int]) -> tuple[int, int]:
    """Say when the job waits longer for its collectives (a slow link, a straggler), and
    shorter again: it slows down for a reason the user should see, and finds a hang faster
    after. Deaths are told at the end, as survived. Returns how many membership and timeout
    changes have been looked at."""
    changes, timeout_changes = job.changes(), job.timeout_changes()
    for change in changes[told[0]:]:
        if for_slow_collective(change):
            print(f"shoal run: {describe_change(change)}", file=sys.stderr, flush=True)
    for change in timeout_changes[told[1]:]:
        print(f"shoal run: {describe_timeout_change(change)}", file=sys.stderr, flush=True)
    return len(changes), len(timeout_changes)


def _await_node_0(rendezvous: NodeRendezvous, stop: StopRequest) -> None:
    """A node whose workers are done stays (its launcher beating) until node 0's are too (or the job
    failed, or node 0 is gone): a failure elsewhere until then is still this job's, and
    reported by this node too (torchrun's exit barrier)."""
    try:
        while not (rendezvous.node0_done() or rendezvous.failed() or stop.how):
            time.sleep(_POLL_SECONDS)
    except NodeGone:
        pass  # _failures says so


def _tell_stop(config: RunConfig, rendezvous: NodeRendezvous, job: _LocalJob | _RemoteJob,
               stop: StopRequest, status: dict, others: list[str]) -> None:
    """Once, when this node was told to stop: say why first, and to every node under a plain
    script (an elastic job goes on without this node), with the time it was told. (Whether
    it is elastic is asked again: the last status seen may be from before the workers joined.)"""
    if not stop.how or stop.told:
        return
    stop.told = True
    reason = f"node {config.node_rank}: {stop.how}" if config.nnodes > 1 else stop.how
    others.insert(0, reason)
    if not (status.get("workers") or job.status().get("workers")):
        try:
            rendezvous.report_failure(stop.when, reason)
        except NodeGone as error:
            others.append(str(error))


def _mind_silent_nodes(rendezvous: NodeRendezvous, job: _LocalJob, status: dict,
                       config: RunConfig) -> None:
    """Node 0: a node whose launcher went silent is gone, and so are its workers (they die
    with their launcher). A plain job cannot go on without them: it fails, naming the node.
    An elastic one goes on; its rank is freed for a launcher started again with the same
    command, and its workers that never joined are no longer waited for."""
    silence = _silence(config)
    for node in rendezvous.silent_nodes(silence):
        if status.get("held"):  # this side may be the one cut off: a launcher that took the
            continue            # rank here would count for a node that goes on elsewhere
        rendezvous.release(node)
        cause = f"node {node}'s launcher went silent for {silence:g} s"
        workers = status.get("workers", {})
        if not workers:
            rendezvous.report_failure(time.time(), cause)
            continue
        for rank in _node_ranks(node, config.nproc_per_node):
            if str(rank) not in workers:
                job.report_exit(rank, cause, time.time())


def _node_ranks(node: int, nproc_per_node: int) -> range:
    return range(node * nproc_per_node, (node + 1) * nproc_per_node)


EVICTED_THEN_STOPPED = "evicted by the coordinator (hung or cut off), then stopped here"
"""Why a launcher stopped a local worker the coordinator had declared dead: hung (while the
job runs, ``fence_silenced``), or still there when the job ended."""
NOT_JOINED_WHEN_IT_ENDED = "had not joined when the job ended; stopped here"
"""Why ``stop_unfinished`` stopped a worker the coordinator never heard of: one that came
too late (a node started as the job ended), not a loss the job survived."""


def stop_unfinished(group: WorkerGroup, workers: dict, id_of: Callable[[WorkerProcess], int | None],
                    stopped_here: dict[int, str]) -> None:
    """The elastic job ended: a local worker the coordinator (``workers``: its status's, by
    the job's ids; ``id_of``: a local worker's) declared dead (evicted: hung, or cut off) or
    never heard from will never hear so. One that finished, or is still a live member, is
    left to end by itself (it may be at the script's own work after ``shoal.train``
    returned). ``stopped_here`` says why for each one stopped."""
    for worker in group.running():
        known = workers.get(str(id_of(worker)))
        if known is not None and (known["alive"] or known["finished"]):
            continue
        stopped_here[worker.worker_id] = NOT_JOINED_WHEN_IT_ENDED if known is None else EVICTED_THEN_STOPPED
        group.kill(worker.worker_id)


def _failures(rendezvous: NodeRendezvous, others: list[str]) -> list[str]:
    """Every plain-script failure any node reported, earliest first, then ``others``."""
    try:
        reported = rendezvous.failures()
    except NodeGone:
        reported = []  # node 0 finished and closed its store, or is gone: ``others`` says which
    return reported + [reason for reason in others if reason not in reported]


def _running(status: dict) -> bool:
    """An elastic job (its workers joined the coordinator) that has not ended and still has
    a live worker somewhere (one that will end it, or die: never a wait on nobody)."""
    workers = status.get("workers", {}).values()
    return status.get("status") not in ("completed", "failed") and any(w["alive"] for w in workers)


def _wait_for_other_nodes(rendezvous: NodeRendezvous, job: _LocalJob, config: RunConfig,
                          limit: float) -> list[str]:
    """Keep the store and the coordinator up until every other node has read the outcome, up
    to ``limit`` seconds; once the job has ended, up to the whole exit barrier (node 0 told to
    stop leaves an elastic job to node 1 after ``limit``, but one that ended meanwhile must be
    read here: node 1 would wait for workers that are done). A node whose workers the
    coordinator declared dead may have lost its launcher too: it gets a few seconds; one whose
    launcher went silent, none (and that is said). Returns the silent nodes' causes."""
    started, silent = time.monotonic(), {}
    while True:
        status = job.status()
        workers = status["workers"]
        if status["status"] in ("completed", "failed"):
            limit = max(limit, _EXIT_BARRIER_SECONDS)
        for node in rendezvous.silent_nodes(_silence(config)):
            silent[node] = f"node {node}'s launcher went silent for {_silence(config):g} s"
        waiting = [node for node in rendezvous.unfinished() if node not in silent and
                   time.monotonic() - started < (_DEAD_NODE_SECONDS if _all_dead(
                       workers, _node_ranks(node, config.nproc_per_node)) else limit)]
        if not waiting:
            break
        time.sleep(_POLL_SECONDS)
    if late := [node for node in rendezvous.unfinished() if node not in silent and
                not _all_dead(workers, _node_ranks(node, config.nproc_per_node))]:
        print(f"shoal run: warning: node(s) {', '.join(map(str, late))} did not say they had ended "
              f"within {limit:g} s; stopping the store and the coordinator", file=sys.stderr)
    return list(silent.values())


def _all_dead(workers: dict, ranks: range) -> bool:
    """Every one of ``ranks`` joined the job and the coordinator declared it dead."""
    known = [workers.get(str(rank)) for rank in ranks]
    return all(w is not None and not w["alive"] and not w["finished"] for w in known)


def _verdict(status: dict, failures: list[str], restarts: int) -> int:
    elastic = bool(status.get("workers"))
    if status.get("rejected"):  # shoal.train refused its arguments in every worker
        print(f"shoal run: error: {status['reason']}", file=sys.stderr)
        return 2
    if elastic and status["status"] == "completed":
        for failure in failures:
            print(f"shoal run: survived: {failure}", file=sys.stderr)
        return 0
    if failures or (elastic and status["status"] != "completed"):
        reason = "; ".join(failures) or status["reason"]
        after = f" (after {restarts} restart{'s' if restarts > 1 else ''})" if restarts else ""
        print(f"shoal run: failed: {reason}{after}", file=sys.stderr)
        return 1
    return 0
