"""Fault injection for demos, tests and benchmarks (``--kill``/``--hang``/``--fail``/
``--lose-answer RANK@STEP``)."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from shoal.config import KillSpec

__all__ = ["InjectedFault", "LostAnswer", "maybe_kill"]


class InjectedFault(Exception):
    """Raised by ``--fail``: deliberately not a RuntimeError, so no retry swallows it."""


class LostAnswer(RuntimeError):
    """Raised by ``--lose-answer`` once the members agreed on a step: what a collective whose
    result reached the others and not this worker raises. A RuntimeError, as gloo's are: the
    worker reports the failure and stays for the next generation, one step behind the others."""


def maybe_kill(context, step: int, kills: Sequence[KillSpec], phase: str = "step",
               reached: bool = False) -> None:
    """Signal this process if a fault is planned for this worker at ``step``.

    The coordinator is told first so that the membership change names its cause; then the
    process dies (SIGKILL) with no chance to clean up, like a preempted machine, or freezes
    (SIGSTOP) with its heartbeat thread, like a hung one. A lost answer is not a death: the
    worker's failure report names it.
    """
    for kill in kills:
        # ``reached``: at the first step at or past it (a worker of async skips steps).
        due = kill.step <= step if phase == "heal" or reached else kill.step == step
        description = f"{kill.flag} {kill}: {kill.signal}"
        if kill.rank == context.worker_id and kill.phase == phase and due and \
                description not in context.fired_faults:  # once, even across restarts
            context.fired_faults.add(description)
            if kill.signal == "LOST":
                raise LostAnswer(f"{kill.flag} {kill}: the others applied step {step}")
            context.report_kill(description)
            if kill.signal == "EXCEPTION":
                raise InjectedFault(f"{kill.flag} {kill}")
            os.kill(os.getpid(), signal.Signals[kill.signal])
