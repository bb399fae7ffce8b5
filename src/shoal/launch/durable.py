"""The launcher's side of checkpoints: choosing what to resume from, and the job's metrics.

Workers write the checkpoints (the leader, of the committed state). The launcher checks a
``--resume`` directory before any worker starts, so that a checkpoint of another job is
refused with one clear line instead of N worker tracebacks, and it keeps
``DIR/metrics.json`` (the committed steps with their losses, and the membership changes) up
to date while the job runs. A resumed job's results then cover the steps before the resume
too, and say how many committed steps the interruption cost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    check_resumable,
    job_identity,
)
from shoal.config import ConfigError, TrainConfig
from shoal.coordinator.record import CommittedStep, JobRecord
from shoal.tracking import write_json

__all__ = ["METRICS_FILE", "MetricsFile", "Resumption", "choose_resume"]

METRICS_FILE = "metrics.json"


@dataclass(slots=True)
class Resumption:
    """What a resumed job starts from."""

    checkpoint: Checkpoint
    earlier_steps: list[CommittedStep] = field(default_factory=list)
    """Steps committed before the checkpoint, as the interrupted job recorded them."""
    steps_redone: int = 0
    """Steps the interrupted job had committed after the checkpoint, as far as its metrics.json
    (a second behind at most) knows: they are trained again."""
    earlier_changes: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"checkpoint": str(self.checkpoint.path), "step": self.checkpoint.step,
                "steps_redone": self.steps_redone, "earlier_membership_changes": self.earlier_changes}


def choose_resume(config: TrainConfig, task, warn: Callable[[str], None]) -> Resumption:
    """The newest good checkpoint in ``--resume`` that this job may continue; ConfigError if none."""
    root = Path(config.resume).resolve()
    if Checkpoint.is_checkpoint(root):
        try:
            checkpoint = Checkpoint.open(root)
            checkpoint.verify()
        except CheckpointError as error:
            raise ConfigError("--resume", str(error)) from None
        root = root.parent
    else:
        found = CheckpointStore(root).latest_good(load=False, warn=warn)
        if found is None:
            raise ConfigError("--resume", f"no usable checkpoint in {str(root)!r}")
        checkpoint = found[0]
    identity = job_identity(task.build_model(), task=config.task, global_batch_size=config.batch_size,
                            seed=config.seed, strategy=config.strategy)
    try:
        check_resumable(checkpoint.meta, identity, str(checkpoint.path))
    except CheckpointError as error:
        raise ConfigError("--resume", str(error)) from None
    total_steps = config.total_steps()
    if checkpoint.step > total_steps:  # it would report the checkpoint's steps, training none
        raise ConfigError("--steps", f"{checkpoint.path} is at step {checkpoint.step}, beyond this "
                          f"run's {total_steps} steps")
    resumption = Resumption(checkpoint)
    earlier = _read_metrics(root / METRICS_FILE, warn)
    if earlier is not None:
        resumption.earlier_steps = [s for s in earlier.steps if s.step < checkpoint.step]
        resumption.steps_redone = sum(s.step >= checkpoint.step for s in earlier.steps)
        resumption.earlier_changes = earlier.membership_changes
    # metrics.json trails the job by up to a second: the checkpoint proves the steps it lacks
    # were committed, though not by whom or at what loss.
    known = {s.step for s in resumption.earlier_steps}
    resumption.earlier_steps += [CommittedStep(step, -1, [], checkpoint.meta.get("saved_at", 0.0), None)
                                 for step in range(checkpoint.step) if step not in known]
    resumption.earlier_steps.sort(key=lambda s: s.step)
    return resumption


def _read_metrics(path: Path, warn) -> JobRecord | None:
    if not path.exists():
        return None
    try:
        return JobRecord.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as error:
        warn(f"{path}: unreadable ({error}); the results cover only the resumed steps")
        return None


class MetricsFile:
    """``DIR/metrics.json``, rewritten (atomically) at most every ``interval`` seconds."""

    def __init__(self, directory: str, earlier_steps: list[CommittedStep], interval: float = 1.0):
        self.path = str(Path(directory) / METRICS_FILE)
        self.earlier_steps = earlier_steps
        self.interval = interval
        self._written_at = 0.0
        self._written_steps = -1

    def update(self, record_now: Callable[[], JobRecord], force: bool = False) -> None:
        if not force and time.monotonic() - self._written_at < self.interval:
            return
        record = record_now()
        if not force and len(record.steps) == self._written_steps:
            return
        data = record.to_json()
        data["steps"] = [asdict(s) for s in self.earlier_steps] + data["steps"]
        write_json(self.path, data)
        self._written_at, self._written_steps = time.monotonic(), len(record.steps)
