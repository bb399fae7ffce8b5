"""The strategy interface: how workers agree on an update, and where that update commits.

A strategy lives for one generation: ``setup`` runs after the process group of a new
generation is formed and the state healed, ``teardown`` when that generation breaks.

Each strategy has a defined *commit point*. Synchronous ones (allreduce, hierarchical)
commit every step. Round-based ones (localsgd, diloco) take local steps and commit the
whole round when its synchronisation succeeds; if a member dies inside a round, the
survivors go back to the state of the last commit and redo the round with the batch
re-split, so every sample still counts exactly once and nothing half-agreed survives.

``state_dict`` is the shared strategy state that a newcomer copies from a live peer with
the model (outer parameters and momentum, for example). ``local_state_dict`` is this
worker's own (error-feedback residuals): a rollback restores it, but a heal never copies it,
because a residual is what *this* worker still owes the sum. A peer's copy would add that
peer's debt twice; a newcomer starts owing nothing.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from shoal.compression import COMPRESSORS, Compressor
from shoal.config import StrategyOptions

__all__ = ["STRATEGIES", "Strategy", "register"]


class Strategy(abc.ABC):
    """One algorithm for turning local gradients into a shared update."""

    name: str = ""
    commits_every_step: bool = True
    """False: steps are tentative until ``step`` reports a synchronisation (a round)."""
    drives_steps: bool = False
    """True: the strategy runs the generation's steps itself (async), not ``backward``/``step``."""
    sharded: bool = False
    """True: each member holds only shards of the state (zero): ``self.model`` is rebuilt for
    each generation, from the shards the members hold (``shoal.runtime.reshard``) or from the
    last checkpoint."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 options: StrategyOptions | None = None):
        self.model = model
        self.optimizer = optimizer
        self.options = options or StrategyOptions()
        self.compressor = COMPRESSORS[self.options.compress](powersgd_rank=self.options.powersgd_rank)
        self._uncompressed = COMPRESSORS["none"]()
        self.warming_up = False
        """True during the first ``--warmup-steps`` steps: exchange uncompressed, every step."""
        self.lr_factor: Callable[[int], float] | None = None
        """Set by the loop: the learning-rate schedule, a factor of the base rates by step."""
        # The base rates are the optimizer's now, before any step: a heal or a resume later
        # loads a peer's or a checkpoint's groups, whose rates are already scheduled.
        self._base_lrs = [group["lr"] for group in optimizer.param_groups]
        self._bytes_uncompressed = 0
        self.generation = 0
        """The generation being set up (set by the loop before ``setup``)."""
        self.await_members: Callable[[str], None] = lambda tag: None
        """Set by the loop: wait until every member reached ``tag`` while they stay alive
        (before a collective that follows long local work, so it is not timed out)."""

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this worker handed to collectives, over the whole run."""
        return self.compressor.bytes_sent + self._uncompressed.bytes_sent + self._bytes_uncompressed

    @property
    def bytes_off_host(self) -> int:
        """What of ``bytes_sent`` may cross a link between hosts (hierarchical keeps some on
        its host): what bounds a start by the steps' time (``coordinator/timeouts.py``)."""
        return self.bytes_sent

    @property
    def exchange(self) -> Compressor:
        """The compressor of the current step: none while warming up."""
        return self._uncompressed if self.warming_up else self.compressor

    def begin_step(self, step: int) -> None:
        """Called before each step's forward pass, with its number."""
        self.warming_up = step < self.options.warmup_steps
        self.schedule_lr(step)

    def schedule_lr(self, step: int) -> None:
        """Set the optimizer's rates for ``step`` (a function of the step alone, so a redone
        step gets the rate it had the first time)."""
        if self.lr_factor is None:
            return
        factor = self.lr_factor(step)
        if not (math.isfinite(factor) and factor >= 0):
            raise ValueError(f"the learning-rate schedule gave {factor!r} for step {step}: "
                             "a factor of the base rate must be finite and at least 0")
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * factor

    def state_bytes(self) -> dict[str, int]:
        """This worker's parameters, gradients and optimizer state in bytes (local shards only)."""
        def size(tensor: torch.Tensor) -> int:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            return local.numel() * local.element_size()

        parameters = list(self.model.parameters())
        return {
            "parameters": sum(size(p) for p in parameters),
            "gradients": sum(size(p.grad) for p in parameters if p.grad is not None),
            "optimizer": sum(size(value) for state in self.optimizer.state.values()
                             for value in state.values() if torch.is_tensor(value)),
        }

    def count(self, tensor: torch.Tensor) -> None:
        """Count a payload sent outside the compressor."""
        self.count_bytes(tensor.numel() * tensor.element_size())

    def count_bytes(self, size: int) -> None:
        self._bytes_uncompressed += size

    def loss_divisor(self, local_samples: int, global_samples: int) -> int:
        """What this worker's SUM of losses is divided by before ``backward``.

        Synchronous strategies divide by the global batch, so that gradients summed over
        workers are exactly the one-worker gradient however the batch is split.
        """
        return global_samples

    @abc.abstractmethod
    def setup(self, host_key: str) -> nn.Module:
        """Prepare for the current generation; return the module the loss must be computed with.

        ``host_key`` is the same for workers of one launcher (a node), or of one emulated host
        (``--workers-per-host``): hierarchical groups by it, zero places a shard's copies on
        different ones, async gives its snapshots to a worker off the server's.
        """

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate this worker's share of the loss and communicate."""

    def agree(self, step: int) -> None:
        """Collective, between ``backward`` and ``step``: make sure every member can apply
        this step before any member does. Most strategies need nothing more: ``backward``'s
        exchange completes on every member or fails. (zero's replica groups finish theirs
        independently.)"""

    @abc.abstractmethod
    def step(self, step: int, last: bool) -> bool:
        """Apply this step's update. True when the step (and any earlier tentative ones) is
        committed; ``last`` is the run's final step, which always commits."""

    def rollback(self) -> None:
        """Forget what the failed step or round did to the strategy's own state."""
        self.compressor.rollback()

    @abc.abstractmethod
    def teardown(self) -> None:
        """Drop every reference to the current generation's process group."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def local_state_dict(self) -> dict:
        return {"compressor": self.compressor.state_dict()}

    def load_local_state_dict(self, state: dict) -> None:
        self.compressor.load_state_dict(state.get("compressor", {}))


STRATEGIES: dict[str, type[Strategy]] = {}


def _generation_timeout(device: str):
    """The timeout of the generation's own group (its collective timeout, set by the context).

    Groups a strategy makes with ``new_group`` or a device mesh get torch's default instead
    (30 minutes on gloo), so a collective on one would wait that long for a member that hung:
    give them this one, and the survivors leave it as soon as the generation's group would."""
    return dist.group.WORLD._get_backend(torch.device(device)).options._timeout


def register(cls: type[Strategy]) -> type[Strategy]:
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in STRATEGIES:
        raise ValueError(f"strategy {cls.name!r} is registered twice")
    STRATEGIES[cls.name] = cls
    return cls
