"""``shoal bench overhead``: what shoal costs per step when nothing fails.

The same model, data and global batch trained by a plain DDP script under torchrun
(``shoal.bench.torch_ddp``) and by ``shoal train --strategy allreduce``, alternating
torch, shoal, torch, shoal in one invocation so that both see the same machine. Each run's
step time is its mean after a warm-up (from the times its steps ended: rank 0's for torch,
the coordinator's commit times for shoal); the figure is the median over pairs of
shoal's step time over torch's.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from shoal.bench._runs import committed_times, steady_step_seconds, torchrun_results, train_results
from shoal.tasks import TASKS

__all__ = ["OverheadPair", "OverheadSettings", "run_overhead_bench", "summary", "to_json"]


@dataclass(kw_only=True, slots=True)
class OverheadSettings:
    tasks: tuple[str, ...] = ("digits", "charlm")
    workers: int = 2
    steps: int = 200
    warmup: int = 20
    pairs: int = 5
    seed: int = 0


@dataclass(slots=True)
class OverheadPair:
    task: str
    torch_step_seconds: float = 0.0
    shoal_step_seconds: float = 0.0
    error: str | None = None

    @property
    def ratio(self) -> float:
        return self.shoal_step_seconds / self.torch_step_seconds


def _pair(settings: OverheadSettings, task: str, root: Path, index: int) -> OverheadPair:
    pair = OverheadPair(task)
    batch = TASKS[task].defaults.batch_size
    common = dict(task=task, workers=settings.workers, steps=settings.steps, seed=settings.seed)
    torch_run = torchrun_results(root, f"torch-{task}-{index}", batch_size=batch, flags=[], **common)
    pair.torch_step_seconds = steady_step_seconds(torch_run.step_ended_at, settings.warmup)
    log = root / f"shoal-{task}-{index}.jsonl"
    train_results(root, f"shoal-{task}-{index}", flags=["--batch-size", str(batch), "--sample-log", str(log)],
                  **common)
    pair.shoal_step_seconds = steady_step_seconds(committed_times(log), settings.warmup)
    return pair


def run_overhead_bench(settings: OverheadSettings, *, report=print) -> list[OverheadPair]:
    pairs = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-overhead-") as temporary:
        for task in settings.tasks:
            for index in range(settings.pairs):
                try:
                    pair = _pair(settings, task, Path(temporary), index)
                except RuntimeError as error:
                    pair = OverheadPair(task, error=str(error))
                    report(f"{task} pair {index + 1}: failed: {error}")
                else:
                    report(f"{task} pair {index + 1}: torch {pair.torch_step_seconds * 1e3:.2f} ms/step, "
                           f"shoal {pair.shoal_step_seconds * 1e3:.2f} ms/step ({pair.ratio:.3f}x)")
                pairs.append(pair)
    return pairs


def summary(pairs: list[OverheadPair]) -> dict:
    """Per task: the median ratio and the median step times."""
    result = {}
    for task in dict.fromkeys(p.task for p in pairs):
        good = [p for p in pairs if p.task == task and p.error is None]
        if good:
            result[task] = {"median_ratio": statistics.median(p.ratio for p in good),
                            "torch_ms": statistics.median(p.torch_step_seconds for p in good) * 1e3,
                            "shoal_ms": statistics.median(p.shoal_step_seconds for p in good) * 1e3,
                            "pairs": len(good)}
    return result


def to_json(settings: OverheadSettings, pairs: list[OverheadPair]) -> dict:
    return {"settings": asdict(settings),
            "pairs": [{**asdict(p), "ratio": p.ratio if p.error is None else None} for p in pairs],
            "summary": summary(pairs)}
