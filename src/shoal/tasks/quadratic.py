"""Minimise E[0.5 * ||w - x||^2] over noisy samples x = target + noise: tiny and fast."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from shoal.tasks.api import Task, TaskDefaults

_DIM = 32
_NUM_SAMPLES = 4096


class VectorModel(nn.Module):
    """A bare parameter vector, so that optimisation tasks are ordinary modules.

    ``forward(points)`` is the displacement ``weight - points``: losses must go through
    forward, which is where DDP hooks in.
    """

    def __init__(self, initial: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(initial.clone())

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.weight - points


class QuadraticTask(Task):
    name = "quadratic"
    defaults = TaskDefaults(epochs=2, batch_size=64, lr=0.1)
    knows_optimum = True

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        generator = torch.Generator().manual_seed(1234)  # the data is fixed; --seed drives order
        self.target = torch.randn(_DIM, generator=generator)
        noise = 0.5 * torch.randn(_NUM_SAMPLES, _DIM, generator=generator)
        self.samples = self.target + noise

    def build_model(self) -> nn.Module:
        return VectorModel(torch.full((_DIM,), 3.0))

    def build_optimizer(self, model, lr):
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    @classmethod
    def train_samples(cls, seed=0):
        return _NUM_SAMPLES

    def train_dataset(self):
        return TensorDataset(self.samples)

    def loss(self, model, batch):
        (x,) = batch
        return 0.5 * (model(x) ** 2).sum()

    def evaluate(self, model):
        with torch.no_grad():
            distance = (model.weight - self.samples.mean(0)).norm().item()
            loss = self.loss(model, (self.samples,)).item() / len(self.samples)
        return {"eval_loss": loss, "distance_to_optimum": distance}


class QuadraticSGDTask(QuadraticTask):
    """``quadratic`` with plain SGD: an optimizer that keeps no state between steps.

    Under ``localsgd`` and ``diloco`` every member keeps its own inner optimizer state, and
    a member's death loses it: a momentum buffer is part of where that member was heading.
    On this task there is none to lose, and every member's gradient is linear in the
    parameters with the same slope, so a run that loses members ends exactly where the
    undisturbed run does. That makes it the task on which ``shoal chaos`` checks those
    strategies' rollback, re-split and heal against the undisturbed model.
    """

    name = "quadratic-sgd"
    defaults = TaskDefaults(epochs=2, batch_size=64, lr=0.02)

    def build_optimizer(self, model, lr):
        return torch.optim.SGD(model.parameters(), lr=lr)
