"""``shoal bench checkpoint``: what checkpointing costs a running job.

The same job is trained without checkpoints and with one every S steps (written in the
background), alternating A B A B in one invocation so that both see the same machine.
Reported per pair: the mean step time of each run and their ratio; over all saves: the
checkpoint's size, the disk throughput of the writer thread (bytes over the seconds it
spent serialising, hashing, writing and fsyncing) and how long the training thread was
held up per save (the memory copy).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.bench._runs import train_results

__all__ = ["CheckpointPair", "CheckpointSettings", "run_checkpoint_bench", "summary", "to_json"]


@dataclass(kw_only=True, slots=True)
class CheckpointSettings:
    task: str = "charlm"
    strategy: str = "allreduce"
    """allreduce: the leader writes the whole state; zero: every member writes its shards (DCP)."""
    workers: int = 2
    steps: int = 200
    every: int = 50
    pairs: int = 5
    seed: int = 0


@dataclass(slots=True)
class CheckpointPair:
    plain_step_seconds: float = 0.0
    checkpointed_step_seconds: float = 0.0
    saves: list[dict] = field(default_factory=list)
    """What the leader reported per save: step, bytes, write_seconds, blocked_seconds."""
    error: str | None = None

    @property
    def ratio(self) -> float:
        return self.checkpointed_step_seconds / self.plain_step_seconds


def _train(settings: CheckpointSettings, root: Path, name: str, flags: list[str]) -> dict:
    return train_results(root, name, task=settings.task, workers=settings.workers, steps=settings.steps,
                         seed=settings.seed, flags=["--strategy", settings.strategy, *flags])


def _step_seconds(results: dict) -> float:
    return results["train_seconds"] / results["steps"]


def run_checkpoint_bench(settings: CheckpointSettings, *, report=print) -> list[CheckpointPair]:
    pairs = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-checkpoint-") as temporary:
        root = Path(temporary)
        for index in range(settings.pairs):
            pair = CheckpointPair()
            try:
                plain = _train(settings, root, f"plain-{index}", [])
                directory = root / f"checkpoints-{index}"
                saved = _train(settings, root, f"saved-{index}",
                               ["--checkpoint-dir", str(directory), "--checkpoint-every", str(settings.every)])
            except RuntimeError as error:
                pair.error = str(error)
                report(f"pair {index + 1}: failed: {error}")
                pairs.append(pair)
                continue
            pair.plain_step_seconds, pair.checkpointed_step_seconds = _step_seconds(plain), _step_seconds(saved)
            pair.saves = saved["checkpoints"]
            pairs.append(pair)
            report(f"pair {index + 1}: {pair.plain_step_seconds * 1e3:.1f} ms/step plain, "
                   f"{pair.checkpointed_step_seconds * 1e3:.1f} ms/step checkpointed ({pair.ratio:.3f}x), "
                   f"{len(pair.saves)} saves")
    return pairs


def summary(pairs: list[CheckpointPair]) -> dict:
    good = [p for p in pairs if p.error is None]
    saves = [s for p in good for s in p.saves]
    if not good or not saves:
        return {}
    return {
        "median_step_time_ratio": statistics.median(p.ratio for p in good),
        "checkpoint_megabytes": statistics.median(s["bytes"] for s in saves) / 1e6,
        "write_megabytes_per_second": statistics.median(s["bytes"] / s["write_seconds"] for s in saves) / 1e6,
        "blocked_milliseconds": statistics.median(s["blocked_seconds"] for s in saves) * 1e3,
        "saves": len(saves),
    }


def to_json(settings: CheckpointSettings, pairs: list[CheckpointPair]) -> dict:
    return {"settings": asdict(settings), "pairs": [{**asdict(p), "ratio": p.ratio if p.error is None else None}
                                                   for p in pairs], "summary": summary(pairs)}
