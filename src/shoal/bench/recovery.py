"""``shoal bench recovery``: the time a worker's death costs, shoal against torchrun's recipe.

Four runs per pair, each a whole command timed from start to exit, in one invocation:

- torchrun, undisturbed, and torchrun with one worker SIGKILLed at a fixed step. This is
  the usual recipe: rank 0 checkpoints every C steps, ``--max-restarts 1`` restarts every
  worker after the death, and they resume from the newest checkpoint, redoing the steps
  since. (Both torchrun runs checkpoint, so the difference is the failure's cost alone.)
- ``shoal train``, undisturbed, and with the same worker killed at the same step: the
  survivors go on from the last committed step, re-splitting the global batch.

Reported per tool, two ways of counting the time lost:

- in the run: from the death to the end of the killed step (shoal: from the commit of the
  step before it), less one ordinary step (the median). Start-up does not enter it, so it
  is what a failure costs a long job, and it stays readable on a noisy machine;
- whole commands: disturbed minus undisturbed, start-up included, as a user's clock sees
  it (noisier: two separate runs);

and steps redone, and the largest relative difference between the disturbed and the
undisturbed final model.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from shoal.bench._runs import committed_times, torchrun_results, train_results
from shoal.reliability.checks import relative_difference
from shoal.tasks import TASKS

__all__ = ["RecoveryPair", "RecoverySettings", "run_recovery_bench", "summary", "to_json"]


@dataclass(kw_only=True, slots=True)
class RecoverySettings:
    task: str = "digits"
    workers: int = 4
    steps: int = 200
    kill_step: int = 125
    """Halfway between two checkpoints by default: what a death costs torchrun on average."""
    kill_rank: int = 1
    checkpoint_every: int = 50
    pairs: int = 3
    seed: int = 0


@dataclass(slots=True)
class ToolRun:
    undisturbed_seconds: float = 0.0
    disturbed_seconds: float = 0.0
    lost_in_run_seconds: float = 0.0
    """From the death to the end of the killed step, less a median step."""
    steps_redone: int = 0
    model_difference: float = 0.0
    """max |disturbed - undisturbed| / max |undisturbed| over the final state dict."""

    @property
    def lost_seconds(self) -> float:
        return self.disturbed_seconds - self.undisturbed_seconds


@dataclass(slots=True)
class RecoveryPair:
    torch: ToolRun | None = None
    shoal: ToolRun | None = None
    shoal_recovery_seconds: float | None = None
    """shoal's own measure: from the death to the next committed step."""
    error: str | None = None


def _torch(settings: RecoverySettings, root: Path, index: int) -> ToolRun:
    run = ToolRun()
    for disturbed in (False, True):
        name = f"torch-{'killed' if disturbed else 'plain'}-{index}"
        directory = root / f"{name}-checkpoints"
        directory.mkdir()
        flags = ["--checkpoint-dir", str(directory), "--checkpoint-every", str(settings.checkpoint_every),
                 "--save-model", str(root / f"{name}.pt")]
        if disturbed:
            flags += ["--kill", f"{settings.kill_rank}@{settings.kill_step}"]
        result = torchrun_results(root, name, task=settings.task, workers=settings.workers,
                                  steps=settings.steps, seed=settings.seed,
                                  batch_size=TASKS[settings.task].defaults.batch_size, flags=flags,
                                  max_restarts=1 if disturbed else 0)
        if disturbed:
            run.disturbed_seconds = result.seconds
            start = result.started_at_steps[-1]
            run.steps_redone = settings.kill_step - start
            ended = result.step_ended_at
            run.lost_in_run_seconds = (ended[settings.kill_step - start] - result.killed_at
                                       - _median_step(ended))
        else:
            run.undisturbed_seconds = result.seconds
    run.model_difference = relative_difference(root / f"torch-killed-{index}.pt", root / f"torch-plain-{index}.pt")
    return run


def _shoal(settings: RecoverySettings, root: Path, index: int, pair: RecoveryPair) -> ToolRun:
    run = ToolRun()
    for disturbed in (False, True):
        name = f"shoal-{'killed' if disturbed else 'plain'}-{index}"
        flags = ["--batch-size", str(TASKS[settings.task].defaults.batch_size), "--save-model", str(root / f"{name}.pt")]
        if disturbed:
            flags += ["--kill", f"{settings.kill_rank}@{settings.kill_step}",
                      "--sample-log", str(root / f"{name}.jsonl")]
        results = train_results(root, name, task=settings.task, workers=settings.workers, steps=settings.steps,
                                seed=settings.seed, flags=flags)
        if disturbed:
            run.disturbed_seconds = results["command_seconds"]
            run.steps_redone = results["steps_redone"]
            committed = committed_times(root / f"{name}.jsonl")
            # The kill comes at the start of the step, right after the previous commit.
            run.lost_in_run_seconds = (committed[settings.kill_step] - committed[settings.kill_step - 1]
                                       - _median_step(committed))
            pair.shoal_recovery_seconds = next(
                (c["recovery_seconds"] for c in results["membership_changes"]), None)
        else:
            run.undisturbed_seconds = results["command_seconds"]
    run.model_difference = relative_difference(root / f"shoal-killed-{index}.pt", root / f"shoal-plain-{index}.pt")
    return run


def _median_step(ended_at: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(ended_at, ended_at[1:]))


def run_recovery_bench(settings: RecoverySettings, *, report=print) -> list[RecoveryPair]:
    pairs = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-recovery-") as temporary:
        root = Path(temporary)
        for index in range(settings.pairs):
            pair = RecoveryPair()
            try:
                pair.torch = _torch(settings, root, index)
                pair.shoal = _shoal(settings, root, index, pair)
            except RuntimeError as error:
                pair.error = str(error)
                report(f"pair {index + 1}: failed: {error}")
            else:
                report(f"pair {index + 1}: torchrun lost {pair.torch.lost_in_run_seconds:.2f} s in the run, "
                       f"{pair.torch.lost_seconds:.2f} s whole ({pair.torch.steps_redone} steps redone); "
                       f"shoal lost {pair.shoal.lost_in_run_seconds:.2f} s in the run, "
                       f"{pair.shoal.lost_seconds:.2f} s whole ({pair.shoal.steps_redone} steps redone)")
            pairs.append(pair)
    return pairs


def summary(pairs: list[RecoveryPair]) -> dict:
    good = [p for p in pairs if p.error is None]
    if not good:
        return {}
    result = {}
    for tool in ("torch", "shoal"):
        runs = [getattr(p, tool) for p in good]
        result[tool] = {"median_lost_seconds": statistics.median(r.lost_seconds for r in runs),
                        "median_lost_in_run_seconds": statistics.median(r.lost_in_run_seconds for r in runs),
                        "steps_redone": max(r.steps_redone for r in runs),
                        "max_model_difference": max(r.model_difference for r in runs)}
    shoal_lost = result["shoal"]["median_lost_in_run_seconds"]
    # Below a few milliseconds the difference of two clock readings is noise: no ratio.
    result["ratio_torch_to_shoal"] = (result["torch"]["median_lost_in_run_seconds"] / shoal_lost
                                      if shoal_lost > 0.005 else None)
    recoveries = [p.shoal_recovery_seconds for p in good if p.shoal_recovery_seconds is not None]
    result["shoal_recovery_seconds"] = statistics.median(recoveries) if recoveries else None
    result["pairs"] = len(good)
    return result


def to_json(settings: RecoverySettings, pairs: list[RecoveryPair]) -> dict:
    return {"settings": asdict(settings), "pairs": [asdict(p) for p in pairs], "summary": summary(pairs)}
