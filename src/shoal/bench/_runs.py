"""One run of a benchmark in child processes: `shoal train`, or the plain-torch script under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["TorchRun", "committed_times", "loss_text", "steady_step_seconds", "torchrun_results",
           "train_results"]


def loss_text(loss: float | None) -> str:
    """A loss for a table or a progress line; a diverged run's is null (``-``)."""
    return "-" if loss is None else f"{loss:.3f}"


def _env(workers: int) -> dict[str, str]:
    # The workers share this machine's cores: none may take them all (torchrun sets the
    # same for more than one process; shoal's launcher would, too).
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}


def _run(command: list[str], workers: int) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env=_env(workers))
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"exit code {finished.returncode}: {finished.stderr.strip()[-300:]}")
    return finished, seconds


def train_results(root: Path, name: str, *, task: str, workers: int, steps: int, seed: int,
                  flags: list[str]) -> dict:
    """Train and return results.json (with ``command_seconds``, the whole command's wall time);
    RuntimeError with the end of stderr if the run failed."""
    output = root / f"{name}.json"
    command = [sys.executable, "-m", "shoal.cli.main", "train", "--task", task, "--workers", str(workers),
               "--steps", str(steps), "--seed", str(seed), "--quiet", "--output", str(output), *flags]
    _, seconds = _run(command, workers)
    return {**json.loads(output.read_text()), "command_seconds": seconds}


def committed_times(sample_log: Path) -> list[float]:
    """When each committed step of a `--sample-log` was committed, in step order."""
    lines = [json.loads(line) for line in sample_log.read_text().splitlines() if line]
    return [line["committed_at"] for line in sorted(lines, key=lambda line: line["step"])]


class TorchRun:
    """What the plain-torch script reported, and how long torchrun took."""

    def __init__(self, lines: list[dict], seconds: float):
        self.started_at_steps = [line["started_at_step"] for line in lines if "started_at_step" in line]
        """Each attempt's first step: after a restart, the newest checkpoint's step."""
        self.step_ended_at = next(line["step_ended_at"] for line in lines if "step_ended_at" in line)
        """The last attempt's step end times (its first step is its start step)."""
        self.killed_at = next((line["killed_at"] for line in lines if "killed_at" in line), None)
        """When ``--kill`` killed a worker (unix time)."""
        self.seconds = seconds
        """The whole torchrun command's wall time, restarts included."""


def torchrun_results(root: Path, name: str, *, task: str, workers: int, steps: int, seed: int,
                     batch_size: int, flags: list[str], max_restarts: int = 0) -> TorchRun:
    """Run shoal.bench.torch_ddp under torchrun (`--standalone`)."""
    output = root / f"{name}.jsonl"
    # --log-dir inside the benchmark's directory: by default torchrun leaves a
    # /tmp/torchelastic_* directory behind per run.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(workers),
               "--max-restarts", str(max_restarts), "--log-dir", str(root / f"{name}-torchrun"),
               "-m", "shoal.bench.torch_ddp", "--task", task,
               "--steps", str(steps), "--batch-size", str(batch_size), "--seed", str(seed),
               "--output", str(output), *flags]
    _, seconds = _run(command, workers)
    return TorchRun([json.loads(line) for line in output.read_text().splitlines() if line], seconds)


def steady_step_seconds(ended_at: list[float], warmup: int) -> float:
    """Mean step time after the first ``warmup`` steps (start-up, first-step allocation and
    DDP's bucket rebuild are not what a long job pays per step)."""
    skip = min(max(warmup, 1), len(ended_at) - 1)
    if skip < 1:
        raise RuntimeError("too few steps to time: raise --steps")
    return (ended_at[-1] - ended_at[skip - 1]) / (len(ended_at) - skip)
