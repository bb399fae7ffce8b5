"""``localsgd``: H local steps, then the members average what they learned.

Each member takes ``--sync-every`` H optimizer steps on its own share of each global
batch (its loss is a mean over its share). At the end of a round the members exchange
their *update* since the last synchronisation, the delta, through the compressor, weighted
by the samples each processed: with plain SGD and H = 1 that is exactly the all-reduce
step, and the deltas are small numbers that compress better than the parameters.

The round is the commit point. If a member dies inside it, the survivors return to the
parameters, optimizer state and data position of the last synchronisation and redo the
round with the batch re-split (see ``Strategy``).

During ``--warmup-steps`` the members all-reduce gradients every step, exactly as the
``allreduce`` strategy does, and every step commits: local steps cost most early in
training, when the members' models would drift apart fastest (post-local SGD).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from shoal.strategies.api import Strategy, register

__all__ = ["LocalSGD"]


@register
class LocalSGD(Strategy):
    name = "localsgd"
    commits_every_step = False

    def __init__(self, model, optimizer, options=None):
        super().__init__(model, optimizer, options)
        self._anchor: torch.Tensor | None = None
        """The parameters at the last synchronisation (identical on every member)."""
        self._samples = 0
        self._round_samples = 0

    def loss_divisor(self, local_samples, global_samples):
        if self.warming_up:
            return global_samples  # summed over members: the gradient of the global batch
        self._samples += local_samples
        self._round_samples += global_samples
        return max(local_samples, 1)  # a local step follows this worker's own mean gradient

    def setup(self, host_key):
        self._anchor = parameters_to_vector(self.model.parameters()).detach().clone()
        self._samples = self._round_samples = 0
        return self.model

    def backward(self, loss):
        loss.backward()
        if self.warming_up:
            self._all_reduce_gradients()

    def _all_reduce_gradients(self) -> None:
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        flat = parameters_to_vector([p.grad for p in parameters])
        self.count(flat)
        dist.all_reduce(flat)
        vector_to_parameters(flat, [p.grad for p in parameters])

    def step(self, step, last):
        if self.warming_up:  # identical members after every step: the round starts here
            self.optimizer.step()
            self._anchor = parameters_to_vector(self.model.parameters()).detach().clone()
            return True
        self.optimizer.step()
        if (step + 1) % self.options.sync_every and not last:
            return False
        # Members finish a round of H local steps at different times; the all-reduce's
        # timeout must only cover the exchange, not a slow peer's round.
        self.await_members(f"sync-{step}")
        self._synchronise()
        return True

    def _synchronise(self) -> None:
        current = parameters_to_vector(self.model.parameters()).detach()
        weight = self._samples / self._round_samples
        delta = self.compressor.sum((current - self._anchor) * weight, "delta",
                                    parts=[(name, p.shape) for name, p in self.model.named_parameters()])
        self._apply(delta)
        self.compressor.commit()
        self._anchor = parameters_to_vector(self.model.parameters()).detach().clone()
        self._samples = self._round_samples = 0

    def _apply(self, delta: torch.Tensor) -> None:
        """Move every member to the agreed parameters: anchor + the weighted mean delta."""
        with torch.no_grad():
            vector_to_parameters(self._anchor + delta, self.model.parameters())

    def rollback(self):
        super().rollback()
        self._samples = self._round_samples = 0

    def teardown(self):
        pass
