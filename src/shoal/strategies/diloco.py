"""``diloco``: local SGD with an outer optimizer (Douillard et al., 2023).

The inner optimizer is the task's own (AdamW for charlm), stepping H times locally. At the
end of a round the weighted mean of the members' deltas is the negative *pseudo-gradient*;
outer Nesterov SGD (``--outer-lr`` 0.7, ``--outer-momentum`` 0.9, the paper's values)
applies it to the parameters of the last synchronisation. The outer momentum is shared
strategy state: a newcomer copies it from a peer with the model, a rollback restores it.

Momentum 0.9 averages over about ten rounds. In a charlm run of 40 rounds a lighter one
(0.5) did better, and neither matched allreduce on training data for the same
samples (docs/BENCHMARKS.md, "DiLoCo H=50").
"""

from __future__ import annotations

import torch

from shoal.strategies.api import register
from shoal.strategies.localsgd import LocalSGD

__all__ = ["DiLoCo"]


@register
class DiLoCo(LocalSGD):
    name = "diloco"

    def __init__(self, model, optimizer, options=None):
        super().__init__(model, optimizer, options)
        self._momentum: torch.Tensor | None = None

    def _apply(self, delta):
        # torch.optim.SGD(nesterov=True) on the pseudo-gradient g = -delta, written out so the
        # outer state is one plain tensor: b = mu b + g; x -= lr (g + mu b).
        gradient = -delta
        mu = self.options.outer_momentum
        self._momentum = gradient.clone() if self._momentum is None else self._momentum.mul_(mu).add_(gradient)
        update = gradient.add(self._momentum, alpha=mu)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(self._anchor - self.options.outer_lr * update,
                                                self.model.parameters())

    def state_dict(self):
        return {"outer_momentum": self._momentum} if self._momentum is not None else {}

    def load_state_dict(self, state):
        momentum = state.get("outer_momentum")
        self._momentum = None if momentum is None else momentum.clone()
