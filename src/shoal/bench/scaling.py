"""``shoal bench scaling``: samples per second with 1, 2, 4 ... local workers.

Each worker count trains the same task and global batch; the rate is taken after a
warm-up from the coordinator's commit times. Efficiency is the rate with N workers over N
times the rate with one. On a machine with fewer cores than workers the workers share
cores, and efficiency says so: the table names the machine, its cores and the backend.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from shoal.bench._runs import steady_step_seconds, train_results

__all__ = ["ScalingRow", "ScalingSettings", "device_label", "run_scaling_bench", "to_json"]


@dataclass(kw_only=True, slots=True)
class ScalingSettings:
    task: str = "charlm"
    workers: tuple[int, ...] = (1, 2, 4)
    steps: int = 100
    warmup: int = 10
    seed: int = 0


@dataclass(slots=True)
class ScalingRow:
    workers: int
    samples_per_second: float = 0.0
    efficiency: float | None = None
    error: str | None = None


def device_label() -> str:
    """What the workers compute on and talk over: the built-in tasks keep their models on
    the CPU, whose tensors go over gloo even where CUDA is present."""
    return f"CPU ({os.cpu_count()} cores), gloo"


def _rate(sample_log: Path, warmup: int) -> float:
    lines = sorted((json.loads(line) for line in sample_log.read_text().splitlines() if line),
                   key=lambda line: line["step"])
    skip = min(max(warmup, 1), len(lines) - 1)
    samples = sum(len(line["samples"]) for line in lines[skip:])
    seconds = steady_step_seconds([line["committed_at"] for line in lines], warmup) * (len(lines) - skip)
    return samples / seconds


def run_scaling_bench(settings: ScalingSettings, *, report=print) -> list[ScalingRow]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-scaling-") as temporary:
        root = Path(temporary)
        for workers in settings.workers:
            row = ScalingRow(workers)
            log = root / f"{workers}.jsonl"
            try:
                train_results(root, f"workers-{workers}", task=settings.task, workers=workers, steps=settings.steps,
                              seed=settings.seed, flags=["--sample-log", str(log)])
                row.samples_per_second = _rate(log, settings.warmup)
            except RuntimeError as error:
                row.error = str(error)
                report(f"{workers} worker(s): failed: {error}")
            else:
                report(f"{workers} worker(s): {row.samples_per_second:.1f} samples/s")
            rows.append(row)
    single = next((r for r in rows if r.workers == 1 and r.error is None), None)
    for row in rows:
        if single and row.error is None:
            row.efficiency = row.samples_per_second / (row.workers * single.samples_per_second)
    return rows


def to_json(settings: ScalingSettings, rows: list[ScalingRow]) -> dict:
    return {"settings": asdict(settings), "device": device_label(), "rows": [asdict(r) for r in rows]}
