"""``shoal run``: a user script on N processes per node with torchrun's environment.

A plain torchrun/DDP script sees RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ... as under
torchrun; its ``init_process_group("env://")`` rendezvous on the TCPStore the coordinator
hosts (``TORCHELASTIC_USE_AGENT_STORE``, as torchrun's agent does). Such a script is
all-or-nothing: when one process fails, the others are stopped, on every node, and the
command fails, naming the worker. A script that uses ``shoal.train`` joins the coordinator
instead and survives failures down to ``--min-workers``. With ``--nnodes``, node 0's
launcher hosts the coordinator and the store, and the nodes meet as in
``shoal.launch.rendezvous``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Self

import httpx
import torch.distributed as dist

from shoal.config import ConfigError, RunConfig, check_bindable
from shoal.coordinator import Coordinator, Membership
from shoal.coordinator.client import CoordinatorClient, CoordinatorUnreachable
from shoal.launch.rendezvous import NodeGone, NodeRendezvous
from shoal.launch.script_runner import ENV_LAUNCHER_PID
from shoal.launch.workers import WorkerGroup, describe_exit
from shoal.runtime.context import ENV_COORDINATOR, ENV_TOKEN, ENV_WORKER_ID
from shoal.runtime.trainer import ENV_LAUNCHER_ID
from shoal.runtime.worker import EXIT_PREEMPTED

__all__ = ["run_script", "torchrun_env"]

_POLL_SECONDS = 0.25
"""How often a node looks for another node's failure, and node 0 for the others' ends."""
_STATUS_SECONDS = 1.0
"""How often a node asks the coordinator how the job goes, while its workers run."""
_EXIT_BARRIER_SECONDS = 300.0
"""How long node 0 keeps the store up for nodes that have not read the job's outcome
(torchrun's exit barrier)."""
_TERMINATE_GRACE_SECONDS = 30.0
"""After SIGTERM, how long the workers may take to leave before SIGKILL (torchrun's)."""
_SILENT_NODE_HEARTBEATS = 3
"""A node's launcher silent for this many heartbeat timeouts is gone (generous: a plain job
fails for it)."""
_DEAD_NODE_SECONDS = 5.0
"""... and for a node whose workers all died: its launcher, if it lives, is polling for the end."""


def torchrun_env(*, rank: int, local_rank: int, world_size: int, local_world_size: int,
                 node_rank: int, nnodes: int, master_addr: str, master_port: int,
                 run_id: str) -> dict[str, str]:
    """The variables torchrun sets for one worker."""
    values = {
        "RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": world_size,
        "LOCAL_WORLD_SIZE": local_world_size, "GROUP_RANK": node_rank, "GROUP_WORLD_SIZE": nnodes,
        "ROLE_RANK": rank, "ROLE_WORLD_SIZE": world_size, "ROLE_NAME": "default",
        "MASTER_ADDR": master_addr, "MASTER_PORT": master_port,
        "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_RESTART_COUNT": 0,
        "TORCHELASTIC_MAX_RESTARTS": 0, "TORCHELASTIC_USE_AGENT_STORE": True,
    }
    return {key: str(value) for key, value in values.items()}


class _LocalJob:
    """The job as node 0 sees it: its membership is in this process."""

    def __init__(self, membership: Membership):
        self._membership = membership

    def status(self) -> dict:
        return self._membership.snapshot()

    def report_exit(self, worker_id: int, cause: str, when: float) -> None:
        self._membership.report_exit(worker_id, cause, when)


class _RemoteJob:
    """The job as the other nodes see it: node 0's coordinator, over HTTP."""

    def __init__(self, url: str, token: str):
        self._url, self._token = url, token

    def status(self) -> dict:
        """``GET /status``, or ``{}`` when node 0 is gone (the exits then tell the outcome)."""
        return self._ask(lambda client: client.get("/status")) or {}

    def report_exit(self, worker_id: int, cause: str, when: float) -> None:
        # Workers' ids are their ranks, known here: a death before joining counts too.
        self._ask(lambda client: client.post("/report", {"kind": "exit", "worker_id": worker_id,
                                                         "detail": cause}))

    def _ask(self, request) -> dict | None:
        client = CoordinatorClient(self._url, self._token, retry_seconds=2.0)  # one per thread
        try:
            return request(client)
        except (CoordinatorUnreachable, PermissionError, httpx.HTTPError):
            return None  # node 0 gone, or restarting: its store tells the main loop
        finally:
            client.close()


def run_script(config: RunConfig) -> int:
    hosted = _host(config) if config.node_rank in (0, None) else None
    if hosted is None:  # another node hosts the job
        rendezvous = NodeRendezvous.join(config.master_addr, config.master_port, config.node_rank,
                                         config.nnodes, config.nproc_per_node, config.run_id,
                                         config.join_timeout)
        config = dataclasses.replace(config, node_rank=rendezvous.node_rank)
        return _run_node(config, rendezvous, _RemoteJob(rendezvous.url, rendezvous.token))
    coordinator, membership = hosted
    try:
        rendezvous = NodeRendezvous.host(coordinator.store, config.nnodes, config.nproc_per_node,
                                         url=coordinator.url, token=coordinator.token,
                                         run_id=config.run_id or uuid.uuid4().hex[:12])
        return _run_node(dataclasses.replace(config, node_rank=0), rendezvous, _LocalJob(membership))
    finally:
        coordinator.stop()


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
    membership = Membership(expected_workers=config.world_size, min_workers=config.min_workers,
                            heartbeat_timeout=config.heartbeat_timeout)
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
                          f"{config.master_port}: {str(error).strip().splitlines()[0]}") from None
    return coordinator, membership


def _run_node(config: RunConfig, rendezvous: NodeRendezvous, job: _LocalJob | _RemoteJob) -> int:
    """Start this node's workers, wait for the job's end here or elsewhere, say how it went."""
    where = f", node {config.node_rank}" if config.nnodes > 1 else ""
    survived: list[str] = []  # an elastic job's losses on this node
    wake = threading.Event()
    evicted: set[int] = set()

    def on_exit(worker_id: int, returncode: int, when: float) -> None:
        if group.stopping:  # exits we cause while shutting down are not failures
            return
        cause = describe_exit(returncode) if returncode else "exited"
        if worker_id in evicted:
            cause = "evicted by the coordinator (hung or cut off), then stopped here"
        try:
            if returncode != 0:
                failure = f"worker {worker_id} (rank {worker_id}{where}) {cause}"
                if str(worker_id) in job.status().get("workers", {}):
                    survived.append(failure)
                else:  # a plain torchrun script cannot survive a lost rank, on any node
                    rendezvous.report_failure(when, failure)
            job.report_exit(worker_id, cause, when)
        except NodeGone:
            pass  # the main loop finds it out too, and says so
        finally:
            wake.set()

    base_env = {**os.environ, ENV_COORDINATOR: rendezvous.url, ENV_TOKEN: rendezvous.token,
                ENV_LAUNCHER_ID: f"{socket.gethostname()}/{os.getpid()}",
                ENV_LAUNCHER_PID: str(os.getpid())}
    if config.nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        base_env["OMP_NUM_THREADS"] = "1"  # as torchrun: N processes must not each take every core
    # The script runs as `python -u SCRIPT`, through a runner that survives torch's teardown.
    group = WorkerGroup([sys.executable, "-u", "-m", "shoal.launch.script_runner", config.script,
                         *config.script_args], env=base_env,
                        on_exit=on_exit, echo=lambda line: print(line, flush=True))
    others: list[str] = []  # why this node stopped, besides its workers' exits
    status: dict = {}
    with _StopRequest(group, wake) as stop:
        try:
            if config.node_rank == 0 and config.nnodes > 1:  # no worker starts before every node is in
                not_started = rendezvous.wait_for_nodes(
                    config.join_timeout, _SILENT_NODE_HEARTBEATS * config.heartbeat_timeout, wake)
                if not_started is not None:
                    rendezvous.report_failure(time.time(), not_started)
            if not rendezvous.failed() and not stop.how:
                _spawn_workers(config, rendezvous, group)
                status = _watch(config, rendezvous, job, group, wake, stop, evicted)
        except NodeGone as error:
            others.append(str(error))
        finally:
            group.stop_all(grace=_TERMINATE_GRACE_SECONDS if stop.how else 5.0)
        if stop.how:
            others.insert(0, f"node {config.node_rank}: {stop.how}" if where else stop.how)
            if not status.get("workers"):  # an elastic job goes on without this node
                _tell_others(rendezvous, others[0], others)
    status = job.status() or status  # node 0 may be gone: the last status seen then
    if config.node_rank == 0 and config.nnodes > 1 and not stop.how:  # told to stop: now
        rendezvous.announce_done()
        _wait_for_other_nodes(rendezvous, job, config.nproc_per_node)
    failures = _failures(rendezvous, others) + [f for f in survived if f not in others]
    if config.node_rank > 0:
        try:
            rendezvous.finish()
        except NodeGone:
            pass  # node 0 stopped first: nothing waits for us
    if stop.how == _SIGTERM:
        print(f"shoal run: {others[0]}", file=sys.stderr)
        return EXIT_PREEMPTED
    return _verdict(status, failures)


def _spawn_workers(config: RunConfig, rendezvous: NodeRendezvous, group: WorkerGroup) -> None:
    for local_rank in range(config.nproc_per_node):
        rank = config.node_rank * config.nproc_per_node + local_rank
        env = torchrun_env(rank=rank, local_rank=local_rank, world_size=config.world_size,
                           local_world_size=config.nproc_per_node, node_rank=config.node_rank,
                           nnodes=config.nnodes, master_addr=config.master_addr,
                           master_port=rendezvous.store_port, run_id=rendezvous.run_id)
        group.spawn(rank, {**env, ENV_WORKER_ID: str(rank)})


def _watch(config: RunConfig, rendezvous: NodeRendezvous, job: _LocalJob | _RemoteJob,
           group: WorkerGroup, wake: threading.Event, stop: _StopRequest, evicted: set[int]) -> dict:
    """Until this node is done: a plain script's failure anywhere ends it; an elastic job
    ends when the coordinator says so (this node stays while it goes on elsewhere, and stops
    a worker the coordinator evicted, which may be hung). Returns the job's last status."""
    status: dict = {}
    watch_store = True
    next_status = 0.0
    while not stop.how:
        if watch_store:
            if config.node_rank > 0:
                rendezvous.beat()
            if rendezvous.failed():
                break
            # Node 0's workers are done: it will close the store once every node finished, or
            # after a while, and ours must not be stopped for that.
            watch_store = config.node_rank == 0 or not rendezvous.node0_done()
        done_here = not group.running()
        if done_here or time.monotonic() >= next_status:
            status = job.status() or status
            next_status = time.monotonic() + _STATUS_SECONDS
            if status.get("status") in ("completed", "failed") and status.get("workers"):
                _stop_unfinished(group, status, evicted)
            elif config.node_rank == 0 and config.nnodes > 1:
                _mind_silent_nodes(rendezvous, job, status, config)
            if done_here and not _running(status):
                break
        wake.wait(_POLL_SECONDS)
        wake.clear()
    return status


def _mind_silent_nodes(rendezvous: NodeRendezvous, job: _LocalJob, status: dict,
                       config: RunConfig) -> None:
    """Node 0: a node whose launcher went silent is gone, and so are its workers (they die
    with their launcher). A plain job cannot go on without them: it fails, naming the node.
    An elastic one goes on; its rank is freed for a launcher started again with the same
    command, and its workers that never joined are no longer waited for."""
    silence = _SILENT_NODE_HEARTBEATS * config.heartbeat_timeout
    for node in rendezvous.silent_nodes(silence):
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


def _stop_unfinished(group: WorkerGroup, status: dict, evicted: set[int]) -> None:
    """The elastic job ended: a local worker that did not finish it was evicted (hung, or cut
    off) and will never hear so. One that finished may still be at the script's own work
    after ``shoal.train`` returned: it is left to end by itself."""
    workers = status["workers"]
    for worker in group.running():
        if not workers.get(str(worker.worker_id), {}).get("finished"):
            evicted.add(worker.worker_id)
            group.kill(worker.worker_id)


def _failures(rendezvous: NodeRendezvous, others: list[str]) -> list[str]:
    """Every plain-script failure any node reported, earliest first, then ``others``."""
    try:
        reported = rendezvous.failures()
    except NodeGone as error:
        reported = [] if str(error) in others else [str(error)]
    return reported + [reason for reason in others if reason not in reported]


def _running(status: dict) -> bool:
    """An elastic job (its workers joined the coordinator) that has not ended and still has
    a live worker somewhere (one that will end it, or die: never a wait on nobody)."""
    workers = status.get("workers", {}).values()
    return status.get("status") not in ("completed", "failed") and any(w["alive"] for w in workers)


def _tell_others(rendezvous: NodeRendezvous, failure: str, others: list[str]) -> None:
    """Put ``failure`` in the store for the other nodes (node 0's store being gone is one more)."""
    try:
        rendezvous.report_failure(time.time(), failure)
    except NodeGone as error:
        others.append(str(error))


_SIGTERM = "stopped (SIGTERM)"


class _StopRequest:
    """SIGTERM or Ctrl-C to the launcher. The first asks this node to stop (its workers get
    the grace); another one kills them at once. The handler only notes it: a signal comes at
    any line, and an exception raised there (inside ``Popen``, or while workers are being
    stopped) would leave a child unregistered or end the launcher in a traceback."""

    def __init__(self, group: WorkerGroup, wake: threading.Event):
        self._group = group
        self._wake = wake
        self.how: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> Self:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _note(self, signum: int, frame) -> None:
        if self.how is None:
            self.how = _SIGTERM if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
            self._wake.set()
        else:
            self._group.signal_all(signal.SIGKILL)


def _wait_for_other_nodes(rendezvous: NodeRendezvous, job: _LocalJob, nproc_per_node: int) -> None:
    """Keep the store and the coordinator up until every other node has read the outcome. A
    node whose workers the coordinator declared dead may have lost its launcher too (the
    machine is gone): it gets a few seconds, not the whole wait."""
    started = time.monotonic()
    while True:
        workers = job.status()["workers"]
        waiting = [node for node in rendezvous.unfinished()
                   if time.monotonic() - started < (_DEAD_NODE_SECONDS if _all_dead(
                       workers, _node_ranks(node, nproc_per_node)) else _EXIT_BARRIER_SECONDS)]
        if not waiting:
            break
        time.sleep(_POLL_SECONDS)
    if late := [node for node in rendezvous.unfinished()
                if not _all_dead(workers, _node_ranks(node, nproc_per_node))]:
        print(f"shoal run: warning: node(s) {', '.join(map(str, late))} did not say they had ended "
              f"within {_EXIT_BARRIER_SECONDS:g} s; stopping the store and the coordinator",
              file=sys.stderr)


def _all_dead(workers: dict, ranks: range) -> bool:
    """Every one of ``ranks`` joined the job and the coordinator declared it dead."""
    known = [workers.get(str(rank)) for rank in ranks]
    return all(w is not None and not w["alive"] and not w["finished"] for w in known)


def _verdict(status: dict, failures: list[str]) -> int:
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
        print(f"shoal run: failed: {reason}", file=sys.stderr)
        return 1
    return 0
