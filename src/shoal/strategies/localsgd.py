"""``localsgd``: H local steps, then the members average what they learned.

Each member takes ``--sync-every`` H optimizer steps on its own share of each global
batch (its loss is a mean over its share). At the end of a round the members exchange
their *update* since the last synchronisation, the delta, through the compressor, weighted
by the samples each processed: with plain SGD and H = 1 that is exactly the all-reduce
step, and the deltas are small numbers that compress better than the parameters.

The round is the commit point. If a member dies inside it, the survivors return to the
parameters, optimizer state and data position of the last synchronisation and redo the
round with the batch re-split (see ``Strategy``).
"""

from __future__ import annotations

import torch
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
        self._samples += local_samples
        self._round_samples += global_samples
        return max(local_samples, 1)  # a local step follows this worker's own mean gradient

    def setup(self, host_key):
        self._anchor = parameters_to_vector(self.model.parameters()).detach().clone()
        self._samples = self._round_samples = 0
        return self.model

    def backward(self, loss):
        loss.backward()

    def step(self, step, last):
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
        delta = self.compressor.sum((current - self._anchor) * weight, "delta")
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
