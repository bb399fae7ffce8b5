"""Learning-rate schedules as functions of the step, with no state of their own.

A run's position is its committed step and nothing else (``shoal.data.sampler``). A
schedule that is a function of that step survives everything the run does: after a
rollback, a heal or a resume the next step sets the rate it would have had anyway, so a
run with failures follows the same rates as one without. (A torch ``LRScheduler`` keeps a
step counter that would have to be rolled back, copied to newcomers and checkpointed.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from shoal.config import ConfigError

__all__ = ["LRFactor", "LRSchedule"]

LRFactor = Callable[[int], float]
"""``step -> factor`` of the optimizer's base learning rate (``LambdaLR``'s ``lr_lambda``)."""


@dataclass(frozen=True, slots=True)
class LRSchedule:
    """A linear warm-up over ``warmup_steps``, then ``kind``.

    Warm-up: step s (from 0) runs at (s + 1) / W of the base rate. ``constant``: the base
    rate after it. ``cosine``: half a cosine from the base rate after the warm-up down to 0
    after the last step (torch's ``LinearLR`` then ``CosineAnnealingLR``, as in the DiLoCo
    paper's inner optimizer). The base rate is the optimizer's when training starts.
    """

    KINDS = ("constant", "cosine")

    kind: str = "constant"
    warmup_steps: int = 0

    def validate(self, total_steps: int | None = None) -> LRSchedule:
        """Raise :class:`ConfigError` naming the flag; ``total_steps`` when the run's length is known."""
        if self.kind not in self.KINDS:
            raise ConfigError("--lr-schedule", f"unknown schedule {self.kind!r} (choose from {', '.join(self.KINDS)})")
        if self.warmup_steps < 0:
            raise ConfigError("--lr-warmup", f"must be 0 or more, got {self.warmup_steps}")
        if total_steps is not None and self.warmup_steps >= total_steps:
            raise ConfigError("--lr-warmup", f"must be fewer than the run's {total_steps} steps, "
                              f"got {self.warmup_steps}")
        return self

    def factor(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / (total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def over(self, total_steps: int) -> LRFactor:
        """The schedule of a run of ``total_steps`` steps."""
        self.validate(total_steps)
        return partial(self.factor, total_steps=total_steps)
