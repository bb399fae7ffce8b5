"""``allreduce``: synchronous data parallelism on torch DDP over the generation's process group."""

# No ``from __future__ import annotations``: DDP checks the comm hook's annotations at runtime.

import functools
import gc

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shoal.compression.int8 import BlockInt8
from shoal.config import ConfigError
from shoal.strategies._onebit_adam import check_supported, onebit_adam_step, uses_momentum_exchange
from shoal.strategies.api import Strategy, register

__all__ = ["AllReduce"]


def _done(tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    future = torch.futures.Future()
    future.set_result(tensor)
    return future


def _sum_hook(strategy: "AllReduce", bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce a gradient bucket as a SUM (DDP's default divides by the world size).

    Each worker's loss is already divided by the GLOBAL batch size, so the sum over workers
    is exactly the gradient one worker would get for the whole batch, however the batch is
    split; averaging would be wrong when shares are uneven.
    """
    return strategy.reduce_bucket(bucket)


class _DataParallel(Strategy):
    """DDP with a SUM comm hook; subclasses decide how a bucket is summed."""

    def __init__(self, model, optimizer, options=None):
        super().__init__(model, optimizer, options)
        self._ddp: DistributedDataParallel | None = None
        self._names: dict[int, str] = {}
        self.exchanges_momentum = (self.options.compress == "onebit" and self.options.warmup_steps > 0
                                   and uses_momentum_exchange(optimizer))
        """1-bit Adam: after the warm-up, gradients stay local and the momentum is exchanged
        (``_onebit_adam``); without a warm-up there is no variance to freeze."""
        if self.exchanges_momentum:
            check_supported(optimizer)
            # The paper's compressed all-reduce: the members' sum re-encoded in signs (with
            # error feedback on both encodings), half the all-gather's wire at 4 members.
            # Unlike gradients' (onebit.py), the momentum's sum gains from it: with the
            # all-gather, charlm's loss turned back up after 350 steps (docs/BENCHMARKS.md).
            self.compressor.reduce_scatter = True
        if self.options.variance_refresh and not self.exchanges_momentum:
            raise ConfigError("--variance-refresh", "refreshes 1-bit Adam's variance: it needs an Adam "
                              f"or AdamW optimizer, not {type(optimizer).__name__}")
        self._refresh = BlockInt8()
        """How 1-bit Adam's variance refreshes sum the gradients: int8 with a scale per block
        of 256 and error feedback, about a quarter of fp32's bytes and, on charlm, as good a
        loss as fp32 sums (docs/BENCHMARKS.md)."""

    def setup(self, host_key):
        device_ids = [torch.cuda.current_device()] if next(self.model.parameters()).is_cuda else None
        # Buckets are rebuilt per generation anyway: the old DDP object is dropped with its group.
        self._ddp = DistributedDataParallel(self.model, device_ids=device_ids, forward_sync_buffers=False)
        self._ddp.register_comm_hook(self, _sum_hook)
        self._names = {id(p): name for name, p in self.model.named_parameters()}
        return self._ddp

    @property
    def gradients_stay_local(self) -> bool:
        """1-bit Adam past its warm-up: each member keeps its gradient share; the momentum travels."""
        return self.exchanges_momentum and not self.warming_up

    def parts(self, bucket: dist.GradBucket) -> list[tuple[str, torch.Size]]:
        """Name and shape of each parameter in a bucket, in the bucket's order (which DDP
        changes after a generation's first step)."""
        return self._named(bucket.parameters())

    def _named(self, parameters) -> list[tuple[str, torch.Size]]:
        return [(self._names[id(p)], p.shape) for p in parameters]

    def reduce_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        if self.options.compress == "none" or self.warming_up:  # overlaps the rest of backward
            self.count(buffer)
            return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0])
        if self.gradients_stay_local:
            return _done(buffer)
        return _done(self.compressed_sum(buffer, f"bucket{bucket.index()}", self.parts(bucket)))

    def compressed_sum(self, tensor: torch.Tensor, key: str, parts) -> torch.Tensor:
        """The SUM of ``tensor`` over the members, through the compressor."""
        return self.compressor.sum(tensor, key, parts=parts)

    def refresh_sum(self, tensor: torch.Tensor, key: str) -> torch.Tensor:
        """The SUM of ``tensor`` over the members, for a variance refresh."""
        return self._refresh.sum(tensor, key)

    @property
    def bytes_sent(self) -> int:
        return super().bytes_sent + self._refresh.bytes_sent

    def rollback(self):
        super().rollback()
        self._refresh.rollback()

    def local_state_dict(self):
        return {**super().local_state_dict(), "refresh": self._refresh.state_dict()}

    def load_local_state_dict(self, state):
        super().load_local_state_dict(state)
        self._refresh.load_state_dict(state.get("refresh", {}))

    def backward(self, loss):
        loss.backward()

    def step(self, step, last):
        if self.gradients_stay_local:
            def exchange(flat, parameters):
                return self.compressed_sum(flat, "momentum", self._named(parameters))

            # A function of the step alone, as the warm-up is: a redone or resumed step refreshes
            # as it did the first time, and the steps its variance stands for follow.
            warmup, every = self.options.warmup_steps, self.options.variance_refresh
            since = step - warmup + 1  # compressed steps, this one included
            refreshing = bool(every) and since % every == 0
            refresh = functools.partial(self.refresh_sum, key="variance") if refreshing else None
            refreshes = since // every if every else 0
            onebit_adam_step(self.optimizer, exchange, dist.get_world_size(),
                             frozen_at=warmup + refreshes * every, refresh=refresh, refresh_spans=every)
        else:
            self.optimizer.step()
        self.compressor.commit()
        self._refresh.commit()
        return True

    def teardown(self):
        # The reducer holds the process group; it must be gone before the group is destroyed,
        # or peers keep a half-open connection to a generation that no longer exists.
        self._ddp = None
        gc.collect()


@register
class AllReduce(_DataParallel):
    name = "allreduce"
