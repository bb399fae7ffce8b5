"""The strategy interface: how workers agree on an update, and where that update commits."""

from __future__ import annotations

import abc

import torch
from torch import nn

__all__ = ["STRATEGIES", "Strategy", "register"]


class Strategy(abc.ABC):
    """One algorithm for turning local gradients into a shared update.

    A strategy lives for one generation: ``setup`` runs after the process group of a new
    generation is formed and the state healed, ``teardown`` when that generation breaks. Its
    ``state_dict`` is the part of its state a newcomer must copy from a live peer (for
    example error-feedback buffers or outer momentum), shipped with the model during a heal.
    """

    name: str = ""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer
        self.bytes_sent = 0
        """Payload bytes this worker handed to collectives, over the whole run."""

    @abc.abstractmethod
    def setup(self) -> nn.Module:
        """Prepare for the current generation; return the module the loss must be computed with."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate this worker's share of the loss and communicate."""

    @abc.abstractmethod
    def step(self) -> None:
        """Apply the agreed update: after this returns, the step is committed on this worker."""

    @abc.abstractmethod
    def teardown(self) -> None:
        """Drop every reference to the current generation's process group."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in STRATEGIES:
        raise ValueError(f"strategy {cls.name!r} is registered twice")
    STRATEGIES[cls.name] = cls
    return cls
