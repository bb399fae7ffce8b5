"""``shoal run --nnodes N --quorum majority``: which side of a partition goes on.

Silence cannot tell a dead node from one cut off: node 0 cut off from the others looks to them
as node 0 gone, and they to it as gone. Each side would go on alone (node 1 takes the job
over on its side, node 0 drops the silent nodes' workers on its own) and both would train,
commit and write results: split brain. So a side goes on only with a majority of the job's
nodes. A generation forms only of workers on more than half of the nodes, or on exactly half
on node 0's side (node 0 hosts the job's first coordinator; node 1's side never counts it),
and two sides of one partition can never both have that. The side without it holds: its
members wait for a generation while the workers it lost may still come, then it fails, saying
that it may be the one cut off.

A side counts a node when one of that node's workers speaks to its coordinator (a
taken-over generation's member only presumed alive does not), and its own node. Node 0 also
counts a node whose workers it lost but whose launcher it still hears beating *since* it
lost them: their workers hung or exited, the node is not cut off (a job may go on with
``--min-workers`` of one node's workers, as long as the other launchers are there).

The cost: a job that loses more than half of its nodes (at once, or one after another:
the majority is of the nodes the job started with) stops, and a 2-node job no
longer survives a silent node 0 (node 1 alone is not a majority; a node 0 whose launcher is
killed, refusing connections, is gone for sure and is still taken over). ``--quorum none``
lets every side go on, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

__all__ = ["NodeQuorum"]


class NodeQuorum:
    """``Membership.quorum`` for the coordinator that ``host_node`` hosts (0, or 1 after a
    takeover). ``heard_since(node, since)``: that node's launcher beat after ``since`` (node 0,
    which hosts the launchers' store; None elsewhere)."""

    def __init__(self, nnodes: int, nproc_per_node: int, *, host_node: int,
                 heard_since: Callable[[int, float], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._nnodes, self._nproc, self._host = nnodes, nproc_per_node, host_node
        self._heard_since = heard_since
        self._clock = clock
        self._missing_since: dict[int, float] = {}
        """Since when each node without a worker here has been so (its launcher must be
        heard after that to count)."""

    def __call__(self, present: Iterable[int]) -> str | None:
        nodes = {worker // self._nproc for worker in present} | {self._host}
        now = self._clock()
        for node in range(self._nnodes):
            if node in nodes:
                self._missing_since.pop(node, None)
            else:
                self._missing_since.setdefault(node, now)
        if self._heard_since is not None:
            nodes |= {node for node, since in self._missing_since.items() if self._heard_since(node, since)}
        if 2 * len(nodes) > self._nnodes or (self._host == 0 and 2 * len(nodes) == self._nnodes):
            return None
        return (f"node {self._host}'s coordinator reaches node(s) {', '.join(map(str, sorted(nodes)))} "
                f"of {self._nnodes}, not a majority of them (--quorum majority): node {self._host} "
                "may be the one cut off")
