"""The promises as checks over what a run left behind (model, sample log, processes)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import psutil
import torch

__all__ = ["exactly_once_violations", "kill_processes", "leftover_processes", "relative_difference"]


def relative_difference(path_a, path_b) -> float:
    """max |a - b| / max |b| over every tensor of two saved state dicts."""
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    if a.keys() != b.keys():
        return float("inf")
    scale = max(t.abs().max().item() for t in b.values()) or 1.0
    return max((a[k] - b[k]).abs().max().item() for k in a) / scale


def exactly_once_violations(sample_log: Path, *, dataset_size: int, steps: int) -> list[str]:
    """What breaks exactly-once in a sample log (empty when the promise holds)."""
    lines = [json.loads(line) for line in Path(sample_log).read_text().splitlines() if line]
    problems = []
    if [line["step"] for line in lines] != list(range(steps)):
        problems.append(f"committed steps are not exactly 0..{steps - 1}")
    by_epoch: dict[int, list[int]] = collections.defaultdict(list)
    for line in lines:
        by_epoch[line["epoch"]].extend(line["samples"])
    for epoch, samples in sorted(by_epoch.items()):
        if len(samples) != len(set(samples)):
            problems.append(f"epoch {epoch} repeats samples")
        complete = epoch < max(by_epoch) or len(samples) == dataset_size
        if complete and sorted(samples) != list(range(dataset_size)):
            problems.append(f"epoch {epoch} does not use every sample exactly once")
    return problems


def leftover_processes(marker: str | None = None) -> list[int]:
    """Pids of live processes whose environment carries ``SHOAL_CHAOS_TRIAL=marker`` (any
    marker when ``marker`` is None: every trial's)."""
    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            trial = process.environ().get("SHOAL_CHAOS_TRIAL")
            if trial is not None and marker in (None, trial) and \
                    process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_processes(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` that still lives and wait until it is gone."""
    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            process.kill()
            alive.append(process)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=10)
