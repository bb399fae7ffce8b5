"""The task interface: a built-in workload that ``shoal train``, tests and benchmarks run."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

__all__ = ["Task", "TaskDefaults"]


@dataclass(frozen=True, slots=True)
class TaskDefaults:
    epochs: int
    batch_size: int
    lr: float


class Task(abc.ABC):
    """A model, its data, its loss and its evaluation.

    ``loss`` returns the SUM of per-sample losses of a batch: the trainer divides by the
    global batch size, so N workers with shares of any size add up to exactly the loss of
    one worker holding the whole batch.
    """

    name: str
    defaults: TaskDefaults
    knows_optimum: bool = False
    """``evaluate`` reports ``distance_to_optimum``: how near the model ended to the best one."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    @abc.abstractmethod
    def build_model(self) -> nn.Module: ...

    @abc.abstractmethod
    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer: ...

    @abc.abstractmethod
    def train_dataset(self) -> Dataset: ...

    @classmethod
    @abc.abstractmethod
    def train_samples(cls, seed: int = 0) -> int:
        """``len(cls(seed).train_dataset())`` without building the task: the launcher checks
        the batch and the run's length with it before it forks its workers, and a torch
        operation in it before that fork hangs the workers (torch's thread pool does not
        survive it)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch) -> torch.Tensor: ...

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def samples_to_units(self) -> tuple[str, int]:
        """How throughput is also reported: ("tokens", tokens per sample) for language models."""
        return ("samples", 1)
