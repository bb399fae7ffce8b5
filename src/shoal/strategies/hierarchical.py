"""``hierarchical``: sum within each host, all-reduce among host leaders, broadcast back.

Numerically an all-reduce (the same SUM), but only one worker per host crosses the slow
network between hosts, carrying the host's partial sum; ``--compress`` applies to that
inter-host exchange only, since links inside a host are fast. Hosts are the workers of one
launcher (one machine), or emulated with ``--workers-per-host``.
"""

# No ``from __future__ import annotations``: DDP checks the comm hook's annotations at runtime.

import torch.distributed as dist

from shoal.strategies.allreduce import _DataParallel, _done
from shoal.strategies.api import _generation_timeout, register

__all__ = ["Hierarchical"]


@register
class Hierarchical(_DataParallel):
    name = "hierarchical"

    def __init__(self, model, optimizer, options=None):
        super().__init__(model, optimizer, options)
        self._host_group = None
        self._bytes_within_host = 0
        """What ``bytes_sent`` counts of the reduce to the host leader, which stays on the host."""
        self._leader_group = None
        self._leader = 0
        self._is_leader = False

    def setup(self, host_key):
        keys = [None] * dist.get_world_size()
        dist.all_gather_object(keys, host_key)
        hosts: dict[str, list[int]] = {}
        for rank, key in enumerate(keys):
            hosts.setdefault(key, []).append(rank)
        me = dist.get_rank()
        # A member that hangs must fail the others' collectives on these groups as soon as on
        # the generation's own, not after torch's default 30 minutes (measured: every SIGSTOP
        # trial of `shoal chaos --strategy hierarchical` waited in the host group's reduce).
        timeout = _generation_timeout("cuda" if next(self.model.parameters()).is_cuda else "cpu")
        # Every rank must create every group, in the same order.
        for ranks in hosts.values():
            group = dist.new_group(ranks, timeout=timeout)
            if me in ranks:
                self._host_group, self._leader = group, ranks[0]
        leaders = dist.new_group([ranks[0] for ranks in hosts.values()], timeout=timeout)
        self._is_leader = me == self._leader
        self._leader_group = leaders if self._is_leader else None
        return super().setup(host_key)

    def reduce_bucket(self, bucket: dist.GradBucket):
        buffer = bucket.buffer()
        if self.gradients_stay_local:
            return _done(buffer)
        return _done(self.compressed_sum(buffer, f"bucket{bucket.index()}", self.parts(bucket)))

    def compressed_sum(self, tensor, key, parts):
        """Sum within the host, among the leaders through the exchange (compressed after any
        warm-up), and back to the host; in place."""
        return self._by_hosts(tensor, lambda total: self.exchange.sum(
            total, key, group=self._leader_group, parts=parts))

    def refresh_sum(self, tensor, key):
        """As ``compressed_sum``, through the variance refresh's compressor among the leaders."""
        return self._by_hosts(tensor, lambda total: self._refresh.sum(total, key, group=self._leader_group))

    def _by_hosts(self, tensor, among_leaders):
        """Reduce to the host leader, ``among_leaders`` sums the hosts' totals, broadcast back."""
        self.count(tensor)  # to the host leader (sent by members; the leader sends it back)
        self._bytes_within_host += tensor.numel() * tensor.element_size()
        dist.reduce(tensor, dst=self._leader, group=self._host_group)
        if self._is_leader:
            tensor.copy_(among_leaders(tensor))
        dist.broadcast(tensor, src=self._leader, group=self._host_group)
        return tensor

    @property
    def bytes_off_host(self) -> int:
        return self.bytes_sent - self._bytes_within_host

    def teardown(self):
        self._host_group = self._leader_group = None
        super().teardown()
