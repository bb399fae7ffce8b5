"""Fault injection for demos, tests and benchmarks (``--kill RANK@STEP``)."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from shoal.config import KillSpec

__all__ = ["maybe_kill"]


def maybe_kill(context, step: int, kills: Sequence[KillSpec]) -> None:
    """SIGKILL this process if a kill is planned for this worker at ``step``.

    The coordinator is told first so that the membership change names its cause; then the
    process dies the hard way, with no chance to clean up, like a preempted machine.
    """
    for kill in kills:
        if kill.rank == context.worker_id and kill.step == step:
            context.report_kill(str(kill))
            os.kill(os.getpid(), signal.SIGKILL)
