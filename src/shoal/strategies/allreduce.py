"""``allreduce``: synchronous data parallelism on torch DDP over the generation's process group."""

# No ``from __future__ import annotations``: DDP checks the comm hook's annotations at runtime.

import gc

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shoal.strategies.api import Strategy, register

__all__ = ["AllReduce"]


def _sum_hook(strategy: "AllReduce", bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce a gradient bucket as a SUM (DDP's default divides by the world size).

    Each worker's loss is already divided by the GLOBAL batch size, so the sum over workers
    is exactly the gradient one worker would get for the whole batch, however the batch is
    split; averaging would be wrong when shares are uneven.
    """
    buffer = bucket.buffer()
    strategy.bytes_sent += buffer.numel() * buffer.element_size()
    work = dist.all_reduce(buffer, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


@register
class AllReduce(Strategy):
    name = "allreduce"

    def __init__(self, model, optimizer):
        super().__init__(model, optimizer)
        self._ddp: DistributedDataParallel | None = None

    def setup(self):
        device_ids = [torch.cuda.current_device()] if next(self.model.parameters()).is_cuda else None
        # Buckets are rebuilt per generation anyway: the old DDP object is dropped with its group.
        self._ddp = DistributedDataParallel(self.model, device_ids=device_ids, forward_sync_buffers=False)
        self._ddp.register_comm_hook(self, _sum_hook)
        return self._ddp

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()

    def teardown(self):
        # The reducer holds the process group; it must be gone before the group is destroyed,
        # or peers keep a half-open connection to a generation that no longer exists.
        self._ddp = None
        gc.collect()
