"""Workers forked from a zygote behave like fresh processes: output, exit codes, signals."""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil
import pytest

from shoal.launch.zygote import WORKER_NAME, ZYGOTE_NAME, Zygote
from tests.conftest import shoal


def _entry() -> int:
    """What a forked worker runs: behaviour chosen by its environment."""
    mode = os.environ["MODE"]
    if mode == "print":
        print(f"stdout {os.environ['GREETING']} from {os.getpid()}")
        print("stderr line", file=sys.stderr)
        return 7
    if mode == "wait":
        print("ready", flush=True)
        signal.pause()
        return 0
    if mode == "exit-message":
        sys.exit("a message for stderr")
    raise ValueError("an unhandled error")


@pytest.fixture
def zygote():
    zygote = Zygote.start(preload=("json",), entry=_entry)
    assert zygote is not None, "pytest runs threads: the zygote could not be forked"
    yield zygote
    zygote.close()
    assert not psutil.pid_exists(zygote.pid)


def test_a_forked_worker_gets_its_environment_output_and_exit_code(zygote):
    worker = zygote.spawn({"MODE": "print", "GREETING": "hello"})
    lines = worker.stdout.read().splitlines()
    assert worker.wait(timeout=30) == 7
    assert lines == [f"stdout hello from {worker.pid}", "stderr line"]
    assert psutil.Process(zygote.pid).name() == ZYGOTE_NAME


def test_a_signal_and_errors_are_reported_like_popen(zygote):
    waiting = zygote.spawn({"MODE": "wait"})
    assert waiting.stdout.readline() == "ready\n"
    assert psutil.Process(waiting.pid).name() == WORKER_NAME
    assert os.getpgid(waiting.pid) == waiting.pid  # its own group: killpg reaches only it
    os.killpg(waiting.pid, signal.SIGKILL)
    assert waiting.wait(timeout=30) == -signal.SIGKILL

    message = zygote.spawn({"MODE": "exit-message"})
    assert message.stdout.read().strip() == "a message for stderr"
    assert message.wait(timeout=30) == 1

    failing = zygote.spawn({"MODE": "raise"})
    assert "ValueError: an unhandled error" in failing.stdout.read()
    assert failing.wait(timeout=30) == 1


def test_workers_go_when_the_zygote_dies(zygote):
    worker = zygote.spawn({"MODE": "wait"})
    assert worker.stdout.readline() == "ready\n"
    os.kill(zygote.pid, signal.SIGKILL)
    # Nobody could report its exit any more: the launcher's end kills it and says so.
    assert worker.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while psutil.pid_exists(worker.pid) and psutil.Process(worker.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the orphaned worker is still running"
        time.sleep(0.05)


def test_forked_and_fresh_workers_train_the_same_model(tmp_path):
    args = ["train", "--task", "quadratic", "--workers", "1", "--steps", "10", "--quiet"]
    forked, fresh = tmp_path / "forked.pt", tmp_path / "fresh.pt"
    result = shoal(*args, "--save-model", str(forked))
    assert result.returncode == 0, result.stderr
    result = shoal(*args, "--save-model", str(fresh), env={**os.environ, "SHOAL_FORK_WORKERS": "0"})
    assert result.returncode == 0, result.stderr
    assert forked.read_bytes() == fresh.read_bytes()
