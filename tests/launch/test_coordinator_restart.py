"""Kill the standalone coordinator mid-run and start it again on the same address: the
workers keep training through the outage, the new coordinator adopts their generation,
a later crash still re-forms the group (on the new coordinator's store), and the model
equals an undisturbed run's."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx

from shoal.reliability.checks import relative_difference
from tests.conftest import shoal

TOKEN = "restart-token"
TASK = ["--task", "quadratic", "--steps", "600", "--batch-size", "64", "--seed", "0"]


def coordinator(port: int) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli.main", "coordinator", "--port", str(port), "--token", TOKEN,
         "--workers", "3", "--heartbeat-timeout", "2", "--linger", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = int(re.search(r":(\d+)$", process.stdout.readline().strip()).group(1))
    return process, port


def step(port: int) -> int:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/status",
                             headers={"Authorization": f"Bearer {TOKEN}"})
        return response.json()["step"]
    except httpx.TransportError:
        return -1


def test_training_survives_a_coordinator_restart(tmp_path):
    first, port = coordinator(0)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli.main", "train", *TASK, "--workers", "3", "--quiet",
         "--coordinator", f"127.0.0.1:{port}", "--token", TOKEN,
         "--kill", "1@500", "--save-model", str(tmp_path / "model.pt")],
        stderr=subprocess.PIPE, text=True)
    second = None
    try:
        deadline = time.monotonic() + 120
        while step(port) < 100:
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first.wait()
        second, _ = coordinator(port)
        assert launcher.wait(timeout=240) == 0, launcher.stderr.read()
        status = httpx.get(f"http://127.0.0.1:{port}/status",  # it lingers after the end
                           headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert status["status"] == "completed"
        assert status["membership_changes"] >= 1  # the crash after the restart re-formed the group
        assert second.wait(timeout=60) == 0
        # Each coordinator logs its generations: the second one the generation it took over
        # from the workers and when it had heard from all of them, then the re-form after
        # the crash.
        assert first.stderr.read().splitlines() == ["shoal coordinator: generation 1: members [0, 1, 2]"]
        log = second.stderr.read().splitlines()
        assert log[0] == "shoal coordinator: generation 1: members [0, 1, 2]"
        # (worker 1 may die before the new coordinator hears it: then it says so)
        assert log[1].startswith("shoal coordinator: took over generation 1: heard members [")
        assert log[2].startswith("shoal coordinator: generation 1 -> 2: worker 1: --kill 1@500")
        assert log[2].endswith("members [0, 1, 2] -> [0, 2]") and log[-1] == "shoal coordinator: job completed"
        assert status["takeover"]["members"] == [0, 1, 2] and status["takeover"]["heard"]
    finally:
        for process in (first, second, launcher):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    result = shoal("train", *TASK, "--workers", "3", "--quiet", "--save-model",
                   str(tmp_path / "reference.pt"))
    assert result.returncode == 0, result.stderr
    assert relative_difference(tmp_path / "model.pt", tmp_path / "reference.pt") <= 1e-5
