"""Shared fixtures: every test must leave no child process behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent


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


def load_json(path) -> dict:
    return json.loads(Path(path).read_text())


def load_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
