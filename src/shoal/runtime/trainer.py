"""The elastic training loop: shoal owns the step boundary so it can redo and re-split a step.

One step, as data flows: the sampler gives this rank its share of global batch ``s``; the
loss (a SUM over the share, divided by the global batch size) is back-propagated; the
strategy communicates; the optimizer steps and ``s`` is committed. When anything in that
fails because a peer is gone, the worker reports it, drops the generation's process group,
waits for the next generation, heals from the most advanced member, and redoes the first
step that is not committed everywhere, re-split over the new members.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from shoal.config import KillSpec
from shoal.data import GlobalBatchSampler, fetch
from shoal.runtime.context import Context, GenerationMoved, JobStopped
from shoal.runtime.faults import maybe_kill
from shoal.runtime.heal import FRESH, HealReport, heal
from shoal.strategies import STRATEGIES, Strategy

__all__ = ["TrainResult", "train"]

log = logging.getLogger(__name__)

_MAX_FAILURES_WITHOUT_PROGRESS = 5
"""A step that keeps failing while no member changes is a bug, not a fault: give up."""

LossFn = Callable[[nn.Module, object], torch.Tensor]


@dataclass(slots=True)
class TrainResult:
    model: nn.Module
    steps: int
    """Committed steps."""
    epochs: float
    rank: int
    world_size: int
    generation: int
    heals: list[HealReport] = field(default_factory=list)
    bytes_sent: int = 0

    @property
    def is_leader(self) -> bool:
        """True on exactly one worker: the one that should evaluate, save and print."""
        return self.rank == 0


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    loss_fn: LossFn,
    *,
    global_batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    strategy: str = "allreduce",
    context: Context | None = None,
    kills: Sequence[KillSpec] = (),
) -> TrainResult:
    """Train ``model`` elastically; survive workers that die.

    ``loss_fn(model, batch)`` must return the SUM of per-sample losses of ``batch`` (shoal
    divides by the global batch size). It may be called again for the same step after a
    failure, with a different share of the batch. Under ``shoal run`` the job's coordinator is
    found from the environment; run plainly, this trains in one process.
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs= or steps=")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    sampler = GlobalBatchSampler(len(dataset), global_batch_size, seed)
    total_steps = steps if steps is not None else epochs * sampler.steps_per_epoch
    owns_context = context is None
    if context is None:
        context = Context.from_env()
        context.join()
    loop = _Loop(model, optimizer, dataset, loss_fn, sampler, STRATEGIES[strategy](model, optimizer),
                 context, kills)
    try:
        loop.run(total_steps)
    except BaseException:
        if owns_context:
            context.close()
        raise
    result = TrainResult(model, loop.position, loop.position / sampler.steps_per_epoch, context.rank,
                         context.world_size, context.generation, loop.heals,
                         loop.strategy.bytes_sent)
    if owns_context:
        context.finish()
    return result


class _Loop:
    def __init__(self, model, optimizer, dataset, loss_fn, sampler, strategy: Strategy,
                 context: Context, kills):
        self.model, self.optimizer, self.dataset, self.loss_fn = model, optimizer, dataset, loss_fn
        self.sampler, self.strategy, self.context, self.kills = sampler, strategy, context, kills
        self.position = 0
        """Committed steps: the data position, and the next step to run."""
        self.fresh = True
        self.heals: list[HealReport] = []

    def run(self, total_steps: int) -> None:
        failures, last_failure = 0, None
        while True:
            try:
                self._run_generation(total_steps)
                return
            except GenerationMoved:
                pass
            except JobStopped:
                self._leave()
                raise
            except RuntimeError as error:
                # A peer died or the group broke mid-collective: report it (which also proves
                # this worker is alive) and let the coordinator form the next generation.
                key = (self.position, tuple(self.context.members))
                failures = failures + 1 if key == last_failure else 1
                last_failure = key
                if failures >= _MAX_FAILURES_WITHOUT_PROGRESS:
                    self._leave()
                    raise
                self.context.report_failure(f"{type(error).__name__}: {error}")
                log.debug("generation %d broke at step %d: %s", self.context.generation,
                          self.position, error)
            # Only here, with the failed frames released, can the old group really close: a
            # live reference (say, to the DDP wrapper) would keep its sockets open and leave
            # peers waiting in a collective until it times out.
            self._leave()

    def _run_generation(self, total_steps: int) -> None:
        self.context.enter_next_generation()
        self._heal()
        module = self.strategy.setup()
        while self.position < total_steps:
            self.context.check_generation()
            self._step(module)

    def _leave(self) -> None:
        self.strategy.teardown()
        self.context.leave_generation()

    def _heal(self) -> None:
        report = heal(FRESH if self.fresh else self.position, self._capture, self._restore,
                      lambda step: maybe_kill(self.context, step, self.kills, "heal"))
        if report is not None:
            self.heals.append(report)
        self.fresh = False

    def _capture(self) -> dict:
        return {
            "position": self.position,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "strategy": self.strategy.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }

    def _restore(self, state: dict) -> None:
        self.position = int(state["position"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        torch.set_rng_state(state["rng_cpu"])
        self.context.committed_step = self.position - 1

    def _step(self, module: nn.Module) -> None:
        step, context = self.position, self.context
        maybe_kill(context, step, self.kills)
        self.optimizer.zero_grad(set_to_none=True)
        global_size = len(self.sampler.global_indices(step))
        local = self.sampler.local_indices(step, context.rank, context.world_size)
        if len(local):
            loss = self.loss_fn(module, fetch(self.dataset, local)) / global_size
        else:  # more workers than samples left in the epoch: contribute zero gradients
            loss = sum(p.sum() for p in module.parameters()) * 0.0
        self.strategy.backward(loss)
        maybe_kill(context, step, self.kills, "commit")
        self.strategy.step()
        self.position = step + 1
        context.bytes_sent = self.strategy.bytes_sent
        loss_part = loss.item()
        context.record_commit(step, loss_part if math.isfinite(loss_part) else float("nan"))
