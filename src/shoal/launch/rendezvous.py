"""``shoal run --nnodes N``: how the launchers of several nodes find each other and end together.

torchrun's static rendezvous. Node 0's launcher hosts the job's coordinator, whose TCPStore
listens on ``--master-port`` at ``--master-addr``, the one address every node is given; a
plain script's ``init_process_group("env://")`` meets there, as under torchrun. The other
nodes' launchers connect to that store to learn what only node 0 knows: the coordinator's
URL and token (for scripts that use ``shoal.train``) and the run id. The store then carries
what the nodes must share:

- the first failure of a plain script: every node stops its workers, since a torchrun
  script cannot lose a rank (an elastic script's failures go to the coordinator instead);
- each node's end: node 0 keeps the store and the coordinator up until every other node
  has read the job's outcome, as torchrun's exit barrier does.

The store has no authentication (torch's TCPStore has none); whoever reaches
``--master-addr:--master-port`` could read the job token there, as they could disturb the
rendezvous itself. Keep that port inside the cluster's network.
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import torch.distributed as dist

from shoal.config import ConfigError

__all__ = ["NodeGone", "NodeRendezvous"]

_URL = "shoal/run/coordinator-url"
_TOKEN = "shoal/run/token"
_RUN_ID = "shoal/run/run-id"
_FAILED = "shoal/run/failed"
_FINISHED = "shoal/run/finished/{}"


class NodeGone(RuntimeError):
    """Node 0's store stopped answering: its launcher, which hosts it, is gone."""


class NodeRendezvous:
    """This node's view of the others, through node 0's store."""

    def __init__(self, store: dist.TCPStore, node_rank: int, nnodes: int, *, url: str, token: str,
                 run_id: str):
        self._store = store
        self.store_port = store.port
        """Where scripts meet (``MASTER_PORT``): ``--master-port``, or the OS's choice on one node."""
        self.node_rank = node_rank
        self.nnodes = nnodes
        self.url = url
        self.token = token
        self.run_id = run_id

    @classmethod
    def host(cls, store: dist.TCPStore, nnodes: int, *, url: str, token: str,
             run_id: str) -> NodeRendezvous:
        """Node 0: publish what the other nodes need in the store it serves."""
        for key, value in ((_URL, url), (_TOKEN, token), (_RUN_ID, run_id)):
            store.set(key, value)
        return cls(store, 0, nnodes, url=url, token=token, run_id=run_id)

    @classmethod
    def join(cls, master_addr: str, master_port: int, node_rank: int, nnodes: int,
             timeout: float) -> NodeRendezvous:
        """Node ``node_rank`` > 0: wait up to ``timeout`` for node 0's store, then read it.

        Raises :class:`ConfigError` naming ``--master-addr`` if no node 0 answers: the nodes
        may start in any order, but a wrong address would otherwise hang with no word."""
        deadline = time.monotonic() + timeout
        try:
            _wait_until_listening(master_addr, master_port, deadline)
            store = dist.TCPStore(master_addr, master_port, is_master=False,
                                  timeout=timedelta(seconds=max(deadline - time.monotonic(), 10.0)))
            url, token, run_id = (store.get(key).decode() for key in (_URL, _TOKEN, _RUN_ID))
        except (OSError, RuntimeError) as error:  # torch's DistError and its kinds are RuntimeErrors
            raise ConfigError("--master-addr", f"no node 0 answered at {master_addr}:{master_port} "
                              f"within {timeout:g} s (start `shoal run --node-rank 0` there, or "
                              f"give a longer --join-timeout): {_first_line(error)}") from None
        return cls(store, node_rank, nnodes, url=url, token=token, run_id=run_id)

    def report_failure(self, reason: str) -> None:
        """Tell every node that this job failed; the first reason stays."""
        self._call(self._store.compare_set, _FAILED, "", reason)

    def failure(self) -> str | None:
        """Why some node said the job failed, or None."""
        if not self._call(self._store.check, [_FAILED]):
            return None
        return self._call(self._store.get, _FAILED).decode()

    def finish(self) -> None:
        """This node has read the job's outcome: node 0 may stop the store."""
        self._call(self._store.set, _FINISHED.format(self.node_rank), "1")

    def unfinished(self) -> list[int]:
        """The other nodes that have not said they finished (node 0 asks)."""
        return [node for node in range(1, self.nnodes)
                if not self._store.check([_FINISHED.format(node)])]

    def _call(self, operation, *args):
        try:
            return operation(*args)
        except RuntimeError as error:  # torch's DistError and its kinds are RuntimeErrors
            if self.node_rank == 0:
                raise  # our own store: anything wrong with it is a bug to see
            raise NodeGone(f"node 0 stopped answering at its store (its launcher hosts the job's "
                           f"store and coordinator): {_first_line(error)}") from None


def _wait_until_listening(address: str, port: int, deadline: float) -> None:
    """Connect and hang up until something listens at ``address:port``: the nodes start in any
    order. (TCPStore's client would wait too, logging a C++ stack trace at every retry.)"""
    while True:
        try:
            with socket.create_connection((address, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.25)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
