"""Minimise the Ackley function with noisy mini-batches: a non-convex, many-minima surface."""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from shoal.tasks.api import Task, TaskDefaults
from shoal.tasks.quadratic import VectorModel

_DIM = 8
_NUM_SAMPLES = 4096


def ackley(points: torch.Tensor) -> torch.Tensor:
    """Ackley function of each row of ``points`` (global minimum 0 at the origin)."""
    dim = points.shape[-1]
    radius = torch.sqrt((points**2).sum(-1) / dim + 1e-12)
    waves = torch.cos(2 * math.pi * points).sum(-1) / dim
    return -20 * torch.exp(-0.2 * radius) - torch.exp(waves) + 20 + math.e


class AckleyTask(Task):
    name = "ackley"
    defaults = TaskDefaults(epochs=2, batch_size=64, lr=0.05)
    knows_optimum = True

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        generator = torch.Generator().manual_seed(4321)
        self.shifts = 0.1 * torch.randn(_NUM_SAMPLES, _DIM, generator=generator)

    def build_model(self):
        return VectorModel(torch.full((_DIM,), 1.5))

    def build_optimizer(self, model, lr):
        return torch.optim.Adam(model.parameters(), lr=lr)

    @classmethod
    def train_samples(cls, seed=0):
        return _NUM_SAMPLES

    def train_dataset(self):
        return TensorDataset(self.shifts)

    def loss(self, model, batch):
        (shifts,) = batch
        return ackley(model(shifts)).sum()

    def evaluate(self, model):
        with torch.no_grad():
            value = ackley(model.weight.unsqueeze(0)).item()
            distance = model.weight.norm().item()
        return {"eval_loss": value, "distance_to_optimum": distance}
