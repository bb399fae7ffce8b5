"""``shoal bench straggler``: async against allreduce when one worker is slow.

Both runs train the same task, seed and global batch on local workers with one of them
made FACTOR times slower (``--slowdown``), one run after the other in one invocation.
allreduce waits for the slow worker at every step; async hands it fewer units and scales
or drops its stale gradients. Reported: wall time, the loss curve against wall time, and
when the smoothed training loss first reached the target.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shoal.bench._runs import loss_text, train_results
from shoal.bench.wan import WanRun, read_results

__all__ = ["DEFAULT_RUNS", "StragglerSettings", "run_straggler"]

DEFAULT_RUNS = (
    ("allreduce", ("--strategy", "allreduce")),
    ("async", ("--strategy", "async")),
)


@dataclass(kw_only=True, slots=True)
class StragglerSettings:
    task: str = "charlm"
    workers: int = 4
    factor: float = 3.0
    """How many times slower the straggler (worker 1) computes."""
    steps: int = 200
    batch_size: int | None = None
    seed: int = 0
    target_loss: float = 2.6
    runs: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RUNS


def _run_one(settings: StragglerSettings, label: str, flags: list[str], root: Path) -> WanRun:
    run = WanRun(label, flags)
    log = root / f"{label}.jsonl"
    batch = ["--batch-size", str(settings.batch_size)] if settings.batch_size else []
    try:
        train_results(root, label, task=settings.task, workers=settings.workers, steps=settings.steps,
                      seed=settings.seed, flags=[*batch, "--slowdown", f"1={settings.factor:g}",
                                                 "--sample-log", str(log), *flags])
    except RuntimeError as error:
        run.error = str(error)
        return run
    read_results(run, root / f"{label}.json", log, workers=settings.workers, target_loss=settings.target_loss)
    return run


def run_straggler(settings: StragglerSettings, *, report=print) -> list[WanRun]:
    """Train once per configured run, one after the other; ``report`` gets a line per run."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-straggler-") as temporary:
        for label, flags in settings.runs:
            started = time.monotonic()
            run = _run_one(settings, label, list(flags), Path(temporary))
            runs.append(run)
            outcome = run.error or (f"{run.train_seconds:.1f} s, loss {loss_text(run.final_train_loss)}, "
                                    f"target at {_seconds(run.seconds_to_target)}")
            report(f"{label:10s} {outcome} ({time.monotonic() - started:.0f} s in all)")
    return runs


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def to_json(settings: StragglerSettings, runs: list[WanRun]) -> dict:
    return {"settings": asdict(settings), "runs": [asdict(run) for run in runs]}
