"""One `shoal train` run of a benchmark, in a child process, read back from its results.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["train_results"]


def train_results(root: Path, name: str, *, task: str, workers: int, steps: int, seed: int,
                  flags: list[str]) -> dict:
    """Train and return results.json; RuntimeError with the end of stderr if the run failed."""
    output = root / f"{name}.json"
    # The workers share this machine's cores: none may take them all.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    command = [sys.executable, "-m", "shoal.cli.main", "train", "--task", task, "--workers", str(workers),
               "--steps", str(steps), "--seed", str(seed), "--quiet", "--output", str(output), *flags]
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    if finished.returncode != 0:
        raise RuntimeError(f"exit code {finished.returncode}: {finished.stderr.strip()[-300:]}")
    return json.loads(output.read_text())
