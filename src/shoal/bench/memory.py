"""``shoal bench memory``: each worker's share of the training state, zero against allreduce.

For each worker count, the same short job is trained with allreduce (every worker holds
everything) and with zero (FSDP2 shards) for each ``--zero-replicas`` (members holding each
shard), and results.json's ``state_bytes`` of the leader (parameters, gradients, optimizer
state, counted tensor by tensor after the last step) are compared. Activations and
temporary all-gather buffers are not in the figure: it is the state ZeRO-3 shards.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from shoal.bench._runs import train_results

__all__ = ["MemoryRow", "MemorySettings", "run_memory_bench", "to_json"]


@dataclass(kw_only=True, slots=True)
class MemorySettings:
    task: str = "charlm"
    workers: tuple[int, ...] = (2, 4)
    replicas: tuple[int, ...] = (1, 2)
    steps: int = 4
    seed: int = 0


@dataclass(slots=True)
class MemoryRow:
    workers: int
    replicas: int
    allreduce: dict = field(default_factory=dict)
    zero: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ratio(self) -> float:
        return sum(self.zero.values()) / sum(self.allreduce.values())


def run_memory_bench(settings: MemorySettings, *, report=print) -> list[MemoryRow]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-memory-") as temporary:
        for workers in settings.workers:
            run = partial(train_results, Path(temporary), task=settings.task, workers=workers,
                          steps=settings.steps, seed=settings.seed)
            try:
                allreduce = run(f"allreduce-{workers}", flags=["--strategy", "allreduce"])["state_bytes"]
            except RuntimeError as error:
                report(f"{workers} workers: failed: {error}")
                rows += [MemoryRow(workers, replicas, error=str(error)) for replicas in settings.replicas]
                continue
            for replicas in settings.replicas:
                row = MemoryRow(workers, replicas, allreduce)
                try:
                    row.zero = run(f"zero-{workers}-{replicas}", flags=[
                        "--strategy", "zero", "--zero-replicas", str(replicas)])["state_bytes"]
                except RuntimeError as error:
                    row.error = str(error)
                    report(f"{workers} workers, {replicas} replica(s): failed: {error}")
                else:
                    report(f"{workers} workers, each shard on {replicas}: "
                           f"{sum(row.zero.values()) / 1e6:.2f} MB per worker with zero, "
                           f"{sum(row.allreduce.values()) / 1e6:.2f} MB with allreduce ({row.ratio:.3f})")
                rows.append(row)
    return rows


def to_json(settings: MemorySettings, rows: list[MemoryRow]) -> dict:
    return {"settings": asdict(settings),
            "rows": [{**asdict(r), "ratio": r.ratio if r.error is None else None} for r in rows]}
