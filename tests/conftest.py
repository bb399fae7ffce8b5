"""Shared fixtures: every test must leave no child process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent

# Two tests run at a time (-n 2), each a job of several processes, on CI's two cores: one
# thread each, as torchrun gives N processes on one machine (OpenMP's threads spin, and
# oversubscribed ones slow every process down). Set before any test imports torch; a value
# given from outside wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

LONG = os.environ.get("SHOAL_LONG_TESTS") == "1"
"""SHOAL_LONG_TESTS=1 runs the long versions of scenarios that CI runs shortened."""


@pytest.fixture(autouse=True)
def no_process_left_behind():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 10
    while True:
        left = [p for p in psutil.Process().children(recursive=True)
                if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for process in left:
        process.kill()
    assert not left, f"processes left behind: {[p.cmdline() for p in left]}"


def shoal(*args: str, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    """Run the shoal CLI as a user would, in a child process."""
    return subprocess.run([sys.executable, "-m", "shoal.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def outputs(processes: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process, once all ended; any left at the timeout
    is killed (and the test fails on it)."""
    try:
        ends = [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return [(p.returncode, out, err) for p, (out, err) in zip(processes, ends)]


def load_json(path) -> dict:
    return json.loads(Path(path).read_text())


def load_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


DIGITS_4 = ["--task", "digits", "--steps", "60", "--batch-size", "64", "--seed", "0", "--quiet",
            "--workers", "4"]
"""The digits job most comparisons use: 4 workers, 60 steps of a 64-sample global batch."""


def train_job(directory: Path, name: str, *args: str) -> tuple[Path, dict]:
    """`shoal train ... --save-model --output`: the model's path and the results."""
    model, output = directory / f"{name}.pt", directory / f"{name}.json"
    result = shoal("train", *args, "--save-model", str(model), "--output", str(output))
    assert result.returncode == 0, result.stderr
    return model, load_json(output)


@pytest.fixture(scope="session")
def digits_allreduce(tmp_path_factory) -> tuple[Path, dict]:
    """DIGITS_4 with allreduce, undisturbed: run once, compared with by several test files."""
    return train_job(tmp_path_factory.mktemp("digits-allreduce"), "allreduce", *DIGITS_4)
