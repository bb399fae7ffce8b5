"""``shoal run --nnodes N --quorum majority``: which side of a partition goes on.

Silence cannot tell a dead node from one cut off: node 0 cut off from the others looks to them
as node 0 gone, and they to it as gone. Each side would go on alone (node 1 takes the job
over on its side, node 0 drops the silent nodes' workers on its own) and both would train,
commit and write results: split brain.

So a generation forms only of workers on a majority of the job's nodes, or on exactly half of
them one of which is node 0. The members of a generation are what lets it go on: its
collectives need every one of them, and they train on between two words of their coordinator.
Two generations on the two sides of a partition would need their members on two disjoint sets
of nodes, each a majority (or half, both with node 0): there are not that many nodes. A
generation formed before the partition goes on only on the side that holds all its members,
which is then the only side with a majority. (Counting anything but the members, such as the
coordinator's own node, or launchers still heard, breaks this: a generation of node 1's workers
alone, formed by node 0 counting itself, would train on node 1's side of a cut while node 0
formed another on its own.)

Without it the coordinator holds (``Membership._form``): its workers wait for the next
generation, and the launcher that hosts it fails the job once the missing nodes' workers have
had as long as they could take to come, saying it may be the one cut off. A side counts a
worker when it speaks to the coordinator: a taken-over generation's member not heard from yet
is only presumed alive.

The cost: a job whose live workers are on half of its nodes or fewer (not counting node 0's
half) stops, however they were lost: more than half of the nodes lost, at once or one after
another (the majority is of the nodes the job started with), or in a 2-node job every worker
of node 0 lost and not restarted. ``--quorum none`` lets every side go on.

Not fenced: async's parameter server, which goes on with whichever workers reach it (its
steps do not need every member); and, of two nodes, node 1 taking over from a node 0 whose
machine reset the connection (its launcher dead for sure, unless a firewall on the way sent
the reset), since node 1 alone is never a majority.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["NodeQuorum"]


class NodeQuorum:
    """``Membership.quorum`` for the coordinator that ``host_node`` hosts (0, or 1 after a
    takeover): given the workers that would be a generation's, why they may not form one."""

    def __init__(self, nnodes: int, nproc_per_node: int, *, host_node: int):
        self._nnodes, self._nproc, self._host = nnodes, nproc_per_node, host_node

    def __call__(self, members: Iterable[int]) -> str | None:
        nodes = sorted({worker // self._nproc for worker in members})
        if 2 * len(nodes) > self._nnodes or (2 * len(nodes) == self._nnodes and 0 in nodes):
            return None
        return (f"node {self._host}'s coordinator hears from live workers on node(s) "
                f"{', '.join(map(str, nodes)) or 'none'} only, of {self._nnodes} nodes: not a majority "
                f"(--quorum majority); node {self._host} may be cut off from the others")
