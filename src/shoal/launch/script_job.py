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
_EXIT_BARRIER_SECONDS = 60.0
"""How long node 0 keeps the store up for nodes that have not read the job's outcome."""
_TERMINATE_GRACE_SECONDS = 30.0
"""After SIGTERM, how long the workers may take to leave before SIGKILL (torchrun's)."""
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
        except CoordinatorUnreachable:
            return None
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
    coordinator = Coordinator(membership, host=config.master_addr, store_port=config.master_port)
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
    failures: list[str] = []
    done = threading.Event()
    where = f", node {config.node_rank}" if config.nnodes > 1 else ""

    def on_exit(worker_id: int, returncode: int, when: float) -> None:
        if group.stopping:  # exits we cause while shutting down are not failures
            return
        elastic = str(worker_id) in job.status().get("workers", {})
        cause = describe_exit(returncode) if returncode else "exited"
        job.report_exit(worker_id, cause, when)
        if returncode != 0:
            failure = f"worker {worker_id} (rank {worker_id}{where}) {cause}"
            failures.append(failure)
            if not elastic:  # a plain torchrun script cannot survive a lost rank, on any node
                _tell_others(rendezvous, failure, failures)
                done.set()
        if not group.running():
            done.set()

    base_env = {**os.environ, ENV_COORDINATOR: rendezvous.url, ENV_TOKEN: rendezvous.token,
                ENV_LAUNCHER_ID: f"{socket.gethostname()}/{os.getpid()}",
                ENV_LAUNCHER_PID: str(os.getpid())}
    if config.nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        base_env["OMP_NUM_THREADS"] = "1"  # as torchrun: N processes must not each take every core
    # The script runs as `python -u SCRIPT`, through a runner that survives torch's teardown.
    group = WorkerGroup([sys.executable, "-u", "-m", "shoal.launch.script_runner", config.script,
                         *config.script_args], env=base_env,
                        on_exit=on_exit, echo=lambda line: print(line, flush=True))
    # SIGTERM (a scheduler cancelling the job, `docker stop`) ends this node as Ctrl-C does:
    # its workers run in sessions of their own, and would otherwise outlive it.
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    interrupted: BaseException | None = None
    stopped_how = ""
    try:
        for local_rank in range(config.nproc_per_node):
            rank = config.node_rank * config.nproc_per_node + local_rank
            env = torchrun_env(rank=rank, local_rank=local_rank, world_size=config.world_size,
                               local_world_size=config.nproc_per_node, node_rank=config.node_rank,
                               nnodes=config.nnodes, master_addr=config.master_addr,
                               master_port=rendezvous.store_port, run_id=rendezvous.run_id)
            group.spawn(rank, {**env, ENV_WORKER_ID: str(rank)})
        while not done.wait(_POLL_SECONDS):
            elsewhere = rendezvous.failure()
            if elsewhere is not None and elsewhere not in failures:
                failures.append(elsewhere)
                break
        # An elastic job goes on without this node's workers: stay until it ends (node 0
        # hosts its coordinator; the others report its outcome, not their workers' fate).
        while _running(job.status()):
            time.sleep(_POLL_SECONDS)
    except NodeGone as error:
        failures.append(str(error))
    except (KeyboardInterrupt, _Terminated) as stop:
        interrupted = stop
        how = "stopped (SIGTERM)" if isinstance(stop, _Terminated) else "interrupted (Ctrl-C)"
        stopped_how = f"node {config.node_rank}: {how}" if where else how
        failures.append(stopped_how)
        if not job.status().get("workers"):  # an elastic job goes on without this node
            _tell_others(rendezvous, failures[-1], failures)
    finally:
        # After SIGTERM the workers get torchrun's 30 s to leave (a shoal.train worker saves
        # its checkpoint at the next step boundary), then SIGKILL.
        group.stop_all(grace=_TERMINATE_GRACE_SECONDS if interrupted else 5.0)
        signal.signal(signal.SIGTERM, previous_handler)
    status = job.status()
    if config.node_rank == 0 and interrupted is None:  # told to stop: now, not after the others
        _wait_for_other_nodes(rendezvous, job, config.nproc_per_node)
    elif config.node_rank > 0:
        try:
            rendezvous.finish()
        except NodeGone:
            pass  # node 0 stopped first: nothing waits for us
    if isinstance(interrupted, _Terminated):
        print(f"shoal run: {stopped_how}", file=sys.stderr)
        return EXIT_PREEMPTED
    return _verdict(status, failures)


class _Terminated(Exception):
    """SIGTERM reached the launcher."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _running(status: dict) -> bool:
    """An elastic job (its workers joined the coordinator) that has not ended and still has
    a live worker somewhere (one that will end it, or die: never a wait on nobody)."""
    workers = status.get("workers", {}).values()
    return status.get("status") not in ("completed", "failed") and any(w["alive"] for w in workers)


def _tell_others(rendezvous: NodeRendezvous, failure: str, failures: list[str]) -> None:
    """Put ``failure`` in the store for the other nodes (node 0's store being gone is one more)."""
    if rendezvous.nnodes == 1:
        return
    try:
        rendezvous.report_failure(failure)
    except NodeGone as error:
        failures.append(str(error))


def _wait_for_other_nodes(rendezvous: NodeRendezvous, job: _LocalJob, nproc_per_node: int) -> None:
    """Keep the store and the coordinator up until every other node has read the outcome. A
    node whose workers the coordinator declared dead may have lost its launcher too (the
    machine is gone): it gets a few seconds, not the whole wait."""
    started = time.monotonic()
    while True:
        workers = job.status()["workers"]
        waiting = [node for node in rendezvous.unfinished()
                   if time.monotonic() - started < (_DEAD_NODE_SECONDS if _all_dead(
                       workers, range(node * nproc_per_node, (node + 1) * nproc_per_node))
                       else _EXIT_BARRIER_SECONDS)]
        if not waiting:
            break
        time.sleep(_POLL_SECONDS)
    if late := [node for node in rendezvous.unfinished()
                if not _all_dead(workers, range(node * nproc_per_node, (node + 1) * nproc_per_node))]:
        print(f"shoal run: warning: node(s) {', '.join(map(str, late))} did not say they had ended "
              f"within {_EXIT_BARRIER_SECONDS:g} s; stopping the store and the coordinator",
              file=sys.stderr)


def _all_dead(workers: dict, ranks: range) -> bool:
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
